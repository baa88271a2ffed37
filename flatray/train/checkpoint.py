"""Checkpoints: what each one holds, and how a run continues from one exactly.

Every checkpoint folder carries the resolved run config (`flatray_run.yaml`), the metrics of its report
(`metrics.json`), the metrics of every epoch so far (`history.json`) and the method's output as it is at that point:
for fine-tuning a plain Hugging Face model folder (config.json, model.safetensors, tokenizer files) plus, for pruned
runs, `mask.safetensors`. Ray Train keeps two: the one whose report said `BEST` (the best dev model so far: what
children, the report and W&B read) and the latest (where a retried or resumed run continues).

A checkpoint of a training phase also holds `resume/`, the state that continuing exactly needs:
  resume/position.json    where the run is: phase, epoch, steps done in it (the DistributedSampler's order of an
                          epoch is fixed, so the consumed batches are skipped), the epoch's losses so far
  resume/engine/state/    the DeepSpeed engine (`engine.save_checkpoint`): weights, optimizer moments (one partition
                          per rank at ZeRO 1/2), lr schedule, step counters, and the method's own state outside the
                          engine (CoFi: its masks and their optimizer)
  resume/rng_rank<r>.pt   each worker's python, numpy, torch (and CUDA) RNG states: dropout differs across workers
  resume/best.safetensors the best epoch's weights, for runs that measure the best model's sharpness at the end
A run killed and started again under its name then ends bit-identical to one that was never stopped.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flatray import storage
from flatray.config import RunConfig

HISTORY_FILE = "history.json"
RESUME_DIR = "resume"
POSITION_FILE = "position.json"
BEST_FILE = "best.safetensors"
ENGINE_DIR, ENGINE_TAG = "engine", "state"
METHOD_STATE = "flatray_method"  # the method's own state, in the engine checkpoint's client state
BEST = "is_best"  # reported with every checkpoint: 1 when it holds the best model so far (Ray keeps the latest such)


def write_run_files(folder: Path, cfg: RunConfig, metrics: dict, history: list[dict] | None = None) -> None:
    (folder / "flatray_run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (folder / "metrics.json").write_text(storage.strict_json(metrics))
    if history is not None:
        (folder / HISTORY_FILE).write_text(storage.strict_json(history))


def save_model(folder: Path, module, tokenizer, cfg: RunConfig, metrics: dict, history: list[dict], masks=None,
               mask_meta: dict | None = None) -> None:
    """A Hugging Face model folder + the run files (+ the unstructured mask)."""
    from flatray.methods import imp

    module.save_pretrained(folder, safe_serialization=True)
    if masks is not None:
        imp.save_masks(folder / imp.MASK_FILE, masks, **(mask_meta or {}))
    tokenizer.save_pretrained(folder)
    write_run_files(folder, cfg, metrics, history)


@dataclass
class Position:
    """Where a phase continues: epoch `epoch` after `step` of its batches (with their `losses` and `seconds`)."""

    phase: int | None
    epoch: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Resumed:
    """The checkpoint a retried or resumed run restored (its folder stays readable while the run lasts)."""

    folder: Path
    history: list[dict]
    position: Position | None  # None: the checkpoint of a method that does not train (ptq, sharpness)
    world: int | None = None
    zero_stage: int | None = None


def read(folder: Path) -> Resumed:
    history = json.loads((folder / HISTORY_FILE).read_text()) if (folder / HISTORY_FILE).exists() else []
    path = folder / RESUME_DIR / POSITION_FILE
    if not path.exists():
        return Resumed(folder, history, None)
    raw = json.loads(path.read_text())
    losses = [math.nan if x is None else x for x in raw["losses"]]  # strict JSON wrote an fp16 overflow as null
    position = Position(raw["phase"], raw["epoch"], raw["step"], losses, raw["seconds"])
    return Resumed(folder, history, position, raw["world"], raw["zero_stage"])


def save_state(folder: Path, ctx, engine, position: Position, method_state: dict | None = None,
               best_state: dict | None = None) -> None:
    """resume/ of a checkpoint, written by every worker into its own copy of the folder (Ray Train merges them)."""
    import torch

    resume = folder / RESUME_DIR
    resume.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(resume / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False,
                           client_state={METHOD_STATE: method_state} if method_state is not None else {})
    if ctx.rank == 0:
        state = {"phase": position.phase, "epoch": position.epoch, "step": position.step,
                 "losses": position.losses, "seconds": position.seconds, "world": ctx.world,
                 "zero_stage": ctx.cfg.deepspeed.zero_stage}
        (resume / POSITION_FILE).write_text(storage.strict_json(state))
        if best_state is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, str(resume / BEST_FILE))
    # Last, so that nothing the saving did moves the RNG past what is recorded.
    torch.save(rng_state(), resume / f"rng_rank{ctx.rank}.pt")


def restore_state(resumed: Resumed, ctx, engine) -> dict | None:
    """Put the engine and this worker's RNG back as `save_state` found them; returns the method's own state."""
    import torch

    cfg = ctx.cfg
    if (resumed.world, resumed.zero_stage) != (ctx.world, cfg.deepspeed.zero_stage):
        raise ValueError(f"checkpoint {resumed.folder} was written by {resumed.world} worker(s) at ZeRO "
                         f"{resumed.zero_stage}; continuing it exactly needs the same scaling.num_workers and "
                         f"deepspeed.zero_stage (got {ctx.world} and {cfg.deepspeed.zero_stage})")
    resume = resumed.folder / RESUME_DIR
    path, client_state = engine.load_checkpoint(str(resume / ENGINE_DIR), tag=ENGINE_TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {resumed.folder} has no DeepSpeed state in {resume / ENGINE_DIR}")
    set_rng_state(torch.load(resume / f"rng_rank{ctx.rank}.pt", weights_only=False))
    return client_state.get(METHOD_STATE)


def load_best(resumed: Resumed) -> dict | None:
    """The best epoch's weights a checkpoint carries (runs that measure the best model's sharpness), or None."""
    from safetensors.torch import load_file

    path = resumed.folder / RESUME_DIR / BEST_FILE
    return load_file(str(path)) if path.exists() else None


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
