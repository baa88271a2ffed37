"""SQuAT: sharpness- and quantization-aware training (METHODS.md section 9).

A RECONSTRUCTION from the published abstract of P2 (Wang, Li, Qu, Metze, Strubell 2022, arXiv 2210.07171), which
is all that is public: the encoder's Linear weights are fake-quantized with LSQ at b bits (flatray.methods.lsq), the
student starts from a fine-tuned full-precision model and is distilled from it, and training alternates
  (A) a SAM/ASAM step on the latent weights w with the step sizes s frozen (the quantizer is re-applied to w + e;
      s is not perturbed), and
  (B) an optimizer step on s with w frozen (the LSQ gradient, no perturbation),
each for `period` optimizer steps in turn. Every open choice is an option of `SquatConfig`. `run` is the whole
run: the student, its engine and the epoch loop (flatray.train.loop).

Freezing is done with the learning rate: one AdamW holds two groups, latent weights (lr_w = train.lr) and step
sizes (lr_s), and the schedule multiplies the frozen group's lr by 0, which leaves it bit-identical (AdamW's update
and its decoupled weight decay are both scaled by lr). Adam's moments of the frozen group still see its gradients.

The same code gives the baselines the sweep compares: LSQ-QAT (optimizer adam), with or without distillation, and
"SAM without the alternation" (alternate: false: one joint step on w and s, with the perturbation on w only).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from flatray.config import RunConfig
from flatray.methods import lsq
from flatray.methods.cofi import kd_loss
from flatray.train.engine import autocast, initialize, lr_factor, train_step


def phase(step: int, cfg: RunConfig) -> str:
    """'A' (weights), 'B' (step sizes) or 'joint' for optimizer step number `step` (0-based)."""
    if not cfg.squat.alternate:
        return "joint"
    return "A" if (step // cfg.squat.period) % 2 == 0 else "B"


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, total_steps: int):
    """A DeepSpeed engine over AdamW with two groups (latent weights, step sizes), each with its own lr and a
    schedule that is the run's linear schedule times 0 while the group is frozen."""
    from flatray.methods import lsq

    steps = lsq.step_size_params(model)
    latent = lsq.latent_params(model)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": latent, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay},
         {"params": steps, "lr": cfg.squat.lr_steps, "weight_decay": 0.0}],
        betas=o.betas, eps=o.eps,
    )
    linear = lr_factor(cfg, total_steps)

    def weights(step):
        return linear(step) * (phase(step, cfg) != "B")

    def step_sizes(step):
        return linear(step) * (phase(step, cfg) != "A")

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [weights, step_sizes])
    return initialize(model, optimizer, schedule, cfg, world_size)


def steps_taken(engine) -> int:
    """Optimizer steps applied so far: the schedule's count, which fp16 steps skipped on overflow do not advance
    (`flatray.train.engine.optimizer_step`). The phase comes from it, so the phase that picks SAM and the phase that
    freezes a group through the lr can never disagree."""
    return engine.lr_scheduler.last_epoch


def squat_step(engine, batch: dict, cfg: RunConfig, loss_fn, latent: list) -> float:
    """One optimizer step of the alternation: SAM/ASAM on the latent weights in phase A and in a joint step (when
    the run's optimizer is sam/asam), a plain gradient step in phase B."""
    sam = cfg.optimizer.name != "adam" and phase(steps_taken(engine), cfg) != "B"
    return train_step(engine, batch, cfg, loss_fn=loss_fn, sam=sam, perturb=latent)


def distillation_loss(model, batch: dict, teacher_out, cfg: RunConfig):
    """SQuAT's objective: weighted task loss + logit KD (+ hidden-state and attention MSE) to the teacher."""
    sq = cfg.squat
    out = model(**batch, output_hidden_states=bool(sq.kd_hidden), output_attentions=bool(sq.kd_attention))
    loss = sq.task_loss * out.loss if sq.task_loss else 0.0
    if sq.kd_logits:
        pairs = ([(out.start_logits, teacher_out.start_logits), (out.end_logits, teacher_out.end_logits)]
                 if hasattr(out, "start_logits") else [(out.logits, teacher_out.logits)])
        loss = loss + sq.kd_logits * sum(kd_loss(s, t, sq.kd_temperature) for s, t in pairs) / len(pairs)
    if sq.kd_hidden:
        loss = loss + sq.kd_hidden * sum(F.mse_loss(s, t) for s, t in zip(out.hidden_states, teacher_out.hidden_states))
    if sq.kd_attention:
        loss = loss + sq.kd_attention * sum(F.mse_loss(s, t) for s, t in zip(out.attentions, teacher_out.attentions))
    return loss


def run(ctx) -> None:
    """kind: squat: low-bit LSQ quantization-aware training of a copy of the teacher (model: a checkpoint),
    distilled from it. A checkpoint holds the exported model (integer codes packed at b bits + step sizes); the
    latent weights a retried run continues from are in its engine state (flatray.train.checkpoint)."""
    from flatray import models
    from flatray.train import checkpoint, loop
    from flatray.train.context import seed_everything

    cfg, sq = ctx.cfg, ctx.cfg.squat
    loader = ctx.train_loader()
    seed_everything(cfg.train.seed)
    extra = {"attn_implementation": "eager"} if sq.kd_attention else {}  # attention probabilities need eager
    teacher = models.load_model(cfg.model, ctx.spec, **extra).to(ctx.device).eval().requires_grad_(False)
    student = lsq.quantize_model(models.load_model(cfg.model, ctx.spec, **extra), lsq.QuantSpec.of(sq))
    history = ctx.resumed.history if ctx.resumed else []  # the engine's state comes back in loop.run_phase
    student.to(ctx.device)
    if not ctx.resumed:  # activation step sizes start from one batch, the same on every worker
        train = ctx.tokenized.train
        batch = ctx.collate([train[i] for i in range(min(cfg.train.batch_size, len(train)))])
        with torch.no_grad():
            student(**{k: v.to(ctx.device) for k, v in batch.items()})
    latent = lsq.latent_params(student)
    engine = build_engine(student, cfg, ctx.world, total_steps=cfg.train.epochs * len(loader))
    seed_everything(cfg.train.seed + ctx.rank)

    def step(batch: dict, _) -> float:
        with torch.no_grad(), autocast(cfg, ctx.device):
            target = teacher(**batch, output_hidden_states=bool(sq.kd_hidden), output_attentions=bool(sq.kd_attention))
        return squat_step(engine, batch, cfg, partial(distillation_loss, teacher_out=target, cfg=cfg), latent)

    def save(folder: Path, metrics: dict, hist: list[dict]) -> None:
        lsq.export(engine.module, folder / lsq.EXPORT_FILE)
        metrics["export_bytes"] = (folder / lsq.EXPORT_FILE).stat().st_size
        ctx.tokenizer.save_pretrained(folder)
        checkpoint.write_run_files(folder, cfg, metrics, hist)

    phase = loop.Phase(
        engine, loader, range(1, cfg.train.epochs + 1), step=step, save=save,
        metrics=lambda: {**lsq.level_fractions(engine.module), **lsq.mean_step_sizes(engine.module)},
        keep_best=cfg.sharpness.enabled)
    loop.run_phase(ctx, phase, history)
    if cfg.sharpness.enabled:  # the best model's export is written again with its sharpness
        loop.report_best_with_sharpness(ctx, phase, history, drop=("export_bytes",))
