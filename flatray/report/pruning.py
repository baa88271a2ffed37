"""Report sections of the pruning methods: IMP (metric vs sparsity), ticket transfer (within and across tasks) and
CoFi structured pruning; and the row hooks that derive their trials' columns (load.ROW_HOOKS)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from flatray.report import compare
from flatray.report.figures import COLORS, _figure, _save, _yerr
from flatray.report.load import Trial, _get, _num
from flatray.report.tables import (
    OPTIMIZERS, Section, _best_of_search, _by_parent_optimizer, _cell, _done, _finished, _grid_missing, _markdown,
    _multi_stats, _opt_key, _pct, _pivot, _sorted_opts, _sorted_tasks, _stats, _task_key, metric_label, metric_name)

LINESTYLES = {"magnitude": "-", "random": "--"}
MARKERS = {"magnitude": "o", "random": "s"}


# ------------------------------------------------------------------------------------------------ row hooks


def _sparsity_pct(sparsity, metrics: dict) -> float:
    """The configured sparsity in %, else the one the run measured."""
    return round(100 * _num(sparsity if sparsity is not None else metrics.get("sparsity")), 2)


def imp_row(row: dict, trial: Trial, ancestors: list[Trial]) -> None:
    row["sparsity_pct"] = _sparsity_pct(_get(trial.config, "prune.sparsity"), trial.metrics)
    row["method"] = f"{row['optimizer']} {row['prune_method']}"


def transfer_row(row: dict, trial: Trial, ancestors: list[Trial]) -> None:
    # The mask comes from the nearest IMP ancestor: its task, the optimizer its chain trained with, its sparsity.
    source = next((a for a in ancestors if a.record.get("kind") == "imp"), ancestors[0] if ancestors else None)
    scfg = source.config if source else {}
    row.update(source_task=scfg.get("task"), mask_optimizer=_get(scfg, "optimizer.name"),
               mask_method=_get(scfg, "prune.method", "magnitude"),
               sparsity_pct=_sparsity_pct(_get(scfg, "prune.sparsity", _get(trial.config, "prune.sparsity")),
                                          trial.metrics))


def pruned_root_row(row: dict, trial: Trial, ancestors: list[Trial]) -> None:
    """A fine-tuning run with a mask from theta_0 and no chain: P1's random control (a line of the IMP figure)."""
    sparsity = _get(trial.config, "prune.sparsity")
    if sparsity is not None:
        row["sparsity_pct"] = round(100 * _num(sparsity), 2)
        how = row["prune_method"]
        row["method"] = f"{row['optimizer']} {how}" + ("" if how == "random" else " one-shot")


# ------------------------------------------------------------------------------------------------ 1. IMP


IMP_COLUMNS = ["id", "task", "optimizer", "prune_method", "method", "seed", "sparsity_pct", "score"]


def _imp_points(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The points of the IMP lines: every finished imp level, every pruned root fine-tuning run (a random mask
    from theta_0, as P1's random control), and at 0% the dense models: the roots of the imp chains (level 1's
    parent), each once per line of its task and optimizer. Returns (points, dense models, notes)."""
    done = _finished(df)
    imp = _done(df, "imp")
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
    sec = Section("IMP: metric vs sparsity (P1 Figure 2 / Table 1)",
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
    magnitude = points[points["prune_method"] == "magnitude"] if "prune_method" in points else points
    diff = compare.paired(magnitude)
    if not diff.empty:  # SAM − Adam tickets paired by seed (flatray.report.compare)
        sec.tables["imp_sam_minus_adam"] = diff
        sec.markdown["imp_sam_minus_adam"] = compare.markdown(diff)
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
    sec = Section("Mask source x re-training optimizer (P1 Table 6)",
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
    sec = Section("Ticket transfer across tasks (P1 Figure 4)",
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


# ------------------------------------------------------------------------------------------------ 5. CoFi

COFI_VALUES = {"teacher_metric": "parent_score", "pruned_metric": "score", "sparsity": "sparsity", "params": "params"}


def cofi_table(df: pd.DataFrame, out: Path) -> Section:
    """P1 Table 2: CoFi structured pruning with distillation; only the teacher's optimizer differs."""
    sec = Section("CoFi structured pruning (P1 Table 2)",
                  "Teacher = the fine-tuned model (its dev metric), pruned = the distilled, pruned and fine-tuned "
                  "student; real sparsity over the encoder's prunable weights; params = the student's parameters.")
    cofi = _best_of_search(_done(df, "cofi"), ["task"])  # also trials recorded as "structured", its alias
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
