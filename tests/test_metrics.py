import math

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from covguard.metrics import (
    DetectionMetrics,
    check_scores,
    evaluate,
    fpr_at_95tpr_ood_positive,
    fpr_at_tpr,
    roc_points,
)


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _naive_fpr_at_tpr(positive: np.ndarray, negative: np.ndarray, tpr: float) -> float:
    """Reference: try every threshold ``conf >= t`` (larger = more positive) and keep the best FPR."""
    best = 1.0
    for t in np.unique(np.concatenate([positive, negative])):
        if (positive >= t).mean() >= tpr:
            best = min(best, float((negative >= t).mean()))
    return best


# --- hand-computed cases --------------------------------------------------------------------


def test_perfect_separation():
    m = evaluate([0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0])
    assert m == DetectionMetrics(auroc=1.0, fpr_at_95tpr=0.0, aupr_in=1.0, aupr_out=1.0, n_in=4, n_out=3)
    assert fpr_at_95tpr_ood_positive([0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0]) == 0.0


def test_reversed_separation():
    m = evaluate([10.0, 11.0, 12.0], [0.0, 1.0, 2.0, 3.0])
    assert m.auroc == 0.0
    assert m.fpr_at_95tpr == 1.0
    assert fpr_at_95tpr_ood_positive([10.0, 11.0, 12.0], [0.0, 1.0, 2.0, 3.0]) == 1.0


def test_fpr_with_ties_both_conventions():
    # 20 clean scores 0..19, shifted scores tie with clean ones at 18 (twice) and 19.
    scores_in = np.arange(20, dtype=float)
    scores_out = np.array([18.0, 18.0, 19.0, 25.0])
    # In-distribution positive: accepting 19/20 = 95% clean needs threshold score <= 18, which
    # also accepts both shifted 18s -> 2/4. Threshold 17 accepts only 18/20 = 90%.
    assert fpr_at_tpr(scores_in, scores_out) == 0.5
    assert evaluate(scores_in, scores_out).fpr_at_95tpr == 0.5
    # Shifted positive: flagging >= 95% of 4 shifted samples means all 4, threshold score >= 18,
    # which also flags clean 18 and 19 -> 2/20.
    assert fpr_at_95tpr_ood_positive(scores_in, scores_out) == 0.1
    # AUROC by counting pairs: P(out > in) + P(tie) / 2 over 20 * 4 pairs.
    pairs = sum(float(o > i) + 0.5 * float(o == i) for o in scores_out for i in scores_in)
    assert evaluate(scores_in, scores_out).auroc == pytest.approx(pairs / 80)


def test_fpr_reads_the_first_operating_point_reaching_the_level():
    # ROC points (in-distribution positive): (FPR 0, TPR 0.9), (0.25, 0.95), (0.5, 1.0) are
    # collinear; roc_curve's default drop_intermediate=True drops the middle one and gives 0.5.
    scores_in = [0.0] * 18 + [1.0, 2.0]
    scores_out = [1.0, 2.0, 10.0, 10.0]
    assert fpr_at_tpr(scores_in, scores_out) == 0.25


@pytest.mark.parametrize("seed", range(5))
def test_fpr_matches_naive_reference_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    scores_in = rng.integers(0, 8, size=37).astype(float)
    scores_out = rng.integers(3, 12, size=23).astype(float)
    assert fpr_at_tpr(scores_in, scores_out) == pytest.approx(_naive_fpr_at_tpr(-scores_in, -scores_out, 0.95))
    assert fpr_at_tpr(scores_in, scores_out, tpr=0.8) == pytest.approx(
        _naive_fpr_at_tpr(-scores_in, -scores_out, 0.8)
    )
    assert fpr_at_95tpr_ood_positive(scores_in, scores_out) == pytest.approx(
        _naive_fpr_at_tpr(scores_out, scores_in, 0.95)
    )


def test_aupr_against_sklearn_with_explicit_labels():
    rng = np.random.default_rng(1)
    scores_in = rng.normal(0.0, 1.0, size=300)
    scores_out = rng.normal(1.0, 1.5, size=100)
    scores = np.concatenate([scores_in, scores_out])
    in_positive = np.r_[np.ones(300), np.zeros(100)]
    out_positive = np.r_[np.zeros(300), np.ones(100)]
    m = evaluate(scores_in, scores_out)
    assert m.aupr_in == pytest.approx(average_precision_score(in_positive, -scores))
    assert m.aupr_out == pytest.approx(average_precision_score(out_positive, scores))
    assert m.auroc == pytest.approx(roc_auc_score(out_positive, scores))
    assert m.auroc == pytest.approx(roc_auc_score(in_positive, -scores))  # symmetric
    assert m.aupr_in != pytest.approx(m.aupr_out, abs=1e-3)  # the two differ with 3:1 imbalance
    assert (m.n_in, m.n_out) == (300, 100)


def test_gaussian_shift_matches_closed_form():
    # in ~ N(0, 1), out ~ N(delta, 1): AUROC = Phi(delta / sqrt 2); with equal variances both
    # FPR conventions equal Phi(z_0.95 - delta).
    delta, n, z95 = 1.0, 20000, 1.6448536269514722
    rng = np.random.default_rng(0)
    scores_in = rng.normal(0.0, 1.0, size=n)
    scores_out = rng.normal(delta, 1.0, size=n)
    m = evaluate(scores_in, scores_out)
    assert m.auroc == pytest.approx(_phi(delta / math.sqrt(2.0)), abs=0.02)
    assert m.fpr_at_95tpr == pytest.approx(_phi(z95 - delta), abs=0.02)
    assert fpr_at_95tpr_ood_positive(scores_in, scores_out) == pytest.approx(_phi(z95 - delta), abs=0.02)


def test_invariant_to_order_and_monotone_transform():
    rng = np.random.default_rng(2)
    scores_in = rng.normal(size=200)
    scores_out = rng.normal(0.5, size=150)
    m = evaluate(scores_in, scores_out)
    assert evaluate(rng.permutation(scores_in), rng.permutation(scores_out)) == m
    transformed = evaluate(np.exp(scores_in), np.exp(scores_out))
    for name in ("auroc", "fpr_at_95tpr", "aupr_in", "aupr_out"):
        assert getattr(transformed, name) == pytest.approx(getattr(m, name))


def test_torch_and_list_inputs_match_numpy():
    rng = np.random.default_rng(3)
    scores_in = rng.normal(size=50)
    scores_out = rng.normal(1.0, size=40)
    m = evaluate(scores_in, scores_out)
    t_in = torch.tensor(scores_in, dtype=torch.float64, requires_grad=True)
    assert evaluate(t_in, torch.tensor(scores_out)) == m
    assert evaluate(scores_in.tolist(), scores_out.tolist()) == m


def test_to_dict():
    d = evaluate([0.0, 1.0], [2.0]).to_dict()
    assert d == {"auroc": 1.0, "fpr_at_95tpr": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "n_in": 2, "n_out": 1}
    assert all(type(v) in (float, int) for v in d.values())


def test_roc_points():
    fpr, tpr = roc_points([0.0, 1.0, 2.0, 3.0], [1.5, 2.5])
    # flag score >= t for t = +inf, 3, 2.5, 2, 1.5, 0; the point of t = 1, (0.75, 1), is collinear
    # with its neighbours and dropped by sklearn
    np.testing.assert_allclose(fpr, [0.0, 0.25, 0.25, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    assert auc(fpr, tpr) == pytest.approx(evaluate([0.0, 1.0, 2.0, 3.0], [1.5, 2.5]).auroc)


# --- +inf ---------------------------------------------------------------------------------------


def test_posinf_ranks_above_every_finite_score():
    rng = np.random.default_rng(4)
    scores_in = np.r_[rng.normal(size=100), np.inf]
    scores_out = np.r_[rng.normal(1.0, size=60), np.inf, np.inf]
    # the same metrics as with +inf replaced by a finite value above every score
    big = 1e6
    expected = evaluate(np.where(np.isinf(scores_in), big, scores_in), np.where(np.isinf(scores_out), big, scores_out))
    assert evaluate(scores_in, scores_out) == expected
    assert fpr_at_95tpr_ood_positive(scores_in, scores_out) == fpr_at_95tpr_ood_positive(
        np.where(np.isinf(scores_in), big, scores_in), np.where(np.isinf(scores_out), big, scores_out)
    )
    fpr, tpr = roc_points(scores_in, scores_out)
    assert np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr))


def test_all_shifted_posinf_is_perfect():
    m = evaluate([0.0, 1.0, 2.0], [np.inf, np.inf])
    assert (m.auroc, m.fpr_at_95tpr, m.aupr_in, m.aupr_out) == (1.0, 0.0, 1.0, 1.0)


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scores_in", "scores_out"])
@pytest.mark.parametrize(
    ("bad", "received"),
    [
        (np.array([]), "got shape (0,)"),
        (np.zeros((3, 2)), "got shape (3, 2)"),
        (np.array([0.0, np.nan]), "got 1 NaN and 0 -inf"),
        (np.array([0.0, -np.inf]), "got 0 NaN and 1 -inf"),
        (np.array(["a", "b"]), "got ndarray"),
    ],
)
def test_invalid_scores_name_the_argument(name, bad, received):
    good = np.arange(5.0)
    kwargs = {"scores_in": good, "scores_out": good, name: bad}
    for fn in (evaluate, fpr_at_tpr, fpr_at_95tpr_ood_positive, roc_points):
        with pytest.raises(ValueError, match=name) as info:
            fn(**kwargs)
        assert received in str(info.value)


def test_check_scores_returns_float64():
    out = check_scores(torch.tensor([1.0, float("inf")], dtype=torch.float32), "scores_out")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1.0, np.inf])


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_tpr(tpr):
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\]"):
        fpr_at_tpr([0.0, 1.0], [2.0], tpr=tpr)
