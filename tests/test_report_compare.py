"""SAM − Adam paired by seed (flatray.report.compare) against the t formulas worked out by hand."""

import math

import pandas as pd
import pytest
from scipy import stats

from flatray.report import compare


def points(rows):
    return pd.DataFrame(rows, columns=["task", "optimizer", "seed", "sparsity_pct", "score"])


def test_paired_difference_interval_and_p_by_hand():
    adam = {0: 0.80, 1: 0.78, 2: 0.79}
    sam = {0: 0.82, 1: 0.82, 2: 0.79}  # differences 0.02, 0.04, 0.00
    rows = [("rt", "adam", s, 30.0, v) for s, v in adam.items()] + [("rt", "sam", s, 30.0, v) for s, v in sam.items()]
    rows.append(("rt", "sam", 3, 30.0, 0.9))  # no Adam run of seed 3: not a pair
    (row,) = compare.paired(points(rows)).to_dict("records")
    mean, std, n = 0.02, 0.02, 3  # sample std of (0.02, 0.04, 0.00) = 0.02
    half = 4.302652729911275 * std / math.sqrt(n)  # t_{0.975, 2}
    t_stat = mean / (std / math.sqrt(n))
    assert row["n_pairs"] == 3
    assert row["diff_mean"] == pytest.approx(mean) and row["diff_std"] == pytest.approx(std)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(t_stat, n - 1))  # = 0.225


def test_one_pair_gives_the_difference_alone_and_cells_stay_apart():
    rows = [("rt", "adam", 0, 0.0, 0.7), ("rt", "sam", 0, 0.0, 0.75),
            ("rt", "adam", 0, 60.0, 0.6), ("rt", "sam", 0, 60.0, 0.5), ("cp", "adam", 0, 60.0, 0.6)]
    table = compare.paired(points(rows))
    assert list(zip(table["task"], table["sparsity_pct"])) == [("rt", 0.0), ("rt", 60.0)]
    assert table["diff_mean"].tolist() == pytest.approx([0.05, -0.1])
    assert table["p_value"].isna().all() and table["ci_low"].isna().all()
    text = compare.markdown(table)
    assert "| rt | 60% | -10.00 | — | — | 1 |" in text


def test_equal_differences_give_no_p_value():
    rows = [("rt", "adam", 0, 40.0, 0.70), ("rt", "sam", 0, 40.0, 0.72),
            ("rt", "adam", 1, 40.0, 0.60), ("rt", "sam", 1, 40.0, 0.62)]
    row = compare.paired(points(rows)).iloc[0]
    assert row["diff_mean"] == pytest.approx(0.02) and row["diff_std"] == pytest.approx(0, abs=1e-12)
    assert math.isnan(row["p_value"])


def test_no_pairs_no_rows():
    assert compare.paired(points([("rt", "adam", 0, 0.0, 0.7)])).empty
