"""SQuAT: sharpness- and quantization-aware training (METHODS.md section 9).

A RECONSTRUCTION from the published abstract of P2 (Wang, Li, Qu, Metze, Strubell 2022, arXiv 2210.07171), which
is all that is public: the encoder's Linear weights are fake-quantized with LSQ at b bits (flatray.methods.lsq), the
student starts from a fine-tuned full-precision model and is distilled from it, and training alternates
  (A) a SAM/ASAM step on the latent weights w with the step sizes s frozen (the quantizer is re-applied to w + e;
      s is not perturbed), and
  (B) an optimizer step on s with w frozen (the LSQ gradient, no perturbation),
each for `period` optimizer steps in turn. Every open choice is an option of `SquatConfig`.

Freezing is done with the learning rate: one AdamW holds two groups, latent weights (lr_w = train.lr) and step
sizes (lr_s), and the schedule multiplies the frozen group's lr by 0, which leaves it bit-identical (AdamW's update
and its decoupled weight decay are both scaled by lr). Adam's moments of the frozen group still see its gradients.

The same code gives the baselines the sweep compares: LSQ-QAT (optimizer adam), with or without distillation, and
"SAM without the alternation" (alternate: false: one joint step on w and s, with the perturbation on w only).
"""

from __future__ import annotations

import torch

from flatray.config import RunConfig
from flatray.train.engine import initialize, lr_factor, train_step


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
