"""CoFi structured pruning (METHODS.md section 5; Xia et al. 2022, "Structured Pruning Learns Compact and Accurate
Models"), written for the plain transformers-5 BERT classes: kind cofi (alias: structured).

A student (a copy of the fine-tuned teacher) gets hard-concrete L0 masks (Louizos et al. 2018) on five structures:
whole attention layers, whole FFN layers, attention heads, FFN intermediate units and hidden dimensions
(flatray.methods.cofi_masks). The loss is distillation from the teacher plus a Lagrangian that pulls the expected
sparsity to a target ramping up linearly; the multipliers are trained by ascent. Then `prune` removes what the
deterministic masks zero and the smaller model is fine-tuned. Both phases run in DeepSpeed engines through the one
epoch loop (flatray.train.loop); the masks live outside the engine (`distill_step`). docs/cofi.md has every choice.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flatray.config.sections import CoFiConfig
from flatray.methods.cofi_masks import MASK_NAMES, STRUCTURE_KEY, CoFiMasks, attach, mask_optimizer
from flatray.methods.cofi_prune import NoAttention, count_prunable, load_pruned, prune, save_pruned, sparsity_of

__all__ = ["MASK_NAMES", "STRUCTURE_KEY", "CoFiConfig", "CoFiMasks", "NoAttention", "SparsityMissedError", "attach",
           "check_sparsity", "count_prunable", "distill_step", "kd_loss", "lagrangian", "layer_loss", "load_pruned",
           "mask_optimizer", "prune", "run", "save_pruned", "sparsity_of", "target_at"]

MASKS_FILE = "cofi_masks.safetensors"  # in a pruning-phase checkpoint: log_alpha and the multipliers, to read


# ---------------------------------------------------------------------------------------------------------------
# Losses


def target_at(step: int, ramp_steps: int, final: float) -> float:
    """The target sparsity at `step`: linear from 0 at step 0 to `final` at `ramp_steps`, then constant."""
    if ramp_steps <= 0:
        return final
    return final * min(1.0, step / ramp_steps)


def lagrangian(expected_sparsity, target, lambda_1, lambda_2) -> torch.Tensor:
    """lambda_1 * (s - t) + lambda_2 * (s - t)^2 (minimised by the masks, maximised by the lambdas)."""
    gap = expected_sparsity - target
    return lambda_1 * gap + lambda_2 * gap * gap


def kd_loss(student_logits, teacher_logits, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch. For one output (regression)
    the KL is undefined, so it is the MSE between the raw outputs (as CoFi does for STS-B)."""
    t = teacher_logits.detach()
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits, t)
    T = temperature
    return F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T


def distill_step(engine, masks: CoFiMasks, mask_opt, teacher, batch: dict, cfg, target: float) -> float:
    """One step of the pruning phase: distil `teacher` into the masked student (`engine`, attached to `masks`),
    with the Lagrangian pulling the expected sparsity to `target`; the engine steps the student, `mask_opt` the
    masks and multipliers. Returns the loss. `cfg` is the run config (its `cofi` section and precision).

    The masks live outside the engine, so their gradients are averaged over the workers here; with fp16 they are
    unscaled by the engine's loss scale, and a step the engine skips for overflow is skipped by `mask_opt` too.
    """
    from flatray.train.engine import all_reduce_mean, autocast, grad_scaler, optimizer_step

    sc = cfg.cofi
    hidden = bool(sc.alpha_layer)  # hidden states only when the layer distillation uses them
    engine.module.train()  # dropout on in the student; the teacher stays in eval mode
    with torch.no_grad(), autocast(cfg, batch["input_ids"].device):
        t_out = teacher(**batch, output_hidden_states=hidden)
    s_out = engine(**batch, output_hidden_states=hidden)
    loss = (lagrangian(masks.expected_sparsity(), target, masks.lambda_1, masks.lambda_2)
            + sc.alpha_ce * kd_loss(s_out.logits, t_out.logits, sc.temperature))  # MSE for regression
    if sc.alpha_layer:
        loss = loss + sc.alpha_layer * layer_loss(s_out.hidden_states, t_out.hidden_states,
                                                  attention_mask=batch.get("attention_mask"))
    engine.backward(loss)
    scaler = grad_scaler(engine)
    unscale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
    mask_params = list(masks.parameters())
    for p, g in zip(mask_params, all_reduce_mean([p.grad for p in mask_params])):
        if g is not None:
            p.grad.copy_(g * unscale if unscale != 1.0 else g)
    if optimizer_step(engine):
        mask_opt.step()
    mask_opt.zero_grad()
    return loss.item()


def layer_transform(hidden_size: int) -> nn.Linear:
    """CoFi's learnable map applied to student hidden states before the MSE; starts as the identity so the loss
    starts as plain MSE. Train it with the model's weights; it is not part of the pruned model."""
    lin = nn.Linear(hidden_size, hidden_size)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(hidden_size))
        lin.bias.zero_()
    return lin


def layer_loss(student_hidden: tuple, teacher_hidden: tuple, transform: nn.Module | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over encoder layers i = 1..L of MSE(transform(student_hidden[i]), teacher_hidden[i]): a fixed
    mapping, student layer i <-> teacher layer i (index 0, the embeddings, is left out). With an attention_mask
    the MSE averages over real tokens only."""
    total = student_hidden[0].new_zeros(())
    for s, t in zip(student_hidden[1:], teacher_hidden[1:]):
        s = transform(s) if transform is not None else s
        err = (s - t.detach()).pow(2)
        if attention_mask is None:
            total = total + err.mean()
        else:
            m = attention_mask.unsqueeze(-1).to(err.dtype)
            total = total + (err * m).sum() / (m.sum() * err.shape[-1])
    return total


# ---------------------------------------------------------------------------------------------------------------
# The run


class SparsityMissedError(ValueError):
    """The pruned model's sparsity is outside target_sparsity +- sparsity_tolerance."""


def check_sparsity(sparsity: float, expected: float, sc: CoFiConfig, steps_per_epoch: int, ramp: int) -> None:
    """Fail the run when the pruned model is not within the tolerance of the target (P1: 95% accepted within 1%),
    saying whether the Lagrangian had not brought the expected sparsity there (too few steps for the descent-ascent
    to settle) or the whole structures could not realize it."""
    target, tol = sc.target_sparsity, sc.sparsity_tolerance
    if abs(sparsity - target) <= tol:
        return
    settle = sc.prune_epochs * steps_per_epoch - ramp
    if abs(expected - target) > tol:
        why = (f"the Lagrangian had not brought the expected sparsity to the target by the end of the pruning phase "
               f"(it was {expected:.1%}; {settle} steps after the {ramp}-step ramp). The multipliers and masks "
               f"oscillate around the target before they settle: give them more steps after the ramp (more "
               f"cofi.prune_epochs, or a smaller cofi.ramp_fraction), or faster masks (cofi.lr_masks; cofi.lr_lambdas "
               f"when the multipliers are slow to outgrow the distillation loss)")
    else:
        why = (f"the expected sparsity was {expected:.1%}, but whole heads, units and hidden dims cannot realize "
               f"it on this model (every unit kept, or none): widen cofi.sparsity_tolerance or change the target")
    raise SparsityMissedError(f"CoFi ended at {sparsity:.1%} sparsity, target {target:.1%} +- {tol:.1%} "
                         f"(cofi.sparsity_tolerance): {why}")


def run(ctx) -> None:
    """Distil the teacher (model: a checkpoint) into a masked student for prune_epochs (phase 1), remove what the
    masks prune, fine-tune the smaller model for finetune_epochs (phase 2; its best checkpoint is the run's model).
    Every epoch ends with a checkpoint; a retried run continues in the phase, at the step where its last one was
    saved (phase 1's masks and their optimizer are checkpointed with the engine)."""
    from safetensors.torch import save_file

    from flatray import models
    from flatray.train import checkpoint, loop
    from flatray.train.context import seed_everything
    from flatray.train.engine import build_engine, train_step

    cfg, sc = ctx.cfg, ctx.cfg.cofi
    loader = ctx.train_loader()
    seed_everything(cfg.train.seed)
    teacher = models.load_model(cfg.model, ctx.spec).to(ctx.device).eval().requires_grad_(False)
    student = models.load_model(cfg.model, ctx.spec)
    ramp = sc.ramp_steps or max(1, int(sc.ramp_fraction * sc.prune_epochs * len(loader)))
    masks = CoFiMasks(student.config, sc)
    pruned = {}
    resumed = ctx.resumed
    history = resumed.history if resumed else []
    if resumed and resumed.position and resumed.position.phase == 2:  # past the pruning: the smaller model's folder
        pruned["model"] = load_pruned(resumed.folder)
    totals = {"teacher_params": sum(p.numel() for p in teacher.parameters())}
    prunable_before = count_prunable(teacher)
    if "model" not in pruned:
        masks.to(ctx.device)
        mask_opt = mask_optimizer(masks)
        detach = attach(student, masks)
        engine = build_engine(student, cfg, ctx.world, total_steps=sc.prune_epochs * len(loader))
        seed_everything(cfg.train.seed + ctx.rank)

        def evaluate() -> dict:
            masks.eval()  # the deterministic masks
            metrics = ctx.evaluate(engine.module)
            masks.train()
            return metrics

        def save_masked(folder: Path, metrics: dict, hist: list[dict]) -> None:
            checkpoint.save_model(folder, engine.module, ctx.tokenizer, cfg, metrics, hist)
            save_file({k: v.detach().contiguous().cpu() for k, v in masks.state_dict().items()}, str(folder / MASKS_FILE))

        def mask_state() -> dict:  # outside the engine: checkpointed with it (flatray.train.loop.Phase.state)
            return {"masks": masks.state_dict(), "optimizer": mask_opt.state_dict()}

        def load_mask_state(state: dict) -> None:
            masks.load_state_dict(state["masks"])
            mask_opt.load_state_dict(state["optimizer"])

        target = {"now": 0.0}

        def step(batch: dict, n: int) -> float:
            target["now"] = target_at(n, ramp, sc.target_sparsity)
            return distill_step(engine, masks, mask_opt, teacher, batch, cfg, target["now"])

        pruning = loop.Phase(
            engine, loader, range(1, sc.prune_epochs + 1), step=step, save=save_masked, evaluate=evaluate,
            metrics=lambda: {"target_sparsity": target["now"], "expected_sparsity": masks.expected_sparsity().item(),
                             "mask_sparsity": masks.deterministic_sparsity(), "lambda_1": masks.lambda_1.item(),
                             "lambda_2": masks.lambda_2.item()},
            label="prune epoch", number=1, output=False, state=mask_state, load_state=load_mask_state)
        loop.run_phase(ctx, pruning, history)
        detach()
        masks.eval()
        pruned["model"] = prune(engine.module, masks)
        del engine
        check_sparsity(1 - count_prunable(pruned["model"]) / prunable_before, masks.expected_sparsity().item(),
                       sc, len(loader), ramp)
    small = pruned["model"].train()
    totals.update(params=sum(p.numel() for p in small.parameters()),
                  sparsity=1 - count_prunable(small) / prunable_before)
    ctx.log(f"pruned: {totals['params']:,} parameters (teacher {totals['teacher_params']:,}), "
            f"sparsity {totals['sparsity']:.4f} over the encoder's Q/K/V/O/FFN weights")
    engine = build_engine(small, cfg, ctx.world, total_steps=max(1, sc.finetune_epochs * len(loader)))

    def save_small(folder: Path, metrics: dict, hist: list[dict]) -> None:
        save_pruned(engine.module, folder)
        ctx.tokenizer.save_pretrained(folder)
        checkpoint.write_run_files(folder, cfg, metrics, hist)

    first = sc.prune_epochs + 1  # 0 fine-tuning epochs: one evaluation of the pruned model, saved as it is
    finetuning = loop.Phase(
        engine, loader, range(first, first + max(1, sc.finetune_epochs)),
        step=(lambda batch, _: train_step(engine, batch, cfg)) if sc.finetune_epochs else None,
        save=save_small, metrics=lambda: dict(totals), label="fine-tune epoch", number=2)
    loop.run_phase(ctx, finetuning, history)
