import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from flatray.data import metrics as M


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_accuracy_and_f1_match_sklearn(rng):
    for _ in range(5):
        y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        assert M.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
        assert M.f1_binary(p, y) == pytest.approx(skm.f1_score(y, p))
    # no positives anywhere: F1 is undefined, report 0 like sklearn's zero_division=0
    assert M.f1_binary([0, 0, 0], [0, 0, 0]) == 0.0


def test_matthews_binary_and_multiclass(rng):
    for k in (2, 3, 5):
        y, p = rng.integers(0, k, 300), rng.integers(0, k, 300)
        p[:150] = y[:150]  # make it correlated so the value is not ~0
        assert M.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))


def test_matthews_degenerate_constant_prediction(rng):
    y = rng.integers(0, 2, 50)
    p = np.ones(50, dtype=int)
    assert M.matthews_corrcoef(p, y) == 0.0
    assert skm.matthews_corrcoef(y, p) == 0.0
    assert M.matthews_corrcoef(y, y) == pytest.approx(1.0)
    assert M.matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)


def test_pearson_spearman_match_scipy(rng):
    x = rng.normal(size=100)
    y = 0.5 * x + rng.normal(size=100)
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    # heavy ties (STS-B gold scores are on a coarse grid)
    xt, yt = rng.integers(0, 6, 100).astype(float), rng.integers(0, 4, 100) + x
    assert M.spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0])
    assert M.spearman(xt, np.round(yt)) == pytest.approx(stats.spearmanr(xt, np.round(yt))[0])
    # [n, 1] regression outputs are accepted
    assert M.pearson(x[:, None], y) == pytest.approx(stats.pearsonr(x, y)[0])


def test_rank_averages_ties():
    np.testing.assert_allclose(M._rank([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


def test_normalize_answer():
    assert M.normalize_answer("  The  Eiffel-Tower, a landmark! ") == "eiffeltower landmark"
    assert M.normalize_answer("An apple") == "apple"
    assert M.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_squad_em_f1_by_hand():
    refs = {
        "q1": ["Eiffel Tower", "the tower"],
        "q2": ["in the year 1889"],
        "q3": ["Paris"],
        "q4": ["Gustave Eiffel"],
    }
    preds = {
        "q1": "the Eiffel Tower",  # normalizes to the first gold: EM 1, F1 1
        "q2": "1889 exhibition",  # gold "in year 1889" (3 tokens), pred 2 tokens, 1 common:
        # P = 1/2, R = 1/3, F1 = 2 * (1/2 * 1/3) / (1/2 + 1/3) = 0.4
        "q3": "London",  # nothing in common
        # q4 missing -> counts as 0
    }
    out = M.squad_em_f1(preds, refs)
    assert out["exact_match"] == pytest.approx(100 * 1 / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 0.4 + 0 + 0) / 4)


def test_squad_max_over_golds():
    refs = {"q": ["Denver Broncos", "the Broncos", "Broncos football team"]}
    out = M.squad_em_f1({"q": "Broncos team"}, refs)
    # vs "denver broncos": common 1, P 1/2, R 1/2 -> 0.5
    # vs "broncos":        common 1, P 1/2, R 1   -> 2/3
    # vs "broncos football team": common 2, P 1, R 2/3 -> 0.8
    assert out["exact_match"] == 0.0
    assert out["f1"] == pytest.approx(80.0)
    assert M.squad_em_f1({"q": "broncos"}, refs)["exact_match"] == 100.0
