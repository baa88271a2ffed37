"""Report sections of the quantization methods: post-training int8 quantization (PTQ) and SQuAT by weight bits; and
the row hook that labels a SQuAT trial with its method (load.ROW_HOOKS)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from flatray.report.figures import _figure, _save, _yerr
from flatray.report.load import Trial, _get, _num
from flatray.report.tables import (
    DASH, Section, _best_of_search, _by_parent_optimizer, _cell, _column, _done, _grid_missing, _markdown,
    _multi_stats, _opt_key, _pivot, _sorted_tasks, _stats, _task_key, metric_label, metric_name)

SQUAT_METHODS = ("SQuAT", "SAM+LSQ joint", "LSQ-QAT + KD", "LSQ-QAT")
SQUAT_TEACHER = "full precision (teacher)"


# ------------------------------------------------------------------------------------------------ row hook


def _squat_method(cfg: dict) -> str:
    """METHODS.md section 9: SQuAT = SAM/ASAM alternating with the step sizes; the rest are its baselines."""
    sq = cfg.get("squat") or {}
    if _get(cfg, "optimizer.name", "adam") in ("sam", "asam"):
        return "SQuAT" if sq.get("alternate", True) else "SAM+LSQ joint"
    kd = sum(_num(sq.get(k, d)) for k, d in (("kd_logits", 1.0), ("kd_hidden", 0.0), ("kd_attention", 0.0)))
    return "LSQ-QAT + KD" if kd > 0 else "LSQ-QAT"


def squat_row(row: dict, trial: Trial, ancestors: list[Trial]) -> None:
    row["bits"] = _get(trial.config, "squat.weight_bits")
    row["method"] = _squat_method(trial.config)


# ------------------------------------------------------------------------------------------------ 4. PTQ

PTQ_VALUES = {"float_metric": "float/score", "int8_metric": "int8/score", "drop": "drop",
              "float_size_mb": "float/size_mb", "int8_size_mb": "int8/size_mb", "size_ratio": "size_ratio",
              "float_latency_ms": "float/latency_ms", "int8_latency_ms": "int8/latency_ms", "speedup": "speedup"}
PTQ_TITLES = {"float_metric": ("float", 4), "int8_metric": ("int8", 4), "drop": ("drop", 4),
              "float_size_mb": ("float MB", 2), "int8_size_mb": ("int8 MB", 2), "size_ratio": ("size ratio", 2),
              "float_latency_ms": ("float ms", 2), "int8_latency_ms": ("int8 ms", 2), "speedup": ("speedup", 2)}


def ptq_table(df: pd.DataFrame, out: Path) -> Section:
    """P1 Table 8: dynamic int8 quantization of the full fine-tuned model, per task and its optimizer."""
    sec = Section("Post-training dynamic int8 quantization (P1 Table 8)",
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


# ------------------------------------------------------------------------------------------------ 6. SQuAT


def squat_bits(df: pd.DataFrame, out: Path) -> Section:
    """P2: the dev metric of each quantization-aware method by weight bits, with the full-precision teacher."""
    sec = Section("SQuAT by weight bits (P2)",
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
