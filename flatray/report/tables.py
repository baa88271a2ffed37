"""Statistics and tables shared by the report's sections: Section, cell statistics (mean, sample std, n), Markdown
tables, metric names, and the order of tasks and optimizers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from flatray import methods

DASH = "—"
OPTIMIZERS = ("adam", "sam", "asam")
METRIC_NAMES = {"accuracy": "accuracy", "matthews": "Matthews corr.", "pearson": "Pearson corr.", "f1": "F1"}


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


# ------------------------------------------------------------------------------------------------ selecting trials


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "done"] if not df.empty else df


def _done(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The finished trials of a method, whichever of its names (aliases) their records use."""
    if df.empty:
        return df
    name = methods.canonical(kind)
    kinds = df["kind"].map(lambda k: methods.canonical(k) if isinstance(k, str) else k)
    return df[(kinds == name) & (df["status"] == "done")]


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


def _by_parent_optimizer(rows: pd.DataFrame) -> pd.DataFrame:
    """Dependent runs (ptq, structured, sharpness) are labelled by the optimizer their parent model trained with."""
    return rows.assign(optimizer=rows["parent_optimizer"].fillna(rows["optimizer"]))


# ------------------------------------------------------------------------------------------------ statistics


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
        df[column] = _column(df, column)
    groups = df.groupby(by, sort=True)
    out = groups.size().rename("n").to_frame()
    for name, column in values.items():
        out[f"{name}_mean"] = groups[column].mean()
        out[f"{name}_std"] = groups[column].std(ddof=1)
    return out.reset_index()


def _grid_missing(stats: pd.DataFrame, what: str, name: str = "optimizer") -> list[str]:
    opts = _sorted_opts(stats[name])
    have = set(zip(stats["task"], stats[name]))
    return [f"{what}: {t} / {o}: no finished trial" for t in _sorted_tasks(stats["task"]) for o in opts
            if (t, o) not in have]


# ------------------------------------------------------------------------------------------------ formatting


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: float, digits: int = 4) -> str:
    return DASH if _blank(value) else f"{value:,.{digits}f}"


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
        return DASH if _blank(v) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(text(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{value:g}%"


def _delta(value: float, digits: int = 2) -> str:
    """A signed difference, e.g. "+0.43" / "-1.20"; "—" when undefined."""
    return DASH if _blank(value) else f"{value:+.{digits}f}"
