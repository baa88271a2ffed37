"""The DeepSpeed side of a worker: engine construction and one optimizer step (Adam, SAM or ASAM).

SAM inside a DeepSpeed engine (METHODS.md section 2):
  1. the first gradient comes from `torch.autograd.grad` on `engine.module`, which fires none of ZeRO's gradient
     hooks, so the engine's gradient buffers only ever see the second gradient;
  2. scope "worker": each worker perturbs with the gradient of its own sub-batch (m-sharpness, the reference
     procedure); scope "global": the first gradient is all-reduced (averaged) first;
  3. w <- w + e, `engine.backward` on the loss at w + e (DeepSpeed all-reduces this gradient as usual),
     w restored by copy, `engine.step()`.
At ZeRO 1/2 the engine keeps fp32 master weights in the optimizer and copies them back into the module after the
step, so perturbing and restoring the module's (full) weights is exact. ZeRO-3 partitions the module's weights, so
step 1 cannot see whole tensors: it is rejected by the config.

Dropout. Training steps run in train mode (`from_pretrained` returns eval mode). Both passes of a SAM step see the
same dropout masks: the RNG state is forked around the first pass, so the second pass draws what the first drew and
leaves the RNG where one pass of Adam would. SAM's two gradients are then of the same function of w, and rho = 0 is
Adam bit for bit, dropout on.

Precision. bf16 and fp16 keep fp32 weights in the module and compute under `torch.autocast` (DeepSpeed's
`torch_autocast` mode, like the HF Trainer's bf16/fp16 flags). With bf16 *weights*, SAM's e (|e_i| ~ 1e-5 at BERT
scale, below half a bf16 ulp of |w| ~ 0.04) would mostly round away; with fp32 weights w + e is exact and the
realised perturbation has norm rho. fp16 adds dynamic loss scaling (a GradScaler in the engine); SAM's first loss is
multiplied by the same scale, so its gradient does not underflow (e is a direction: the scale cancels out).
"""

from __future__ import annotations

import contextlib
import math

import deepspeed
import torch
import torch.distributed as dist

from flatray.config import RunConfig
from flatray.methods import cheap_sam
from flatray.methods.sam import perturb_

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")  # HF convention: no weight decay there
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.gradient_clipping,  # explicit: DeepSpeed clips to 1.0 when unset
        "zero_optimization": {"stage": ds.zero_stage},
        # fp32 weights, bf16/fp16 compute (see the module docstring); "bf16"/"fp16" sections stay off
        "torch_autocast": {"enabled": ds.precision != "fp32",
                           "dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(ds.precision, "float32")},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The base optimizer: AdamW (= Adam when weight_decay is 0, as in P1). SAM wraps its step, not its math."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optimizer
    # fused: one kernel for the whole update (as HF's Trainer uses); same math as the default foreach AdamW
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=o.betas, eps=o.eps, fused=True)


def lr_factor(cfg: RunConfig, total_steps: int):
    """Linear warm-up then linear decay to 0 (METHODS.md: no warm-up by default), or constant after warm-up."""
    warmup = math.floor(cfg.train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.train.schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def make_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, total_steps: int):
    optimizer = make_optimizer(model, cfg)
    return initialize(model, optimizer, make_schedule(optimizer, cfg, total_steps), cfg, world_size)


def initialize(model, optimizer, schedule, cfg: RunConfig, world_size: int):
    """deepspeed.initialize with flatray's config for this run."""
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=deepspeed_config(cfg, world_size))
    if world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # One worker has nothing to average; DeepSpeed would still flatten, "all-reduce" and copy every gradient.
        engine.enable_backward_allreduce = False
    return engine


def autocast(cfg: RunConfig, device) -> contextlib.AbstractContextManager:
    """The run's compute precision for forwards outside the engine (SAM's first pass, teachers, evaluation)."""
    dtype = AUTOCAST_DTYPES.get(cfg.deepspeed.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(engine):
    """The engine's fp16 loss scaler (torch_autocast mode), or None."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None) or getattr(engine.optimizer, "torch_autocast_gradscaler", None)


def optimizer_step(engine) -> bool:
    """engine.step(); False when the step was skipped (fp16 loss scaling found inf/nan gradients).

    A skipped step must not move the schedule (SQuAT's phases and the lr follow the steps taken). DeepSpeed skips
    its scheduler on overflow only where its optimizer reports one; at ZeRO 0 with a GradScaler it does not, so a
    fallen loss scale tells the skip, and the scheduler is stepped back here.
    """
    scaler = grad_scaler(engine)
    scale = scaler.get_scale() if scaler is not None else None
    before = getattr(engine.lr_scheduler, "last_epoch", None)
    engine.step()
    if scaler is None or scaler.get_scale() >= scale:
        return engine.was_step_applied()
    sched = engine.lr_scheduler
    if sched is not None and sched.last_epoch != before:
        sched.last_epoch = before
        sched._last_lr = [base * f(before) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, sched._last_lr):
            group["lr"] = lr
    return False


def model_loss(model, batch: dict) -> torch.Tensor:
    """The task loss the HF head computes from the batch's labels."""
    return model(**batch).loss


def with_l1(loss_fn, weights: list[torch.Tensor], lam: float):
    """`loss_fn` + lam * sum |w| over `weights` (P1 A.7's control: the prunable set). Its gradient adds
    lam * sign(w) there (0 at pruned weights, whose gradient the mask zeroes anyway); the gradient clipping sees
    the sum. In SAM both passes take it: SAM minimises the max of the whole objective around w."""

    def loss(model, batch: dict) -> torch.Tensor:
        return loss_fn(model, batch) + lam * torch.stack([w.abs().sum() for w in weights]).sum()

    return loss


def train_step(engine, batch: dict, cfg: RunConfig, loss_fn=model_loss, sam: bool | None = None,
               perturb: list | None = None) -> float:
    """One optimizer step on `batch`; returns the loss at the current weights (before any perturbation).

    `loss_fn(model, batch)` gives the loss (default: the task loss); `sam` overrides whether this step is a SAM/ASAM
    step (default: the run's optimizer is sam or asam); `perturb` limits the perturbation to these parameters
    (default: every trainable parameter; SQuAT perturbs the latent weights, not the step sizes)."""
    o = cfg.optimizer
    engine.module.train()  # dropout on: from_pretrained hands the model over in eval mode
    if sam is None and o.name != "adam" and not (o.every_step_sam and o.sam_between == "adam"):
        step = engine.lr_scheduler.last_epoch  # steps applied so far (resume restores it)
        sam = cheap_sam.sam_step_due(o.sam_every, o.sam_fraction, cfg.train.seed, step)
        if o.sam_between == "looksam":
            return looksam_step(engine, batch, cfg, loss_fn, sam)
    if not (o.name != "adam" if sam is None else sam):
        loss = loss_fn(engine, batch)
        engine.backward(loss)
        optimizer_step(engine)
        return loss.item()

    params = perturb if perturb is not None else [p for p in engine.module.parameters() if p.requires_grad]
    device = params[0].device
    scaler = grad_scaler(engine)
    # The RNG comes back to its state before this pass, so the second pass draws the same dropout masks.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast(cfg, device):
            loss = loss_fn(engine.module, batch)
        scale = scaler.get_scale() if scaler is not None else 1.0
        grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, params, allow_unused=True)
    if o.sam_scope == "global":
        grads = all_reduce_mean(grads)
    if scaler is not None and not torch.isfinite(torch.stack(torch._foreach_norm([g for g in grads if g is not None]))).all():
        grads = [None] * len(params)  # fp16 overflow: no ascent step; the engine's scaler skips this step
    saved = backup_buffers(engine, params)
    with torch.no_grad():
        torch._foreach_copy_(saved, params)
    perturb_(params, grads, o.rho, adaptive=o.name == "asam", eta=o.eta)
    del grads  # free them before the second pass
    engine.backward(loss_fn(engine, batch))
    with torch.no_grad():
        torch._foreach_copy_(params, saved)  # restore by copy: exactly w again
    optimizer_step(engine)
    return loss.item()


def looksam_step(engine, batch: dict, cfg: RunConfig, loss_fn, sam: bool) -> float:
    """One LookSAM step (flatray.methods.cheap_sam). Its gradients are taken outside the engine (autograd.grad, as
    SAM's first one) and the direction reaches the engine through the backward of sum(<w, direction>), whose gradient
    is exactly the direction: DeepSpeed's ZeRO 0/1/2 hooks, all-reduce and clipping then apply as to any gradient.
    A step without a stored g_v (the first, or the first after a resume: it lives in memory only) is a SAM step."""
    o = cfg.optimizer
    params = [p for p in engine.module.parameters() if p.requires_grad]
    device = params[0].device
    g_v = getattr(engine, "_flatray_looksam_gv", None)
    if not sam and g_v is not None:
        with autocast(cfg, device):
            loss = loss_fn(engine.module, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        direction = cheap_sam.reconstruct(grads, g_v, o.looksam_alpha)
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast(cfg, device):
                loss = loss_fn(engine.module, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        if o.sam_scope == "global":
            grads = all_reduce_mean(grads)
        saved = backup_buffers(engine, params)
        with torch.no_grad():
            torch._foreach_copy_(saved, params)
        perturb_(params, grads, o.rho, adaptive=o.name == "asam", eta=o.eta)
        with autocast(cfg, device):
            perturbed_loss = loss_fn(engine.module, batch)
        direction = torch.autograd.grad(perturbed_loss, params, allow_unused=True)
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        engine._flatray_looksam_gv = cheap_sam.orthogonal(grads, direction)
    del grads
    engine.backward(torch.stack([(p * d.to(p.dtype)).sum() for p, d in zip(params, direction) if d is not None]).sum())
    optimizer_step(engine)
    return loss.item()


def backup_buffers(engine, params: list) -> list:
    """Where SAM keeps w during the second pass: allocated once per engine, not every step."""
    buffers = getattr(engine, "_flatray_sam_backup", None)
    if buffers is None or len(buffers) != len(params) or any(b.shape != p.shape for b, p in zip(buffers, params)):
        buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        engine._flatray_sam_backup = buffers
    return buffers


def all_reduce_mean(grads):
    """Average gradients over the data-parallel workers in one flat all-reduce."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return grads
    present = [g for g in grads if g is not None]
    flat = torch.cat([g.reshape(-1).float() for g in present])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, offset = [], 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()
    return out
