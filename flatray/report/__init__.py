"""Figures and tables of a sweep: `python -m flatray.report STORAGE/SWEEP [--no-wandb]`.

Reads every trial of a sweep folder (`<root>/<id>/trial.json` + `summary.json`, docs/SWEEPS.md) into one pandas
DataFrame (`load_trials`), then builds each figure/table of the papers from it with a groupby:

1. IMP: metric vs sparsity per task, one line per optimizer x mask method (P1 Figure 2 / Table 1)
2. ticket transfer within a task: mask source x re-training optimizer (P1 Table 6)
3. ticket transfer across tasks: SAM ticket - Adam ticket, source x target heatmap (P1 Figure 4)
4. post-training int8 quantization (P1 Table 8)
5. CoFi structured pruning per teacher optimizer (P1 Table 2)
6. SQuAT and its baselines by weight bits (P2)
7. epsilon-sharpness by eps and optimizer (P1 Table 3)
8. the search of each searched root experiment: score against each searched numeric key

Everything goes to `<root>/report/`: PNG figures, a CSV (numbers: mean, std, n) and a Markdown table (for people:
"mean ± std (n)", "—" where a cell has no finished trial) per table, and README.md, which embeds them all and lists
what is missing. Statistics are over the trials of a cell (normally the seeds): the mean and the sample standard
deviation (ddof=1, as the papers report; undefined for one trial). Values are in the units the runs report (the
task's main dev metric as a fraction, e.g. 0.84 accuracy). Only trials with status `done` are used; the others
(stopped, failed, unfinished, unreadable) are listed as missing. A partial sweep gives a partial report. A
hyperparameter search inside a dependent experiment (several trials of one experiment from one parent, differing
only in searched values) counts once, by its best dev score, before the statistics over seeds.

With W&B settings (the sweep file's `wandb` section), the same figures and tables are logged to one W&B run
(group = sweep name, job_type report, id `<sweep>-report`); a W&B failure is a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

DASH = "—"
OPTIMIZERS = ("adam", "sam", "asam")
COLORS = {"adam": "tab:blue", "sam": "tab:orange", "asam": "tab:green"}
LINESTYLES = {"magnitude": "-", "random": "--"}
MARKERS = {"magnitude": "o", "random": "s"}
SQUAT_METHODS = ("SQuAT", "SAM+LSQ joint", "LSQ-QAT + KD", "LSQ-QAT")
SQUAT_TEACHER = "full precision (teacher)"
METRIC_NAMES = {"accuracy": "accuracy", "matthews": "Matthews corr.", "pearson": "Pearson corr.", "f1": "F1"}
# Columns the loader derives; metric keys that clash with them are kept as "metrics/<key>".
DERIVED = ("id", "sweep", "experiment", "kind", "status", "task", "optimizer", "rho", "lr", "seed", "level", "parent",
           "root", "prune_method", "sparsity_pct", "method", "source_task", "mask_optimizer", "mask_method", "bits",
           "parent_optimizer", "parent_score", "parent_kind", "point", "config")


class ReportWarning(UserWarning):
    """Something in the sweep folder could not be used (the report goes on without it)."""


def _warn(message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------ loading


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
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


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _squat_method(cfg: dict) -> str:
    """METHODS.md section 9: SQuAT = SAM/ASAM alternating with the step sizes; the rest are its baselines."""
    sq = cfg.get("squat") or {}
    if _get(cfg, "optimizer.name", "adam") in ("sam", "asam"):
        return "SQuAT" if sq.get("alternate", True) else "SAM+LSQ joint"
    kd = sum(_num(sq.get(k, d)) for k, d in (("kd_logits", 1.0), ("kd_hidden", 0.0), ("kd_attention", 0.0)))
    return "LSQ-QAT + KD" if kd > 0 else "LSQ-QAT"


def load_trials(root: Path) -> pd.DataFrame:
    """One row per trial folder with a readable trial.json: what the trial is (from its config and its ancestors)
    and, for status `done`, its metrics, one column per metric key. `status` is done, stopped or failed (from
    summary.json), running (no summary.json yet) or corrupt (an unreadable summary.json, skipped with a warning)."""
    raw: dict[str, tuple[dict, str, dict]] = {}
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
        raw[str(trial.get("id") or path.parent.name)] = (trial, status, metrics if status == "done" else {})
    rows = [_row(tid, raw) for tid in raw]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=list(DERIVED) + ["score"])
    if "score" not in df:
        df["score"] = math.nan
    return df


def _ancestors(tid: str, raw: dict) -> list[str]:
    """Parent ids, nearest first, up to the root (the first parent of each trial, as IMP chains have one)."""
    chain, seen = [], {tid}
    node = raw.get(tid)
    while node and node[0].get("parents"):
        pid = str(node[0]["parents"][0])
        if pid in seen:
            break
        chain.append(pid)
        seen.add(pid)
        node = raw.get(pid)
    return chain


def _row(tid: str, raw: dict) -> dict:
    trial, status, metrics = raw[tid]
    cfg = trial.get("config") or {}
    kind = trial.get("kind") or cfg.get("kind")
    ancestors = _ancestors(tid, raw)
    parent = raw.get(ancestors[0]) if ancestors else None
    row: dict[str, Any] = dict(
        id=tid, sweep=trial.get("sweep"), experiment=trial.get("experiment"), kind=kind, status=status,
        task=cfg.get("task"), optimizer=_get(cfg, "optimizer.name", "adam"), rho=_num(_get(cfg, "optimizer.rho")),
        lr=_num(_get(cfg, "train.lr")), seed=_get(cfg, "train.seed"), level=trial.get("level"),
        parent=ancestors[0] if ancestors else None, root=ancestors[-1] if ancestors else tid,
        prune_method=_get(cfg, "prune.method", "magnitude"), point=trial.get("point") or {}, config=cfg,
        parent_optimizer=_get(parent[0].get("config") or {}, "optimizer.name") if parent else None,
        parent_score=_num(parent[2].get("score")) if parent else math.nan,
        parent_kind=parent[0].get("kind") if parent else None,
    )
    sparsity = _get(cfg, "prune.sparsity")
    if kind == "imp":
        row["sparsity_pct"] = round(100 * _num(sparsity if sparsity is not None else metrics.get("sparsity")), 2)
        row["method"] = f"{row['optimizer']} {row['prune_method']}"
    elif kind == "transfer":
        # The mask comes from the nearest IMP ancestor: its task, the optimizer its chain trained with, its sparsity.
        source = next((raw[a] for a in ancestors if a in raw and raw[a][0].get("kind") == "imp"), parent)
        scfg = (source[0].get("config") or {}) if source else {}
        mask_sparsity = _get(scfg, "prune.sparsity", sparsity)
        row.update(source_task=scfg.get("task"), mask_optimizer=_get(scfg, "optimizer.name"),
                   mask_method=_get(scfg, "prune.method", "magnitude"),
                   sparsity_pct=round(100 * _num(mask_sparsity if mask_sparsity is not None
                                                 else metrics.get("sparsity")), 2))
        row["method"] = row["optimizer"]
    elif kind == "squat":
        row["bits"] = _get(cfg, "squat.weight_bits")
        row["method"] = _squat_method(cfg)
    elif kind == "finetune" and sparsity is not None:  # a mask from theta_0 without a chain: the random control
        row["sparsity_pct"] = round(100 * _num(sparsity), 2)
        how = row["prune_method"]
        row["method"] = f"{row['optimizer']} {how}" + ("" if how == "random" else " one-shot")
    else:
        row["method"] = row["optimizer"]
    for key, value in metrics.items():
        row[f"metrics/{key}" if key in DERIVED else key] = value
    return row


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Section:
    """One part of the report: its figures (PNG names), tables (CSV name -> numbers, Markdown) and what is missing."""

    title: str
    about: str = ""
    figures: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    markdown: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


_TASKS: dict | None = None


def _tasks() -> dict:
    global _TASKS
    if _TASKS is None:
        try:
            from flatray.data import TASKS
            _TASKS = dict(TASKS)
        except Exception:  # a report without the training stack installed still labels by "score"
            _TASKS = {}
    return _TASKS


def metric_name(task: str) -> str:
    spec = _tasks().get(task)
    return METRIC_NAMES.get(spec.main_metric, spec.main_metric) if spec else "score"


def metric_label(task: str) -> str:
    """Axis label of the task's main dev metric, e.g. "dev accuracy"."""
    return f"dev {metric_name(task)}"


def _task_key(task: str) -> tuple:
    order = list(_tasks())
    return (order.index(task), task) if task in order else (len(order), str(task))


def _opt_key(opt: str) -> tuple:
    return (OPTIMIZERS.index(opt), opt) if opt in OPTIMIZERS else (len(OPTIMIZERS), str(opt))


def _sorted_tasks(values) -> list[str]:
    return sorted({v for v in values if isinstance(v, str)}, key=_task_key)


def _sorted_opts(values) -> list[str]:
    return sorted({v for v in values if isinstance(v, str)}, key=_opt_key)


def _stats(df: pd.DataFrame, by: list[str], value: str = "score") -> pd.DataFrame:
    """mean, sample std (ddof=1) and count of `value` per group."""
    if df.empty or value not in df:
        return pd.DataFrame(columns=[*by, "mean", "std", "n"])
    data = df.assign(**{value: pd.to_numeric(df[value], errors="coerce")}).dropna(subset=[value])
    out = data.groupby(by, sort=True)[value].agg(mean="mean", std="std", n="count").reset_index()  # std: ddof=1
    out["n"] = out["n"].astype(int)
    return out


def _multi_stats(df: pd.DataFrame, by: list[str], values: dict[str, str]) -> pd.DataFrame:
    """Per group: n (trials) and <name>_mean, <name>_std for each column in `values` (name -> column)."""
    df = df.copy()
    for column in values.values():
        if column not in df:
            df[column] = math.nan
        df[column] = pd.to_numeric(df[column], errors="coerce")
    groups = df.groupby(by, sort=True)
    out = groups.size().rename("n").to_frame()
    for name, column in values.items():
        out[f"{name}_mean"] = groups[column].mean()
        out[f"{name}_std"] = groups[column].std(ddof=1)
    return out.reset_index()


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:,.{digits}f}"


def _cell(mean: float, std: float, n: int, digits: int = 4) -> str:
    """"mean ± std (n)"; one trial: "mean (1)"; none: "—"."""
    if n is None or n == 0 or mean is None or math.isnan(mean):
        return DASH
    if n < 2 or std is None or math.isnan(std):
        return f"{_fmt(mean, digits)} ({n})"
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)} ({n})"


def _pivot(stats: pd.DataFrame, rows: list[tuple], row_names: list[str], col: str, cols: list,
           col_title: Callable[[Any], str], digits: int = 4) -> tuple[pd.DataFrame, list[tuple]]:
    """A Markdown-ready table: one row per key in `rows`, one column per value of `col`, cells "mean ± std (n)".
    Returns the table and the (row..., col) keys of its empty cells."""
    lookup = {tuple(rec[k] for k in [*row_names, col]): rec for rec in stats.to_dict("records")}
    table, missing = [], []
    for key in rows:
        cells = []
        for c in cols:
            rec = lookup.get((*key, c))
            if rec is None:
                cells.append(DASH)
                missing.append((*key, c))
            else:
                cells.append(_cell(rec["mean"], rec["std"], rec["n"], digits))
        table.append([*key, *cells])
    return pd.DataFrame(table, columns=[*row_names, *(col_title(c) for c in cols)]), missing


def _markdown(table: pd.DataFrame) -> str:
    def text(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return DASH
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(text(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{value:g}%"


def _figure(n_panels: int, width: float = 5.0, height: float = 3.8, ncols: int = 3):
    """An Agg-rendered figure (no pyplot, no display) with one axes per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(n_panels, ncols))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _log_x(ax) -> None:
    """A log x axis labelled at 1, 2, 5 x 10^k in plain numbers (learning rates span a decade or two)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=110)
    return name


def _yerr(std: pd.Series) -> np.ndarray:
    return np.nan_to_num(std.to_numpy(dtype=float), nan=0.0)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, all NaN when no trial reported that metric."""
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(math.nan, index=df.index)


def _best_of_search(rows: pd.DataFrame, conditions: list[str]) -> pd.DataFrame:
    """A search inside a dependent experiment (several trials of one experiment from one parent trial, with the
    same conditions and seed: e.g. 12 Optuna samples of SQuAT's rho and lrs) counts once, by its best dev score.
    Trials that differ in a condition (a grid over the optimizer, the target task, the bits) all stay."""
    if rows.empty:
        return rows
    keys = [k for k in ["experiment", "parent", "seed", *conditions] if k in rows]
    ranked = rows.assign(_score=pd.to_numeric(rows["score"], errors="coerce"))
    ranked = ranked.sort_values("_score", ascending=False, na_position="last", kind="stable")
    return ranked.drop_duplicates(keys).drop(columns="_score").sort_index()


def _done(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    return df[(df["kind"] == kind) & (df["status"] == "done")] if not df.empty else df


# ------------------------------------------------------------------------------------------------ 1. IMP


IMP_COLUMNS = ["id", "task", "optimizer", "prune_method", "method", "seed", "sparsity_pct", "score"]


def _imp_points(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The points of the IMP lines: every finished imp level, every pruned root fine-tuning run (a random mask
    from theta_0, as P1's random control), and at 0% the dense models: the roots of the imp chains (level 1's
    parent), each once per line of its task and optimizer. Returns (points, dense models, notes)."""
    done = df[df["status"] == "done"] if not df.empty else df
    imp = done[done["kind"] == "imp"] if not done.empty else done
    pruned_roots = done[(done["kind"] == "finetune") & done["parent"].isna() & done["sparsity_pct"].notna()] \
        if not done.empty and "sparsity_pct" in done else done.iloc[0:0]
    lines = pd.concat([imp, pruned_roots], ignore_index=True)
    if lines.empty:
        return pd.DataFrame(columns=IMP_COLUMNS), pd.DataFrame(columns=IMP_COLUMNS), []
    by_id = df.set_index("id")
    dense, notes = [], []
    for root, opt in sorted(set(zip(imp["root"], imp["optimizer"]))):
        if root in by_id.index and by_id.at[root, "status"] == "done":
            r = by_id.loc[root]
            dense.append(dict(id=root, task=r["task"], optimizer=opt, seed=r["seed"], score=r["score"]))
        else:
            notes.append(f"imp: the dense root {root} of a {opt} chain is not finished (no 0% point from it)")
    dense = pd.DataFrame(dense, columns=["id", "task", "optimizer", "seed", "score"])
    zero = []
    for (task, opt, how, method), _ in lines.groupby(["task", "optimizer", "prune_method", "method"]):
        d = dense[(dense["task"] == task) & (dense["optimizer"] == opt)]
        zero.append(d.assign(prune_method=how, method=method, sparsity_pct=0.0))
    points = pd.concat([lines[IMP_COLUMNS], *[z[IMP_COLUMNS] for z in zero]], ignore_index=True)
    return points, dense, notes


def imp_sparsity(df: pd.DataFrame, out: Path) -> Section:
    """P1 Figure 2 / Table 1: the main metric of each IMP level per task, one line per optimizer x mask method;
    level 0 is the chain's root (the dense fine-tuned model), also drawn as a horizontal reference."""
    sec = Section("1. IMP: metric vs sparsity (P1 Figure 2 / Table 1)",
                  "Lottery tickets by iterative magnitude pruning with rewinding, and random-mask controls "
                  "(random IMP chains or pruned fine-tuning runs from theta_0). 0% = the dense fine-tuned models "
                  "the chains start from (per task and optimizer); dotted lines: their mean.")
    points, dense, notes = _imp_points(df)
    sec.missing += notes
    if points.empty:
        sec.missing.append("no finished imp trials (or pruned fine-tuning runs): no IMP figure or table")
        return sec
    stats = _stats(points, ["task", "method", "optimizer", "prune_method", "sparsity_pct"])
    if stats.empty:
        sec.missing.append("imp: no finished trial reported a score")
        return sec
    sec.tables["imp_sparsity"] = stats

    tasks = _sorted_tasks(stats["task"])
    methods = sorted(set(stats["method"]), key=lambda m: (_opt_key(m.split()[0]), m))
    rows = [(t, m) for t in tasks for m in methods if ((stats["task"] == t) & (stats["method"] == m)).any()]
    sparsities = sorted(set(stats["sparsity_pct"]))
    table, missing = _pivot(stats, rows, ["task", "method"], "sparsity_pct", sparsities, _pct)
    sec.markdown["imp_sparsity"] = _markdown(table)
    how = dict(zip(stats["method"], stats["prune_method"]))
    for task, method, s in missing:  # a gap where a line of the same task and mask method has a point
        same = stats[(stats["task"] == task) & (stats["prune_method"] == how[method])]
        if s in set(same["sparsity_pct"]):
            sec.missing.append(f"imp: {task} / {method} at {s:g}% sparsity: no finished trial")

    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        for method in methods:
            s = stats[(stats["task"] == task) & (stats["method"] == method)].sort_values("sparsity_pct")
            if s.empty:
                continue
            opt, how = method.split(" ", 1)
            ax.errorbar(s["sparsity_pct"], s["mean"], yerr=_yerr(s["std"]), label=method, capsize=3,
                        color=COLORS.get(opt), linestyle=LINESTYLES.get(how, ":"), marker=MARKERS.get(how, "^"))
        if not dense.empty:
            ref = dense[dense["task"] == task].groupby("optimizer")["score"].mean()
            for opt, value in ref.items():
                ax.axhline(value, color=COLORS.get(opt, "gray"), linestyle=":", linewidth=1, label=f"{opt} dense")
        ax.set(title=f"{task}: IMP with rewinding", xlabel="sparsity (%)", ylabel=metric_label(task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Metric vs sparsity (mean ± std over seeds)")
    sec.figures.append(_save(fig, out, "imp_sparsity.png"))
    return sec


# ------------------------------------------------------------------------------------------------ 2, 3. transfer


TRANSFER_CONDITIONS = ["task", "source_task", "mask_optimizer", "mask_method", "sparsity_pct", "optimizer"]


def _transfers(df: pd.DataFrame) -> pd.DataFrame:
    return _best_of_search(_done(df, "transfer"), TRANSFER_CONDITIONS)


def _mask_label(opt: str, method: str) -> str:
    return opt if method == "magnitude" else f"{opt} ({method} mask)"


def transfer_mask_optimizer(df: pd.DataFrame, out: Path) -> Section:
    """P1 Table 6: a mask found by IMP with optimizer A, re-trained on the same task with optimizer B."""
    sec = Section("2. Mask source x re-training optimizer (P1 Table 6)",
                  "Transfers within a task: rows = the optimizer of the IMP chain that found the mask, "
                  "columns = the optimizer of the re-training run.")
    tr = _transfers(df)
    same = tr[tr["task"] == tr["source_task"]] if not tr.empty else tr
    if same.empty:
        sec.missing.append("no finished same-task transfer trials: no mask x optimizer table")
        return sec
    same = same.assign(mask_source=[_mask_label(o, m) for o, m in zip(same["mask_optimizer"], same["mask_method"])])
    stats = _stats(same, ["task", "sparsity_pct", "mask_source", "mask_optimizer", "mask_method", "optimizer"])
    sec.tables["transfer_mask_optimizer"] = stats
    opts = _sorted_opts(set(stats["optimizer"]) | set(stats["mask_optimizer"]))
    sources = sorted(set(stats["mask_source"]), key=lambda s: (_opt_key(s.split()[0]), s))
    parts = []
    groups = sorted(stats.groupby(["task", "sparsity_pct"]), key=lambda kv: (_task_key(kv[0][0]), kv[0][1]))
    for (task, sparsity), s in groups:
        table, missing = _pivot(s, [(m,) for m in sources], ["mask_source"], "optimizer", opts,
                                lambda o: f"re-trained with {o}")
        table = table.rename(columns={"mask_source": "mask found with"})
        parts.append(f"**{task}, {sparsity:g}% sparsity** ({metric_label(task)})\n\n{_markdown(table)}")
        sec.missing += [f"mask x optimizer: {task} at {sparsity:g}%: {m} mask re-trained with {o}: no finished trial"
                        for m, o in missing]
    sec.markdown["transfer_mask_optimizer"] = "\n\n".join(parts)
    return sec


def _ticket_pairs(cross: pd.DataFrame) -> pd.DataFrame:
    """Per re-training arm, sparsity and source -> target: the SAM tickets' and the Adam tickets' stats and the
    difference of their means. Arms: "matched" (each ticket re-trained with the optimizer that found it, what a
    sweep's transfers inherit) and one per re-training optimizer (both kinds of ticket re-trained with it)."""
    arms = [("matched", cross[cross["optimizer"] == cross["mask_optimizer"]])]
    arms += [(opt, cross[cross["optimizer"] == opt]) for opt in _sorted_opts(cross["optimizer"])]
    keys = ["sparsity_pct", "source_task", "task"]
    tables = []
    for arm, rows in arms:
        stats = _stats(rows, [*keys, "mask_optimizer"])
        sam = stats[stats["mask_optimizer"] == "sam"].set_index(keys)[["mean", "std", "n"]].add_prefix("sam_")
        adam = stats[stats["mask_optimizer"] == "adam"].set_index(keys)[["mean", "std", "n"]].add_prefix("adam_")
        table = sam.join(adam, how="outer").reset_index().rename(columns={"task": "target_task"})
        table.insert(0, "retrain", arm)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    table["diff"] = table["sam_mean"] - table["adam_mean"]
    for col in ("sam_n", "adam_n"):
        table[col] = table[col].fillna(0).astype(int)
    # An arm (at a sparsity) with no SAM/Adam pair anywhere says nothing: left out, unless nothing else is left.
    useful = table.groupby(["retrain", "sparsity_pct"])["diff"].transform(lambda d: d.notna().any())
    return table[useful] if useful.any() else table[table["retrain"] == "matched"]


def _arm_title(arm: str) -> str:
    return "each ticket re-trained with its own optimizer" if arm == "matched" else f"all tickets re-trained with {arm}"


def transfer_heatmap(df: pd.DataFrame, out: Path) -> Section:
    """P1 Figure 4: tickets (magnitude masks) moved from a source task to a target task (the diagonal: within the
    task); cell = mean target metric with the SAM ticket minus with the Adam ticket; one panel per re-training arm
    x sparsity."""
    sec = Section("3. Ticket transfer across tasks (P1 Figure 4)",
                  "Cell = mean target dev metric with the SAM-found ticket minus with the Adam-found ticket "
                  "(positive: SAM tickets transfer better); the diagonal: transfers within the task, where run; "
                  "n/a: no SAM/Adam pair. \"matched\": each ticket "
                  "re-trained with the optimizer that found it; otherwise all tickets re-trained with one optimizer.")
    tr = _transfers(df)
    tickets = tr[tr["source_task"].notna() & (tr["mask_method"] == "magnitude")] if not tr.empty else tr
    if tickets.empty or (tickets["task"] == tickets["source_task"]).all():
        sec.missing.append("no finished cross-task transfer trials: no transfer heatmap")
        return sec
    table = _ticket_pairs(tickets)
    if table.empty:
        sec.missing.append("transfer heatmap: no finished cross-task transfer reported a score")
        return sec
    sec.tables["transfer_heatmap"] = table

    import matplotlib
    from matplotlib.patches import Rectangle

    tasks = _sorted_tasks(set(table["source_task"]) | set(table["target_task"]))
    arms = ["matched", *OPTIMIZERS, *sorted(set(table["retrain"]) - {"matched", *OPTIMIZERS})]
    panels = sorted(set(zip(table["retrain"], table["sparsity_pct"])), key=lambda p: (arms.index(p[0]), p[1]))
    fig, axes = _figure(len(panels), width=1.3 * len(tasks) + 2.8, height=1.1 * len(tasks) + 1.8, ncols=2)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="white")
    diffs = table["diff"].abs().dropna()
    vmax = float(diffs.max()) if len(diffs) and diffs.max() > 0 else 1.0  # one color scale for every panel
    parts = []
    for ax, (arm, sparsity) in zip(axes, panels):
        sub = table[(table["retrain"] == arm) & (table["sparsity_pct"] == sparsity)]
        cells = {(r["source_task"], r["target_task"]): r for r in sub.to_dict("records")}
        grid = np.full((len(tasks), len(tasks)), np.nan)
        for (src, tgt), rec in cells.items():
            grid[tasks.index(src), tasks.index(tgt)] = rec["diff"]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-vmax, vmax=vmax)
        empty = 0
        for i, j in np.ndindex(grid.shape):
            if np.isnan(grid[i, j]):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.75", lw=0))
                ax.text(j, i, "n/a", ha="center", va="center", color="0.45", fontsize="small")
                rec = cells.get((tasks[i], tasks[j]))
                if rec is not None:
                    only = "SAM" if rec["sam_n"] else "Adam"
                    sec.missing.append(f"transfer heatmap ({arm}, {sparsity:g}%): {tasks[i]} -> {tasks[j]}: only "
                                       f"{only} tickets, no pair")
                else:
                    empty += 1
            else:
                strong = abs(grid[i, j]) > 0.6 * vmax
                rec = cells[(tasks[i], tasks[j])]
                ax.text(j, i, f"{grid[i, j]:+.3f}\nn={rec['sam_n']} vs {rec['adam_n']}", ha="center", va="center",
                        color="white" if strong else "black", fontsize="small")
        if empty:
            sec.missing.append(f"transfer heatmap ({arm}, {sparsity:g}%): {empty} source -> target pair(s) "
                               "without transfers")
        ax.set_xticks(range(len(tasks)), tasks, rotation=30)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set(xlabel="target task", ylabel="source task (where the ticket was found)",
               title=f"{sparsity:g}% tickets, {_arm_title(arm)}")
        fig.colorbar(image, ax=ax, label="SAM ticket − Adam ticket (dev metric)", shrink=0.8)
        rows = []
        for src in tasks:
            row = [src]
            for tgt in tasks:
                rec = cells.get((src, tgt))
                row.append("n/a" if rec is None or math.isnan(rec["diff"])
                           else f"{rec['diff']:+.4f} (n={rec['sam_n']} vs {rec['adam_n']})")
            rows.append(row)
        md = _markdown(pd.DataFrame(rows, columns=["source \\ target", *tasks]))
        parts.append(f"**{sparsity:g}% tickets, {_arm_title(arm)}** (SAM ticket − Adam ticket)\n\n{md}")
    fig.suptitle("Ticket transfer across tasks: SAM ticket − Adam ticket")
    sec.figures.append(_save(fig, out, "transfer_heatmap.png"))
    sec.markdown["transfer_heatmap"] = "\n\n".join(parts)
    return sec


# ------------------------------------------------------------------------------------------------ 4. PTQ

PTQ_VALUES = {"float_metric": "float/score", "int8_metric": "int8/score", "drop": "drop",
              "float_size_mb": "float/size_mb", "int8_size_mb": "int8/size_mb", "size_ratio": "size_ratio",
              "float_latency_ms": "float/latency_ms", "int8_latency_ms": "int8/latency_ms", "speedup": "speedup"}
PTQ_TITLES = {"float_metric": ("float", 4), "int8_metric": ("int8", 4), "drop": ("drop", 4),
              "float_size_mb": ("float MB", 2), "int8_size_mb": ("int8 MB", 2), "size_ratio": ("size ratio", 2),
              "float_latency_ms": ("float ms", 2), "int8_latency_ms": ("int8 ms", 2), "speedup": ("speedup", 2)}


def _by_parent_optimizer(rows: pd.DataFrame) -> pd.DataFrame:
    """Dependent runs (ptq, structured, sharpness) are labelled by the optimizer their parent model trained with."""
    return rows.assign(optimizer=rows["parent_optimizer"].fillna(rows["optimizer"]))


def _grid_missing(stats: pd.DataFrame, what: str, name: str = "optimizer") -> list[str]:
    opts = _sorted_opts(stats[name])
    have = set(zip(stats["task"], stats[name]))
    return [f"{what}: {t} / {o}: no finished trial" for t in _sorted_tasks(stats["task"]) for o in opts
            if (t, o) not in have]


def ptq_table(df: pd.DataFrame, out: Path) -> Section:
    """P1 Table 8: dynamic int8 quantization of the full fine-tuned model, per task and its optimizer."""
    sec = Section("4. Post-training dynamic int8 quantization (P1 Table 8)",
                  "Metric before (float) and after (int8) quantization, drop = float − int8, serialized size and "
                  "CPU latency per dev batch; rows by the optimizer the quantized model was fine-tuned with.")
    ptq = _best_of_search(_done(df, "ptq"), ["task"])
    if ptq.empty:
        sec.missing.append("no finished ptq trials: no PTQ table")
        return sec
    ptq = _by_parent_optimizer(ptq)
    ptq = ptq.assign(drop=_column(ptq, "float/score") - _column(ptq, "int8/score"))
    stats = _multi_stats(ptq, ["task", "optimizer"], PTQ_VALUES)
    sec.tables["ptq"] = stats
    rows = []
    for rec in sorted(stats.to_dict("records"), key=lambda r: (_task_key(r["task"]), _opt_key(r["optimizer"]))):
        rows.append([rec["task"], rec["optimizer"], metric_name(rec["task"])]
                    + [_cell(rec[f"{k}_mean"], rec[f"{k}_std"], rec["n"], d) for k, (_, d) in PTQ_TITLES.items()])
    sec.markdown["ptq"] = _markdown(pd.DataFrame(rows, columns=["task", "optimizer", "metric",
                                                                *(t for t, _ in PTQ_TITLES.values())]))
    sec.missing += _grid_missing(stats, "ptq")
    return sec


# ------------------------------------------------------------------------------------------------ 5. CoFi

COFI_VALUES = {"teacher_metric": "parent_score", "pruned_metric": "score", "sparsity": "sparsity", "params": "params"}


def cofi_table(df: pd.DataFrame, out: Path) -> Section:
    """P1 Table 2: CoFi structured pruning with distillation; only the teacher's optimizer differs."""
    sec = Section("5. CoFi structured pruning (P1 Table 2)",
                  "Teacher = the fine-tuned model (its dev metric), pruned = the distilled, pruned and fine-tuned "
                  "student; real sparsity over the encoder's prunable weights; params = the student's parameters.")
    cofi = _best_of_search(_done(df, "structured"), ["task"])
    if cofi.empty:
        sec.missing.append("no finished structured (CoFi) trials: no CoFi table")
        return sec
    cofi = _by_parent_optimizer(cofi).rename(columns={"optimizer": "teacher_optimizer"})
    stats = _multi_stats(cofi, ["task", "teacher_optimizer"], COFI_VALUES)
    sec.tables["cofi"] = stats
    rows = []
    for rec in sorted(stats.to_dict("records"), key=lambda r: (_task_key(r["task"]), _opt_key(r["teacher_optimizer"]))):
        n = rec["n"]
        rows.append([rec["task"], rec["teacher_optimizer"], metric_name(rec["task"]),
                     _cell(rec["teacher_metric_mean"], rec["teacher_metric_std"], n),
                     _cell(rec["pruned_metric_mean"], rec["pruned_metric_std"], n),
                     _cell(100 * rec["sparsity_mean"], 100 * rec["sparsity_std"], n, 2),
                     _cell(rec["params_mean"], rec["params_std"], n, 0)])
    sec.markdown["cofi"] = _markdown(pd.DataFrame(rows, columns=[
        "task", "teacher optimizer", "metric", "teacher", "pruned", "real sparsity (%)", "params"]))
    sec.missing += _grid_missing(stats, "cofi", "teacher_optimizer")
    return sec


# ------------------------------------------------------------------------------------------------ 6. SQuAT


def squat_bits(df: pd.DataFrame, out: Path) -> Section:
    """P2: the dev metric of each quantization-aware method by weight bits, with the full-precision teacher."""
    sec = Section("6. SQuAT by weight bits (P2)",
                  "SQuAT = SAM/ASAM on the latent weights alternating with LSQ step-size steps; SAM+LSQ joint = "
                  "the same without alternation; LSQ-QAT (+ KD) = Adam. Teacher: the full-precision model. "
                  "A hyperparameter search per teacher counts by its best trial.")
    sq = _best_of_search(_done(df, "squat"), ["task", "method", "bits"])
    if sq.empty:
        sec.missing.append("no finished squat trials: no SQuAT figure or table")
        return sec
    stats = _stats(sq, ["task", "method", "bits"])
    if stats.empty:
        sec.missing.append("squat: no finished trial reported a score")
        return sec
    stats["bits"] = stats["bits"].astype(int)
    teachers = sq.drop_duplicates("parent").dropna(subset=["parent_score"])
    teacher = _stats(teachers, ["task"], "parent_score").assign(method=SQUAT_TEACHER, bits=32)
    both = pd.concat([stats, teacher[stats.columns]], ignore_index=True)
    sec.tables["squat_bits"] = both

    tasks = _sorted_tasks(stats["task"])
    methods = [m for m in SQUAT_METHODS if m in set(stats["method"])]
    bits = sorted(set(int(b) for b in stats["bits"]))
    parts, missing = [], []
    for task in tasks:
        table, gaps = _pivot(stats, [(task, m) for m in methods], ["task", "method"], "bits", bits,
                             lambda b: f"{b}-bit")
        rec = teacher[teacher["task"] == task].to_dict("records")
        table["FP (teacher)"] = ""
        table.loc[len(table)] = [task, SQUAT_TEACHER, *([""] * len(bits)),
                                 _cell(rec[0]["mean"], rec[0]["std"], rec[0]["n"]) if rec else DASH]
        parts.append(table)
        missing += gaps
    sec.markdown["squat_bits"] = _markdown(pd.concat(parts, ignore_index=True))
    sec.missing += [f"squat: {t} / {m} at {b} bits: no finished trial" for t, m, b in missing]

    fig, axes = _figure(len(tasks))
    colors = dict(zip(SQUAT_METHODS, ("tab:red", "tab:purple", "tab:blue", "tab:gray")))
    for ax, task in zip(axes, tasks):
        for method in methods:
            s = stats[(stats["task"] == task) & (stats["method"] == method)].sort_values("bits")
            if not s.empty:
                ax.errorbar(s["bits"], s["mean"], yerr=_yerr(s["std"]), label=method, capsize=3, marker="o",
                            color=colors[method])
        rec = teacher[teacher["task"] == task]
        if not rec.empty:
            ax.axhline(rec["mean"].iloc[0], color="black", linestyle=":", label="full-precision teacher")
        ax.set_xticks(bits)
        ax.set(title=f"{task}: quantization-aware training", xlabel="weight bits", ylabel=metric_label(task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Low-bit QAT: metric by weight bits (mean ± std over seeds)")
    sec.figures.append(_save(fig, out, "squat_bits.png"))
    return sec


# ------------------------------------------------------------------------------------------------ 7. sharpness


def _sharpness_points(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per (measured model, eps): sharpness trials measure their parent, fine-tuning runs themselves. Only
    dense full-precision fine-tuned models (P1 Table 3); also returns how many other measured trials were skipped."""
    done = df[df["status"] == "done"] if not df.empty else df
    keys = [c for c in df.columns if isinstance(c, str) and c.startswith("sharpness/eps=")]
    if not keys or done.empty:
        return pd.DataFrame(columns=["model", "task", "optimizer", "eps", "value"]), 0
    measured = done[done[keys].notna().any(axis=1)]
    is_sharp = measured["kind"] == "sharpness"
    unpruned = _column(measured, "sparsity_pct").isna()  # a root fine-tuning run with a random mask is not dense
    dense = (is_sharp & (measured["parent_kind"] == "finetune")) | ((measured["kind"] == "finetune") & unpruned)
    skipped = int((~dense).sum())
    measured = measured[dense].copy()
    sharp = measured["kind"] == "sharpness"
    measured["model"] = measured["id"].where(~sharp, measured["parent"])
    measured["optimizer"] = measured["optimizer"].where(
        ~sharp, measured["parent_optimizer"].fillna(measured["optimizer"]))
    measured["order"] = (~sharp).astype(int)
    long = measured.melt(id_vars=["model", "task", "optimizer", "order"], value_vars=keys, var_name="key",
                         value_name="value").dropna(subset=["value"])
    long["eps"] = long["key"].str.slice(len("sharpness/eps=")).astype(float)
    # A model measured twice (by a sharpness trial and at the end of its own run) counts once: the sharpness trial.
    long = long.sort_values("order").drop_duplicates(["model", "eps"])
    return long[["model", "task", "optimizer", "eps", "value"]], skipped


def sharpness_table(df: pd.DataFrame, out: Path) -> Section:
    """P1 Table 3: epsilon-sharpness of the dense fine-tuned models per task, optimizer and eps."""
    sec = Section("7. Sharpness by eps and optimizer (P1 Table 3)",
                  "epsilon-sharpness phi (Keskar et al.; a relative loss increase in %, lower = flatter) of the "
                  "dense fine-tuned models, from sharpness trials or fine-tuning runs that measured it.")
    points, skipped = _sharpness_points(df)
    if skipped:
        sec.missing.append(f"sharpness: {skipped} measured trial(s) of pruned/quantized models left out (Table 3 is "
                           "about the dense models)")
    if points.empty:
        sec.missing.append("no sharpness measurements: no sharpness table")
        return sec
    stats = _stats(points, ["task", "optimizer", "eps"], "value")
    sec.tables["sharpness"] = stats
    tasks, opts = _sorted_tasks(stats["task"]), _sorted_opts(stats["optimizer"])
    eps = sorted(set(stats["eps"]), reverse=True)
    rows = [(t, o) for t in tasks for o in opts if ((stats["task"] == t) & (stats["optimizer"] == o)).any()]
    table, missing = _pivot(stats, rows, ["task", "optimizer"], "eps", eps, lambda e: f"eps={e:g}", digits=3)
    sec.markdown["sharpness"] = _markdown(table)
    sec.missing += [f"sharpness: {t} / {o} at eps={e:g}: no measurement" for t, o, e in missing]
    sec.missing += _grid_missing(stats.drop_duplicates(["task", "optimizer"]), "sharpness")

    fig, axes = _figure(len(tasks))
    width = 0.8 / max(1, len(opts))
    for ax, task in zip(axes, tasks):
        for k, opt in enumerate(opts):
            s = stats[(stats["task"] == task) & (stats["optimizer"] == opt)].set_index("eps").reindex(eps)
            ax.bar(np.arange(len(eps)) + (k - (len(opts) - 1) / 2) * width, s["mean"], width,
                   yerr=_yerr(s["std"]), capsize=3, color=COLORS.get(opt), label=opt)
        ax.set_xticks(range(len(eps)), [f"{e:g}" for e in eps])
        ax.set(title=f"{task}: sharpness of the fine-tuned model", xlabel="ε", ylabel="ε-sharpness φ (%)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small")
    fig.suptitle("Sharpness by eps and optimizer (mean ± std over seeds)")
    sec.figures.append(_save(fig, out, "sharpness.png"))
    return sec


# ------------------------------------------------------------------------------------------------ 8. the search


def _searched_keys(trials: pd.DataFrame) -> list[str]:
    """Numeric run-config keys a root experiment searched: any `point` key, optimizer.rho and train.lr, that takes
    more than one value among trials of one optimizer (rho differs between adam and sam by default alone).
    The seed is not a search dimension."""
    in_point = {k for point in trials["point"] for k in point}
    searched = []
    for key in sorted((in_point | {"optimizer.rho", "train.lr"}) - {"train.seed", "optimizer.name"}):
        values = pd.to_numeric(trials["config"].map(lambda c, key=key: _get(c, key)), errors="coerce")
        if values.nunique() < 2:
            continue
        if key in in_point or values.groupby(trials["optimizer"]).nunique().max() > 1:
            searched.append(key)
    return searched


def search_scatter(df: pd.DataFrame, out: Path) -> list[Section]:
    """The search of each root experiment: score against each searched numeric key, colored by optimizer."""
    done = df[(df["status"] == "done") & (df["kind"] == "finetune") & df["parent"].isna()] if not df.empty else df
    sections = []
    for experiment, trials in sorted(done.groupby("experiment")) if not done.empty else []:
        sec = Section(f"8. The search: experiment {experiment}",
                      "Every finished trial of the searched root experiment; best trial per task and optimizer below.")
        sections.append(sec)
        keys = _searched_keys(trials)
        if not keys:
            sec.missing.append(f"search {experiment}: no numeric searched key (only the optimizer/seed vary): "
                               "no scatter")
            continue
        trials = trials.assign(**{k: pd.to_numeric(trials["config"].map(lambda c, k=k: _get(c, k)), errors="coerce")
                                  for k in keys})
        name = f"search_{experiment}"
        cols = ["id", "task", "optimizer", "seed", *keys, "score"]
        sec.tables[name] = trials[cols].sort_values(["task", "optimizer", "score"], ascending=[True, True, False])
        best = trials.loc[trials.dropna(subset=["score"]).groupby(["task", "optimizer"])["score"].idxmax()]
        best = best.loc[sorted(best.index, key=lambda i: (_task_key(best.at[i, "task"]),
                                                           _opt_key(best.at[i, "optimizer"])))]
        md = best[["task", "optimizer", *keys, "score", "id"]].copy()
        md.insert(2, "trials", [int(((trials["task"] == t) & (trials["optimizer"] == o)).sum())
                                for t, o in zip(best["task"], best["optimizer"])])
        for k in [*keys, "score"]:
            md[k] = md[k].map(lambda v: f"{v:.4g}")
        sec.markdown[name] = _markdown(md.rename(columns={"score": "best score"}))

        tasks = _sorted_tasks(trials["task"])
        fig, axes = _figure(len(tasks) * len(keys), ncols=len(keys) if len(keys) > 1 else 3)
        for i, task in enumerate(tasks):
            t = trials[trials["task"] == task]
            for j, key in enumerate(keys):
                ax = axes[i * len(keys) + j]
                for opt in _sorted_opts(t["optimizer"]):
                    s = t[t["optimizer"] == opt]
                    ax.scatter(s[key], s["score"], color=COLORS.get(opt), label=opt, alpha=0.8)
                positive = (t[key].dropna() > 0).all()
                if "lr" in key.split(".")[-1] and positive:
                    _log_x(ax)
                ax.set(title=f"{task}: score vs {key}", xlabel=f"{key} (log scale)" if ax.get_xscale() == "log"
                       else key, ylabel=metric_label(task))
                ax.grid(alpha=0.3)
                ax.legend(fontsize="small")
        fig.suptitle(f"Search of experiment {experiment}: dev score of each finished trial")
        sec.figures.append(_save(fig, out, f"{name}.png"))
    return sections


# ------------------------------------------------------------------------------------------------ the report

BUILDERS = (imp_sparsity, transfer_mask_optimizer, transfer_heatmap, ptq_table, cofi_table, squat_bits,
            sharpness_table, search_scatter)


def _status_table(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame(columns=["experiment", "kind", "done", "missing"])
    counts = df.groupby(["experiment", "kind", "status"]).size().unstack("status", fill_value=0)
    statuses = ["done", "stopped", "failed", "running", "corrupt"]
    statuses += sorted(set(counts.columns) - set(statuses))
    return counts.reindex(columns=statuses, fill_value=0).reset_index()


def _sweep_name(root: Path, df: pd.DataFrame) -> str:
    names = [n for n in df.get("sweep", pd.Series(dtype=object)).dropna().unique()] if "sweep" in df else []
    if not names:
        try:
            import yaml

            names = [yaml.safe_load((root / "sweep.yaml").read_text())["name"]]
        except Exception:
            names = [root.resolve().name]
    return str(names[0])


def _write_readme(out: Path, root: Path, sweep: str, df: pd.DataFrame, sections: list[Section]) -> None:
    status = _status_table(df)
    n_done = int((df["status"] == "done").sum()) if not df.empty else 0
    lines = [f"# Report: sweep `{sweep}`", "",
             f"{root.resolve()} — {len(df)} trials, {n_done} finished, {len(df) - n_done} missing "
             f"(generated {datetime.now():%Y-%m-%d %H:%M}).", "",
             "Cells: mean ± sample std (ddof=1) over the trials of the cell (the seeds), and their number (n); "
             f"{DASH} = no finished trial. Metrics as the runs report them (the task's main dev metric). "
             "CSV files hold the same numbers at full precision.", "", "## Trials", "",
             _markdown(status) if not status.empty else "No trials found.", "",
             "running = no summary.json yet (unfinished or interrupted); corrupt = an unreadable summary.json.", ""]
    for sec in sections:
        lines += [f"## {sec.title}", "", sec.about, ""]
        lines += [f"![{name}]({name})\n" for name in sec.figures]
        for name, md in sec.markdown.items():
            lines += [md, "", f"Numbers: [{name}.csv]({name}.csv)", ""]
        if not sec.figures and not sec.markdown:
            lines += ["Nothing to show yet.", ""]
    missing = [m for sec in sections for m in sec.missing]
    not_done = df[df["status"] != "done"] if not df.empty else df
    lines += ["## Missing", ""]
    stopped = not_done[not_done["status"] == "stopped"] if not not_done.empty else not_done
    for experiment, n in (stopped.groupby("experiment").size().items() if not stopped.empty else []):
        lines.append(f"- {experiment}: {n} trial(s) stopped early by the scheduler (ASHA; expected in a search)")
    lines += [f"- trial {r.id} ({r.experiment}, {r.kind}, task {r.task}): {r.status}"
              for r in not_done[not_done["status"] != "stopped"].sort_values(["experiment", "id"]).itertuples()]
    lines += [f"- {m}" for m in missing]
    if not missing and not_done.empty:
        lines.append("Nothing: every trial finished and every cell has data.")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def report(root: str | Path, wandb_settings: Any = None) -> Path:
    """Write the figures and tables of the sweep folder `root` to `<root>/report/` and return that folder.
    `wandb_settings`: the sweep file's `wandb` section (a dict or flatray.config.sweep.WandbSettings) to log them to
    W&B too; None or mode disabled: no W&B."""
    root = Path(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), *out.glob("*.csv"), *out.glob("*.md")]:
        old.unlink()  # a report is rebuilt whole: no figure of an earlier report survives its data
    df = load_trials(root)
    if "sweep" not in df:
        df["sweep"] = None
    sweep = _sweep_name(root, df)
    sections: list[Section] = []
    for build in BUILDERS:
        try:
            result = build(df, out)
        except Exception as err:  # one broken figure must not cost the rest of the report
            _warn(f"report: {build.__name__} failed ({type(err).__name__}: {err}); left out")
            result = Section(build.__name__, missing=[f"{build.__name__} could not be built: {err}"])
        sections += result if isinstance(result, list) else [result]
    tables = {"trials": df[[c for c in ("id", "experiment", "kind", "status", "task", "optimizer", "seed", "level",
                                        "sparsity_pct", "method", "bits", "score") if c in df]]}
    for sec in sections:
        tables.update(sec.tables)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    for sec in sections:
        for name, md in sec.markdown.items():
            (out / f"{name}.md").write_text(f"# {sec.title}\n\n{md}\n")
    _write_readme(out, root, sweep, df, sections)
    figures = [name for sec in sections for name in sec.figures]
    log_to_wandb(root, sweep, out, figures, tables, wandb_settings)
    return out


# ------------------------------------------------------------------------------------------------ W&B


def _settings_dict(settings: Any) -> dict:
    if settings is None:
        return {}
    if isinstance(settings, dict):
        return dict(settings)
    if hasattr(settings, "model_dump"):
        return settings.model_dump()
    return dict(vars(settings))


def wandb_mode(settings: Any) -> str | None:
    """online/offline, or None when W&B is off (no settings, mode disabled, WANDB_MODE=disabled). WANDB_MODE wins;
    then an explicit online/offline; auto: online with a WANDB_API_KEY and W&B reachable, else offline."""
    if settings is None:
        return None
    mode = _settings_dict(settings).get("mode") or "auto"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode == "disabled" or env == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return None
    if env in ("online", "offline", "dryrun"):
        return "offline" if env == "dryrun" else env
    if mode in ("online", "offline"):
        return mode
    if not os.environ.get("WANDB_API_KEY"):
        return "offline"
    try:  # auto with a key: online only when W&B is reachable, as the sweep's own runs decide
        from flatray.config.sweep import WandbSettings
        from flatray.tracking import wandb_mode as sweep_mode

        return sweep_mode(WandbSettings(mode="auto"))
    except Exception:
        return "online"


def log_to_wandb(root: Path, sweep: str, out: Path, figures: list[str], tables: dict[str, pd.DataFrame],
                 settings: Any) -> None:
    """The figures (wandb.Image) and tables (wandb.Table) in one run: group <sweep>, job_type report, id
    <sweep>-report (resumed on a re-run). Run files under <root>/wandb/ (offline: <root>/wandb/offline-run-*)."""
    mode = wandb_mode(settings)
    if mode is None:
        return
    s = _settings_dict(settings)
    try:
        import wandb

        (root / "wandb").mkdir(parents=True, exist_ok=True)
        run = None
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                run = wandb.init(project=s.get("project") or "flatray", entity=s.get("entity"), group=sweep,
                                 job_type="report", id=f"{sweep}-report", name=f"{sweep}-report", resume="allow",
                                 dir=str(root), mode=attempt, reinit="create_new",
                                 config={"root": str(root.resolve())},
                                 settings=wandb.Settings(init_timeout=60, silent=True))
                break
            except Exception as err:
                if attempt == "offline" or mode != "online":
                    raise
                _warn(f"W&B online failed ({err}); logging the report offline")
        try:
            data: dict[str, Any] = {f"report/{Path(f).stem}": wandb.Image(str(out / f)) for f in figures}
            for name, table in tables.items():
                data[f"tables/{name}"] = wandb.Table(dataframe=_wandb_frame(table))
            run.log(data)
        finally:
            run.finish()
    except Exception as err:
        _warn(f"W&B logging of the report failed ({type(err).__name__}: {err}); the files in {out} are complete")


def _wandb_frame(table: pd.DataFrame) -> pd.DataFrame:
    """W&B tables want plain column names and cells: stringify anything that is not a number or text."""
    frame = table.copy()
    frame.columns = [str(c) for c in frame.columns]
    for col in frame.columns:
        if frame[col].dtype == object:
            frame[col] = frame[col].map(lambda v: v if isinstance(v, (str, int, float)) or v is None else str(v))
    return frame


# ------------------------------------------------------------------------------------------------ CLI


def _sweep_wandb(root: Path) -> dict:
    """The sweep file's wandb section (<root>/sweep.yaml, as run), or the defaults."""
    try:
        import yaml

        data = yaml.safe_load((root / "sweep.yaml").read_text()) or {}
        return dict(data.get("wandb") or {})
    except FileNotFoundError:
        return {}
    except Exception as err:
        _warn(f"{root / 'sweep.yaml'}: unreadable ({err}); W&B with the default settings")
        return {}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flatray.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the sweep folder, STORAGE/SWEEP (holds <id>/trial.json, <id>/summary.json)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if "://" in args.root:
        print(f"error: {args.root}: a local folder is needed (copy the sweep folder down first)", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"error: {root}: no such folder (expected STORAGE/SWEEP, e.g. results/sweeps/smoke)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        out = report(root, None if args.no_wandb else _sweep_wandb(root))
    print(f"report written to {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
