"""Report section of one-shot magnitude pruning without retraining (P1 A.3, Figure 7): the dev metric of each
pruned model against its sparsity, one line per optimizer the pruned model was fine-tuned with."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from flatray.report import compare
from flatray.report.figures import COLORS, _figure, _save, _yerr
from flatray.report.tables import (Section, _best_of_search, _by_parent_optimizer, _done, _markdown, _opt_key,
                                   _pct, _pivot, _sorted_opts, _sorted_tasks, _stats, metric_label)

SCORE_KEY = re.compile(r"^oneshot/([0-9.e+-]+)/score$")  # flatray.methods.oneshot.key(sparsity, "score")


def _points(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial and sparsity: task, optimizer, seed, sparsity_pct, score (0% = the dense model)."""
    columns = {c: round(100 * float(m.group(1)), 2) for c in trials.columns if (m := SCORE_KEY.match(str(c)))}
    rows = [dict(id=t["id"], task=t["task"], optimizer=t["optimizer"], seed=t["seed"], sparsity_pct=pct,
                 score=t[column])
            for t in trials.to_dict("records") for column, pct in columns.items()]
    return pd.DataFrame(rows, columns=["id", "task", "optimizer", "seed", "sparsity_pct", "score"])


def oneshot_sparsity(df: pd.DataFrame, out: Path) -> Section:
    """P1 Figure 7: fine-tuned models pruned once by global magnitude and evaluated without retraining; per task a
    line per optimizer, mean ± std over seeds as a band."""
    sec = Section("One-shot magnitude pruning without retraining (P1 Figure 7)",
                  "Each fine-tuned model pruned by one global magnitude ranking over the prunable weights (as IMP "
                  "ranks them) to each sparsity and evaluated on the dev set as it is; 0% = the dense model. Lines "
                  "by the optimizer the model was fine-tuned with; band: ± one sample std over seeds.")
    trials = _by_parent_optimizer(_best_of_search(_done(df, "oneshot"), ["task"]))
    points = _points(trials)
    stats = _stats(points, ["task", "optimizer", "sparsity_pct"])
    if stats.empty:
        sec.missing.append("no finished oneshot trials: no one-shot pruning figure or table")
        return sec
    sec.tables["oneshot_sparsity"] = stats

    tasks = _sorted_tasks(stats["task"])
    opts = _sorted_opts(stats["optimizer"])
    rows = [(t, o) for t in tasks for o in opts if ((stats["task"] == t) & (stats["optimizer"] == o)).any()]
    table, missing = _pivot(stats, rows, ["task", "optimizer"], "sparsity_pct", sorted(set(stats["sparsity_pct"])),
                            _pct)
    sec.markdown["oneshot_sparsity"] = _markdown(table)
    sec.missing += [f"oneshot: {t} / {o} at {s:g}% sparsity: no finished trial" for t, o, s in missing]
    diff = compare.paired(points)
    if not diff.empty:  # SAM − Adam paired by seed (flatray.report.compare)
        sec.tables["oneshot_sam_minus_adam"] = diff
        sec.markdown["oneshot_sam_minus_adam"] = compare.markdown(diff)

    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        for opt in sorted(set(stats.loc[stats["task"] == task, "optimizer"]), key=_opt_key):
            s = stats[(stats["task"] == task) & (stats["optimizer"] == opt)].sort_values("sparsity_pct")
            mean, err = s["mean"].to_numpy(dtype=float), _yerr(s["std"])
            (line,) = ax.plot(s["sparsity_pct"], mean, marker="o", label=f"{opt} (n={s['n'].max()})",
                              color=COLORS.get(opt))
            ax.fill_between(s["sparsity_pct"], mean - err, mean + err, alpha=0.2, color=line.get_color())
        ax.set(title=f"{task}: one-shot pruning, no retraining", xlabel="sparsity (%)", ylabel=metric_label(task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("One-shot magnitude pruning: metric vs sparsity (mean ± std over seeds)")
    sec.figures.append(_save(fig, out, "oneshot_sparsity.png"))
    return sec
