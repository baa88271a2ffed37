"""Report sections about flatness and the search: epsilon-sharpness by eps and optimizer, and each searched root
experiment's score against its searched keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flatray.report.figures import COLORS, _figure, _log_x, _save, _yerr
from flatray.report.load import _get
from flatray.report.tables import (
    Section, _column, _done, _finished, _grid_missing, _markdown, _opt_key, _pivot, _sorted_opts, _sorted_tasks, _stats,
    _task_key, metric_label)


# ------------------------------------------------------------------------------------------------ 7. sharpness


def _sharpness_points(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per (measured model, eps): sharpness trials measure their parent, fine-tuning runs themselves. Only
    dense full-precision fine-tuned models (P1 Table 3); also returns how many other measured trials were skipped."""
    done = _finished(df)
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
    sec = Section("Sharpness by eps and optimizer (P1 Table 3)",
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
    done = _done(df, "finetune")
    done = done[done["parent"].isna()] if not done.empty else done
    sections = []
    for experiment, trials in sorted(done.groupby("experiment")) if not done.empty else []:
        sec = Section(f"The search: experiment {experiment}",
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
