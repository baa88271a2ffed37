"""A sweep folder as one DataFrame: one row per trial (`<root>/<id>/trial.json` + `summary.json`, docs/SWEEPS.md).

The loader derives what every trial has (task, optimizer, lineage, metrics). Columns only one method's trials have
(an IMP level's sparsity, a transfer's mask source, ...) come from that method's row hook in its report module, found
through the method registry, so this module knows no method.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pandas as pd

from flatray import methods

# Columns the loader and the row hooks derive; metric keys that clash with them are kept as "metrics/<key>".
DERIVED = ("id", "sweep", "experiment", "kind", "status", "task", "optimizer", "rho", "lr", "seed", "level", "parent",
           "root", "prune_method", "sparsity_pct", "method", "source_task", "mask_optimizer", "mask_method", "bits",
           "parent_optimizer", "parent_score", "parent_kind", "point", "config")
# The columns of trials.csv, where a trial has them.
SUMMARY_COLUMNS = ("id", "experiment", "kind", "status", "task", "optimizer", "seed", "level", "sparsity_pct",
                   "method", "bits", "score")


class ReportWarning(UserWarning):
    """Something in the sweep folder could not be used (the report goes on without it)."""


def _warn(message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    """cfg["a"]["b"] for "a.b"; `default` where a part is missing or the value is None."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@functools.cache
def resolve(ref: str) -> Callable:
    """The function a "module:function" reference of the registry names."""
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


class Trial(NamedTuple):
    """A trial folder as read: its trial.json, its status and (status done only) its metrics."""

    record: dict
    status: str
    metrics: dict

    @property
    def config(self) -> dict:
        return self.record.get("config") or {}


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def load_trials(root: Path) -> pd.DataFrame:
    """One row per trial folder with a readable trial.json: what the trial is (from its config and its ancestors)
    and, for status `done`, its metrics, one column per metric key. `status` is done, stopped or failed (from
    summary.json), running (no summary.json yet) or corrupt (an unreadable summary.json, skipped with a warning)."""
    raw: dict[str, Trial] = {}
    for path in sorted(Path(root).glob("*/trial.json")):
        try:
            trial = _read_json(path)
        except (OSError, ValueError) as err:
            _warn(f"{path}: unreadable trial.json ({err}); trial skipped")
            continue
        status, metrics = "running", {}
        summary_path = path.parent / "summary.json"
        if summary_path.exists():
            try:
                summary = _read_json(summary_path)
                status = str(summary.get("status") or "unknown")
                metrics = summary.get("metrics") or {}
                if not isinstance(metrics, dict):
                    raise ValueError("metrics is not an object")
            except (OSError, ValueError) as err:
                _warn(f"{summary_path}: corrupt summary.json ({err}); trial counted as missing")
                status, metrics = "corrupt", {}
        raw[str(trial.get("id") or path.parent.name)] = Trial(trial, status, metrics if status == "done" else {})
    df = pd.DataFrame([_row(tid, raw) for tid in raw])
    if df.empty:
        df = pd.DataFrame(columns=list(DERIVED) + ["score"])
    if "score" not in df:
        df["score"] = math.nan
    return df


def ancestors(tid: str, raw: dict[str, Trial]) -> list[str]:
    """Parent ids, nearest first, up to the root (the first parent of each trial, as IMP chains have one)."""
    chain, seen = [], {tid}
    node = raw.get(tid)
    while node and node.record.get("parents"):
        pid = str(node.record["parents"][0])
        if pid in seen:
            break
        chain.append(pid)
        seen.add(pid)
        node = raw.get(pid)
    return chain


def _row_hook(kind: Any) -> Callable | None:
    # Records on disk may name a method by an alias (kind "structured" is the method "cofi").
    method = {m.name: m for m in methods.entries()}.get(methods.canonical(kind)) if isinstance(kind, str) else None
    return resolve(method.report_row) if method and method.report_row else None


def _row(tid: str, raw: dict[str, Trial]) -> dict:
    trial = raw[tid]
    cfg = trial.config
    kind = trial.record.get("kind") or cfg.get("kind")
    chain = ancestors(tid, raw)
    lineage = [raw[a] for a in chain if a in raw]  # only the last id of a chain can be unreadable
    parent = lineage[0] if lineage else None
    row: dict[str, Any] = dict(
        id=tid, sweep=trial.record.get("sweep"), experiment=trial.record.get("experiment"), kind=kind,
        status=trial.status, task=cfg.get("task"), optimizer=_get(cfg, "optimizer.name", "adam"),
        rho=_num(_get(cfg, "optimizer.rho")), lr=_num(_get(cfg, "train.lr")), seed=_get(cfg, "train.seed"),
        level=trial.record.get("level"), parent=chain[0] if chain else None, root=chain[-1] if chain else tid,
        prune_method=_get(cfg, "prune.method", "magnitude"), point=trial.record.get("point") or {}, config=cfg,
        parent_optimizer=_get(parent.config, "optimizer.name") if parent else None,
        parent_score=_num(parent.metrics.get("score")) if parent else math.nan,
        parent_kind=parent.record.get("kind") if parent else None,
    )
    hook = _row_hook(kind)
    if hook:
        hook(row, trial, lineage)
    row.setdefault("method", row["optimizer"])  # the label of the trial's line or table row, unless the hook set one
    for key, value in trial.metrics.items():
        row[f"metrics/{key}" if key in DERIVED or key in row else key] = value
    return row
