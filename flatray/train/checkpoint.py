"""Checkpoints: what each one holds besides a method's own files, and how a run continues from one.

Every checkpoint folder carries the resolved run config (`flatray_run.yaml`), the metrics of its epoch
(`metrics.json`) and of every epoch so far (`history.json`). A fine-tuning checkpoint is a plain Hugging Face model
folder (config.json, model.safetensors, tokenizer files) plus, for pruned runs, `mask.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from flatray import storage
from flatray.config import RunConfig

HISTORY_FILE = "history.json"


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


def restore(load: Callable[[Path, list[dict]], None]) -> list[dict]:
    """Continue a retried or resumed run from the latest checkpoint Ray Train restored: `load(folder, history)`
    puts the method's state back (before its engine is built, which copies the weights) and the epochs so far are
    returned. Optimizer moments start afresh: checkpoints hold models, not optimizer states."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / HISTORY_FILE).read_text())
        load(Path(folder), history)
    return history


def load_state(model, path: Path) -> None:
    """Weights from a safetensors file into `model`, all of them (position_ids buffers aside)."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
