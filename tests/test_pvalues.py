"""Conformal p-values with an exponential tail, and the Fisher / Sidak min-p rules, against numpy."""

import math

import numpy as np
import pytest
import torch

from covguard.pvalues import RULES, fisher_score, log_p_values, sidak_score, tail_scale


def reference_p(scores: np.ndarray, calibration: np.ndarray, tail_size: int) -> np.ndarray:
    """p(s) = (1 + #{c >= s}) / (n + 1) up to max c; exp(-(s - max c) / sigma) / (n + 1) beyond; 0 if not finite."""
    c = np.sort(calibration)
    n = len(c)
    k = min(tail_size, n - 1)
    sigma = c[n - k :].mean() - c[n - k - 1]
    out = []
    for s in scores:
        if not np.isfinite(s):
            out.append(0.0)
        elif s > c[-1]:
            out.append(np.exp(-(s - c[-1]) / sigma) / (n + 1))
        else:
            out.append((1 + np.sum(c >= s)) / (n + 1))
    return np.array(out)


@pytest.fixture
def calibration():
    rng = np.random.default_rng(0)
    return np.round(rng.gamma(2.0, 1.5, size=200), 1)  # ties on a 0.1 grid


@pytest.mark.parametrize("tail_size", [1, 20, 500])
def test_p_values_equal_the_numpy_formula(calibration, tail_size):
    c = np.sort(calibration)
    queries = np.concatenate([
        c[::7],  # calibration values themselves (ties)
        c[::11] + 0.05,  # between values
        [c[0] - 5, c[-1], c[-1] + 1e-6, c[-1] + 0.3, c[-1] + 7.0, c[-1] + 1e3],
        [np.inf, -np.inf, np.nan],
    ])
    cal = torch.from_numpy(c)
    scale = tail_scale(cal, tail_size)
    k = min(tail_size, len(c) - 1)
    assert scale == pytest.approx(c[len(c) - k :].mean() - c[len(c) - k - 1], rel=1e-12)
    got = log_p_values(torch.from_numpy(queries), cal, scale).exp().numpy()
    np.testing.assert_allclose(got, reference_p(queries, calibration, tail_size), rtol=1e-10, atol=0)


def test_p_values_take_float32_scores_and_any_batch_size(calibration):
    cal = torch.from_numpy(np.sort(calibration))
    scale = tail_scale(cal, 20)
    s = torch.linspace(-1, 40, 101)  # float32
    whole = log_p_values(s, cal, scale)
    parts = torch.cat([log_p_values(s[i : i + 7], cal, scale) for i in range(0, 101, 7)])
    assert whole.dtype == torch.float64
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)


def test_tail_is_monotone_and_continuous_at_the_largest_calibration_score(calibration):
    c = np.sort(calibration)
    cal, n = torch.from_numpy(c), len(c)
    scale = tail_scale(cal, 20)
    grid = torch.linspace(c[0] - 1, c[-1] + 30 * scale, 20001, dtype=torch.float64)
    log_p = log_p_values(grid, cal, scale)
    assert (log_p.diff() <= 0).all()  # non-increasing everywhere
    beyond = grid > c[-1]
    assert (log_p[beyond].diff() < 0).all()  # strictly decreasing in the tail: extreme inputs keep ranking
    # junction: the tail starts at 1 / (n + 1), the empirical p-value just above the largest score
    for delta in (1e-3, 1e-6, 1e-9):
        right = log_p_values(torch.tensor([c[-1] + delta * scale], dtype=torch.float64), cal, scale)
        assert float(right) == pytest.approx(-math.log(n + 1) - delta, abs=1e-12)
    at_max = float(log_p_values(torch.tensor([c[-1]], dtype=torch.float64), cal, scale))
    assert at_max >= -math.log(n + 1)
    # far beyond: p underflows but log p stays finite and ordered
    far = log_p_values(torch.tensor([c[-1] + 1e4 * scale, c[-1] + 2e4 * scale], dtype=torch.float64), cal, scale)
    assert torch.isfinite(far).all() and far[0] > far[1]
    assert float(far[0]) == pytest.approx(-1e4 - math.log(n + 1), rel=1e-9)


def test_tail_scale_of_tied_top_scores_falls_back_with_a_warning():
    tied = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="tie"):
        assert tail_scale(tied, 2) == pytest.approx(5.0 / 6)
    with pytest.warns(RuntimeWarning, match="all scores tie"):
        assert tail_scale(torch.full((4,), 3.0, dtype=torch.float64), 2) == 1.0


def test_fisher_and_minp_on_hand_computed_cases():
    p = torch.tensor([[0.5, 0.1], [1.0, 1.0], [0.02, 0.9], [0.0, 0.5]], dtype=torch.float64)
    log_p = p.log()
    fisher = fisher_score(log_p)
    assert fisher[0] == pytest.approx(-2 * (math.log(0.5) + math.log(0.1)))  # 5.991
    assert fisher[1] == 0.0
    assert fisher[2] == pytest.approx(-2 * (math.log(0.02) + math.log(0.9)))
    assert fisher[3] == math.inf  # a failed member (p = 0) flags the input
    minp = sidak_score(log_p)
    assert minp[0] == pytest.approx(-math.log(1 - 0.9**2))  # -log 0.19 = 1.661
    assert minp[1] == 0.0
    assert minp[2] == pytest.approx(-math.log(1 - 0.98**2))
    assert minp[3] == math.inf
    assert RULES == {"fisher": fisher_score, "minp": sidak_score}


def test_sidak_equals_the_direct_formula_and_stays_finite_where_p_underflows():
    rng = np.random.default_rng(1)
    p = rng.uniform(1e-6, 1, size=(50, 4))
    direct = -np.log(1 - (1 - p.min(1)) ** 4)
    np.testing.assert_allclose(sidak_score(torch.from_numpy(np.log(p))).numpy(), direct, rtol=1e-9)
    tiny = torch.tensor([[-2000.0, -1.0, 0.0]], dtype=torch.float64)  # p_min = e^-2000 underflows
    assert float(sidak_score(tiny)) == pytest.approx(2000 - math.log(3), rel=1e-12)
