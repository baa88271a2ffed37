"""THE epoch loop: every method that trains (fine-tuning, both CoFi phases, SQuAT) runs its epochs here.

Each epoch: the method's step on every batch of the worker's shard, evaluation on the dev sets, the epoch's metrics
(the method adds its own), and a report to Ray Train from every worker. Rank 0 attaches a checkpoint when the dev
score beats the phase's best (or every epoch, for a phase whose latest state is what a resumed run needs), so the
latest checkpoint Ray keeps is where a retried run continues: `run_phase` starts after the last epoch in the
history the method restored (flatray.train.checkpoint.restore), with the lr schedule where it was.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flatray.train.context import RunContext

PROGRESS_EVERY_S = 30
DIVERGED = "the run diverged"  # flatray.sweep.trial does not retry a run whose error says this


class Diverged(RuntimeError):
    """The loss or the weights became non-finite: the run stops at once and is never reported as done."""


def _diverged(ctx: RunContext, where: str, what: str) -> Diverged:
    cfg = ctx.cfg
    return Diverged(f"{DIVERGED} at {where}: {what} (train.lr {cfg.train.lr}, optimizer {cfg.optimizer.name} rho "
                    f"{cfg.optimizer.rho}, precision {cfg.deepspeed.precision}); try a lower train.lr or "
                    f"optimizer.rho, or fp32")


def _check_weights(ctx: RunContext, module, where: str) -> None:
    import torch

    named = list(module.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])  # one device sync, not one per tensor
    if not bool(finite.all()):
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        raise _diverged(ctx, where, f"non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}")


@dataclass
class Phase:
    engine: Any  # the DeepSpeed engine that trains
    loader: Any  # the worker's DataLoader (a DistributedSampler inside)
    epochs: range  # the epoch numbers of this phase (CoFi's fine-tuning continues the count of its pruning)
    step: Callable[[dict, int], float] | None  # (batch on the device, steps done in this phase) -> loss; None: no training
    save: Callable[[Path, dict, list[dict]], None]  # (folder, the epoch's metrics, history) -> a checkpoint
    metrics: Callable[[], dict] = dict  # the method's own metrics of the epoch, after evaluation
    evaluate: Callable[[], dict] | None = None  # default: ctx.evaluate(engine.module)
    label: str = "epoch"
    number: int | None = None  # recorded as `phase` in its metrics when a method has several
    checkpoint_every_epoch: bool = False  # the latest state, not the best, is what resuming this phase needs
    keep_best: bool = False  # keep the best epoch's weights in memory (its sharpness is measured at the end)
    best_state: dict | None = field(default=None, init=False)


def _mine(history: list[dict], phase: Phase) -> list[dict]:
    return [h for h in history if h.get("phase") == phase.number]


def run_phase(ctx: RunContext, phase: Phase, history: list[dict]) -> list[dict]:
    """Run the epochs of `phase` not yet in `history` (appended to it, and returned)."""
    engine, steps_per_epoch = phase.engine, len(phase.loader)
    done = [h["epoch"] for h in _mine(history, phase) if h["epoch"] in phase.epochs]
    todo = [e for e in phase.epochs if e > max(done, default=phase.epochs.start - 1)]
    for _ in range(len(done) * steps_per_epoch if phase.step else 0):
        engine.lr_scheduler.step()  # the schedule continues where the checkpoint left it
    best = max((h["score"] for h in _mine(history, phase)), default=-math.inf)
    if done:
        ctx.log(f"resumed after {phase.label} {done[-1]} (best score {best:.4f})")
        if phase.keep_best:  # the restored weights are the best so far (Ray keeps the best checkpoint)
            phase.best_state = _clone(engine.module)
    for epoch in todo:
        start = last_note = time.perf_counter()
        losses = []
        if phase.step:
            phase.loader.sampler.set_epoch(epoch)
            for i, batch in enumerate(phase.loader):
                losses.append(phase.step({k: v.to(ctx.device) for k, v in batch.items()},
                                         (epoch - phase.epochs.start) * steps_per_epoch + i))
                # fp16 may overflow a step's loss; the loss scaler then skips that step (the weights stay finite).
                if not math.isfinite(losses[-1]) and ctx.cfg.deepspeed.precision != "fp16":
                    raise _diverged(ctx, f"{phase.label} {epoch} step {i + 1}", f"loss {losses[-1]}")
                if time.perf_counter() - last_note > PROGRESS_EVERY_S:
                    # Progress as plain lines: they read well in Ray's forwarded logs, files and CI alike.
                    last_note = time.perf_counter()
                    ctx.log(f"{phase.label} {epoch}/{phase.epochs[-1]} step {i + 1}/{steps_per_epoch} loss "
                            f"{np.mean(losses[-50:]):.4f} ({(i + 1) / (last_note - start):.2f} steps/s)")
            _check_weights(ctx, engine.module, f"the end of {phase.label} {epoch}")
        metrics = phase.evaluate() if phase.evaluate else ctx.evaluate(engine.module)
        metrics.update(phase.metrics())
        metrics.update(epoch=epoch, train_loss=float(np.mean(losses)) if losses else float("nan"),
                       lr=engine.get_lr()[0], epoch_seconds=time.perf_counter() - start)
        if phase.number is not None:
            metrics["phase"] = phase.number
        improved = metrics["score"] > best
        best = max(best, metrics["score"])
        metrics["best_score"] = best
        history.append(metrics)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(ctx.spec.eval_splits))
        ctx.log(f"{phase.label} {epoch}/{phase.epochs[-1]}  train_loss {metrics['train_loss']:.4f}  {shown}  "
                f"({metrics['epoch_seconds']:.1f} s){'  *best*' if improved else ''}")
        if improved and phase.keep_best:
            phase.best_state = _clone(engine.module)
        save = (lambda folder, m=metrics: phase.save(folder, m, history))
        ctx.report(metrics, save if improved or phase.checkpoint_every_epoch else None)
    return history


def report_best_with_sharpness(ctx: RunContext, phase: Phase, history: list[dict], drop: tuple[str, ...] = ()) -> None:
    """The best dev model's sharpness, reported with its checkpoint as the run's last word, so Ray, summary.json
    and W&B have it whichever epoch was best. `drop`: metrics of the best epoch its checkpoint rewrites."""
    from flatray.methods.sharpness import sharpness_metrics

    phase.engine.module.load_state_dict(phase.best_state)
    best = max(_mine(history, phase), key=lambda m: m["score"])
    final = {k: v for k, v in best.items() if k not in drop}
    final.update(sharpness_metrics(ctx, phase.engine.module))
    ctx.report(final, lambda folder: phase.save(folder, final, history))


def _clone(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
