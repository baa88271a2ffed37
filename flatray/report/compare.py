"""SAM − Adam, paired by seed: is the difference at each sparsity more than seed noise?

A SAM run and an Adam run of the same task and seed share their data order and head init, so their scores pair.
Per cell (task, sparsity) the table gives the mean paired difference SAM − Adam, its sample std, the 95% t
interval and the two-sided paired t-test's p (scipy.stats.ttest_rel). With the handful of seeds a study affords, a
bootstrap over pairs would have too few distinct resamples to mean anything (3 pairs: 10), so the t interval is
what is reported; it assumes the paired differences are roughly normal. n = 1 pair gives the difference alone.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

COLUMNS = ["task", "sparsity_pct", "n_pairs", "diff_mean", "diff_std", "ci_low", "ci_high", "p_value"]


def paired(points: pd.DataFrame, by: tuple[str, ...] = ("task", "sparsity_pct"), a: str = "sam",
           b: str = "adam") -> pd.DataFrame:
    """points: one row per trial with `by` columns, optimizer, seed and score. Returns one row per cell of `by` where
    both optimizers have a seed in common: the paired statistics of score[a] − score[b] over those seeds."""
    by = list(by)
    data = points.assign(score=pd.to_numeric(points["score"], errors="coerce")).dropna(subset=["score"])
    data = data[data["optimizer"].isin([a, b])]
    wide = data.pivot_table(index=[*by, "seed"], columns="optimizer", values="score", aggfunc="mean")
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=[*by, *COLUMNS[2:]])
    diffs = (wide[a] - wide[b]).dropna()
    rows = []
    for cell, d in diffs.groupby(level=list(range(len(by)))):
        cell = cell if isinstance(cell, tuple) else (cell,)
        n, mean = len(d), float(d.mean())
        row = dict(zip(by, cell), n_pairs=n, diff_mean=mean, diff_std=math.nan, ci_low=math.nan, ci_high=math.nan,
                   p_value=math.nan)
        if n >= 2:
            std = float(d.std(ddof=1))
            half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
            row.update(diff_std=std, ci_low=mean - half, ci_high=mean + half,
                       # equal differences (a real case: 2 seeds, each 3 dev examples apart) leave t undefined
                       p_value=float(stats.ttest_rel(wide.loc[d.index, a], wide.loc[d.index, b]).pvalue)
                       if std > 1e-12 else math.nan)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *COLUMNS[2:]])


def markdown(table: pd.DataFrame, what: str = "sparsity") -> str:
    """The paired table as Markdown: difference in points of the metric (x 100), its interval, p and the pairs."""
    if table.empty:
        return ""
    lines = [f"| task | {what} | SAM − Adam | 95% CI | p (paired t) | pairs |", "|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        ci = "—" if math.isnan(r["ci_low"]) else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"
        p = "—" if math.isnan(r["p_value"]) else f"{r['p_value']:.3f}"
        lines.append(f"| {r['task']} | {r['sparsity_pct']:g}% | {100 * r['diff_mean']:+.2f} | {ci} | {p} | "
                     f"{r['n_pairs']} |")
    return "\n".join(lines) + "\n\nDifferences in points of the dev metric (× 100); positive: SAM higher.\n"
