"""THE epoch loop: every method that trains (fine-tuning, both CoFi phases, SQuAT) runs its epochs here.

Each epoch: the method's step on every batch of the worker's shard, evaluation on the dev sets, the epoch's metrics
(the method adds its own), and a report to Ray Train from every worker with a checkpoint: the method's files (rank
0) and the state that continuing exactly needs (every worker: flatray.train.checkpoint). With
`train.checkpoint_every_steps` N, also every N steps of a phase. A retried or resumed run restores the latest
checkpoint, and `run_phase` puts its state back and continues at the very step where it was saved. After the
epochs, a run may report one more model as its last word: the best epoch's with its sharpness, or SWA's average.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flatray.train import checkpoint
from flatray.train.checkpoint import Position
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
    save: Callable[[Path, dict, list[dict]], None]  # (folder, the epoch's metrics, history) -> the method's files
    metrics: Callable[[], dict] = dict  # the method's own metrics of the epoch, after evaluation
    evaluate: Callable[[], dict] | None = None  # default: ctx.evaluate(engine.module)
    label: str = "epoch"
    number: int | None = None  # recorded as `phase` in its metrics when a method has several
    output: bool = True  # its checkpoints hold the run's output: its best one is kept (not CoFi's masked student,
    # nor the epochs of an SWA run, whose output is the average: report_average)
    keep_best: bool = False  # keep the best epoch's weights in memory (its sharpness is measured at the end)
    state: Callable[[], dict] | None = None  # the method's own state outside the engine (CoFi: masks), checkpointed
    load_state: Callable[[dict], None] | None = None  # puts `state()` back in a resumed run
    best_state: dict | None = field(default=None, init=False)


def _mine(history: list[dict], phase: Phase) -> list[dict]:
    return [h for h in history if h.get("phase") == phase.number]


def run_phase(ctx: RunContext, phase: Phase, history: list[dict]) -> list[dict]:
    """Run the epochs of `phase` not yet done (appended to `history`, and returned)."""
    engine, steps_per_epoch = phase.engine, len(phase.loader)
    at = _resume(ctx, phase, history)
    best = max((h["score"] for h in _mine(history, phase)), default=-math.inf)
    every = ctx.cfg.train.checkpoint_every_steps
    for epoch in range(at.epoch, phase.epochs.stop):
        first, losses, before = (at.step, list(at.losses), at.seconds) if epoch == at.epoch else (0, [], 0.0)
        start = last_note = time.perf_counter() - before
        if phase.step:
            phase.loader.sampler.set_epoch(epoch)
            batches = iter(phase.loader)
            for _ in range(first):  # done before the checkpoint (an epoch's order is fixed by its seed)
                next(batches)
            for i, batch in enumerate(batches, start=first):
                done = (epoch - phase.epochs.start) * steps_per_epoch + i  # steps of this phase before this one
                losses.append(phase.step({k: v.to(ctx.device) for k, v in batch.items()}, done))
                # fp16 may overflow a step's loss; the loss scaler then skips that step (the weights stay finite).
                if not math.isfinite(losses[-1]) and ctx.cfg.deepspeed.precision != "fp16":
                    raise _diverged(ctx, f"{phase.label} {epoch} step {i + 1}", f"loss {losses[-1]}")
                if time.perf_counter() - last_note > PROGRESS_EVERY_S:
                    # Progress as plain lines: they read well in Ray's forwarded logs, files and CI alike.
                    last_note = time.perf_counter()
                    ctx.log(f"{phase.label} {epoch}/{phase.epochs[-1]} step {i + 1}/{steps_per_epoch} loss "
                            f"{np.mean(losses[-50:]):.4f} ({(i + 1) / (last_note - start):.2f} steps/s)")
                if every and (done + 1) % every == 0 and i + 1 < steps_per_epoch:
                    _report_step(ctx, phase, history, Position(phase.number, epoch, i + 1, list(losses),
                                                               time.perf_counter() - start))
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
        ctx.report(metrics, lambda folder, m=metrics: phase.save(folder, m, history), best=improved and phase.output,
                   state=_saver(ctx, phase, Position(phase.number, epoch + 1)))
    return history


def _resume(ctx: RunContext, phase: Phase, history: list[dict]) -> Position:
    """Where `phase` starts: at its first epoch, or, when the run restored a checkpoint of this phase, where that
    checkpoint was saved, with the engine, the method's state, the RNG streams (and the best weights) put back."""
    resumed = ctx.resumed
    if resumed is None or resumed.position is None or resumed.position.phase != phase.number:
        return Position(phase.number, phase.epochs.start)
    own = checkpoint.restore_state(resumed, ctx, phase.engine)
    if phase.load_state is not None:
        phase.load_state(own)
    if phase.keep_best:
        phase.best_state = checkpoint.load_best(resumed)
    at = resumed.position
    best = max((h["score"] for h in _mine(history, phase)), default=-math.inf)
    ctx.log(f"resumed at {phase.label} {at.epoch} step {at.step} (best score {best:.4f})")
    return at


def _saver(ctx: RunContext, phase: Phase, position: Position) -> Callable[[Path], None]:
    """What every worker adds to a checkpoint of `phase` so that a run can continue from `position`."""
    return lambda folder: checkpoint.save_state(folder, ctx, phase.engine, position,
                                                phase.state() if phase.state else None,
                                                phase.best_state if phase.keep_best else None)


def _report_step(ctx: RunContext, phase: Phase, history: list[dict], position: Position) -> None:
    """A checkpoint inside an epoch. Its report repeats what is known (the last epoch's metrics) with the step, so
    that Tune, ASHA and W&B see no new epoch; before the first epoch ends the score is not known yet."""
    known = dict(history[-1]) if history else {"epoch": phase.epochs.start - 1, "score": math.nan}
    ctx.log(f"checkpoint at {phase.label} {position.epoch} step {position.step}")
    ctx.report({**known, "checkpoint_step": position.step}, lambda folder: phase.save(folder, dict(known), history),
               best=False, state=_saver(ctx, phase, position))


def report_best_with_sharpness(ctx: RunContext, phase: Phase, history: list[dict], drop: tuple[str, ...] = ()) -> None:
    """The best dev model's sharpness, reported with its checkpoint as the run's last word, so Ray, summary.json
    and W&B have it whichever epoch was best. `drop`: metrics of the best epoch its checkpoint rewrites."""
    from flatray.methods.sharpness import sharpness_metrics

    if phase.best_state is None:
        raise RuntimeError("no best weights to measure: the run continued from a checkpoint written without "
                           "sharpness.enabled and no later epoch beat it")
    module = phase.engine.module
    last = _clone(module)
    module.load_state_dict(phase.best_state)
    best = max(_mine(history, phase), key=lambda m: m["score"])
    final = {k: v for k, v in best.items() if k not in drop}
    final.update(sharpness_metrics(ctx, module))
    _report_last(ctx, phase, history, final, last)


def report_average(ctx: RunContext, phase: Phase, history: list[dict], averager) -> None:
    """SWA: the averaged weights (flatray.train.swa) are the run's model. Evaluated (with the method's metrics, and
    the sharpness when enabled) and reported with their checkpoint, marked best, as the run's last word; its epoch,
    train_loss and lr are those of the last epoch."""
    from flatray.methods.sharpness import sharpness_metrics

    module = phase.engine.module
    last = _clone(module)
    averager.copy_to(module)
    final = {k: v for k, v in _mine(history, phase)[-1].items() if k in ("epoch", "train_loss", "lr", "phase")}
    final.update(phase.metrics())  # finetune: re-applies an IMP mask (a guard: the average of zeros is zero)
    final.update(phase.evaluate() if phase.evaluate else ctx.evaluate(module))
    final.update(averager.metrics())
    if ctx.cfg.sharpness.enabled:
        final.update(sharpness_metrics(ctx, module))
    ctx.log(f"SWA of {len(averager.averaged)} points {averager.averaged}: score {final['score']:.4f}")
    _report_last(ctx, phase, history, final, last)


def _report_last(ctx: RunContext, phase: Phase, history: list[dict], final: dict, last: dict) -> None:
    """Report `final` with a checkpoint of the module as it is now, the run's model (best); the engine state in it
    holds the `last` weights (a run that continues after this checkpoint continues the last epoch)."""
    module = phase.engine.module
    save_state = _saver(ctx, phase, Position(phase.number, phase.epochs.stop))

    def state(folder: Path) -> None:
        module.load_state_dict(last)
        save_state(folder)

    ctx.report(final, lambda folder: phase.save(folder, final, history), state=state)


def _clone(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
