"""Conv-based patch distances against explicit (p - mu)^T P (p - mu) on numpy-unfolded patches."""

import numpy as np
import pytest
import torch

from covguard.covariance import CovarianceConfig, quadratic_form
from covguard.patches import output_size, patch_mahalanobis_sq, patch_vectors
from covguard.stats import batch_moments


def unfold_np(feats: np.ndarray, k: int, pad: int) -> np.ndarray:
    """(N, C, H, W) -> (N, H', W', C*k*k) with explicit loops, channel-major like a conv kernel."""
    feats = np.pad(feats, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    N, C, H, W = feats.shape
    out = np.empty((N, H - k + 1, W - k + 1, C * k * k))
    for i in range(H - k + 1):
        for j in range(W - k + 1):
            out[:, i, j] = feats[:, :, i : i + k, j : j + k].reshape(N, -1)
    return out


def random_form(D: int, K: int, form: str, rank: int, seed: int, offset: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(K, 4 * D, D, generator=gen, dtype=torch.float64) @ torch.randn(D, D, generator=gen, dtype=torch.float64)
    x = x + offset + torch.randn(K, 1, D, generator=gen, dtype=torch.float64)
    moments = [batch_moments(x[k]) for k in range(K)]
    from covguard.stats import Moments

    m = Moments(torch.cat([m.n for m in moments]), torch.cat([m.mean for m in moments]), torch.cat([m.scatter for m in moments]))
    return quadratic_form(m, CovarianceConfig(form=form, rank=rank))


@pytest.mark.parametrize("C, H, W", [(1, 3, 3), (2, 5, 7), (4, 6, 6)])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("form, rank", [("full", 0), ("diag", 0), ("lowrank", 4)])
@pytest.mark.parametrize("K", [1, 3])
def test_conv_distance_equals_explicit(C, H, W, padding, form, rank, K):
    D = 9 * C
    qf = random_form(D, K, form, max(rank, 1), seed=C + H)
    feats = torch.randn(2, C, H, W, dtype=torch.float64)
    got = patch_mahalanobis_sq(feats, qf, padding=padding).numpy()  # (N, K, H', W')
    P = np.zeros((K, D, D))
    if qf.proj is not None:
        P += np.einsum("kdr,kr,ker->kde", qf.proj.numpy(), qf.gain.numpy(), qf.proj.numpy())
    if qf.diag is not None:
        P += np.einsum("kd,de->kde", qf.diag.numpy(), np.eye(D))
    p = unfold_np(feats.numpy(), 3, padding)  # (N, H', W', D)
    dev = p[:, None] - qf.mean.numpy()[None, :, None, None]  # (N, K, H', W', D)
    ref = np.einsum("nkijd,kde,nkije->nkij", dev, P, dev)
    assert got.shape == (2, K, output_size(H, 3, padding), output_size(W, 3, padding))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_float32_conv_distance_with_large_mean_offset():
    """Activations with mean 1e4: float32 conv scoring stays close to the float64 reference."""
    C = 3
    qf = random_form(9 * C, 1, "full", 1, seed=0, offset=1e4)
    feats = qf.mean[0].reshape(C, 3, 3)[None].repeat(4, 1, 2, 2) + torch.randn(4, C, 6, 6, dtype=torch.float64)
    ref = patch_mahalanobis_sq(feats, qf)
    got = patch_mahalanobis_sq(feats.float(), qf.to(torch.float32))
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-2)


def test_patch_vectors_layout_matches_numpy():
    feats = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    got = patch_vectors(feats, padding=1).numpy()
    ref = unfold_np(feats.numpy(), 3, 1).reshape(2, -1, 27)
    np.testing.assert_array_equal(got, ref)


def test_lowrank_full_rank_conv_equals_full_conv():
    qf_full = random_form(18, 2, "full", 1, seed=5)
    qf_low = random_form(18, 2, "lowrank", 18, seed=5)
    feats = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(patch_mahalanobis_sq(feats, qf_low), patch_mahalanobis_sq(feats, qf_full), rtol=1e-10, atol=1e-10)


# ---- fast paths: kernels built once, triangular full forms, shift skipped, strided unfold --------


def test_kernels_are_cached_on_the_form_and_group_views():
    qf = random_form(18, 3, "lowrank", 4, seed=1)
    from covguard.patches import patch_kernels

    assert patch_kernels(qf) is patch_kernels(qf)
    assert qf.group(1) is qf.group(1)
    feats = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(patch_mahalanobis_sq(feats, qf.group(1))[:, 0], patch_mahalanobis_sq(feats, qf)[:, 1], rtol=1e-10, atol=1e-10)


def test_full_form_is_triangular_and_convolves_channel_prefixes():
    """Cholesky whitening: each chunk of output channels reads only the channels its columns touch."""
    from covguard.patches import _TRIANGULAR_CHUNKS, patch_kernels

    C = 8
    qf = random_form(9 * C, 1, "full", 1, seed=2)
    assert torch.equal(qf.proj[0].tril(-1), torch.zeros_like(qf.proj[0]))  # upper triangular
    torch.testing.assert_close(torch.linalg.vector_norm(qf.proj, dim=1), torch.ones(1, 9 * C, dtype=torch.float64))
    cins = [conv.cin for conv in patch_kernels(qf).convs]
    assert len(cins) == _TRIANGULAR_CHUNKS and cins == sorted(cins) and cins[0] < C and cins[-1] == C


@pytest.mark.parametrize("form, rank", [("diag", 1), ("lowrank", 3)])
def test_float32_small_mean_skips_the_shift_and_large_mean_keeps_it(form, rank):
    from covguard.patches import patch_kernels

    C = 3
    for offset, shifted in ((0.0, False), (1e4, True)):
        qf = random_form(9 * C, 1, form, rank, seed=0, offset=offset)
        assert (patch_kernels(qf.to(torch.float32)).offset is not None) == shifted
        feats = qf.mean[0].reshape(C, 3, 3)[None].repeat(4, 1, 2, 2) + torch.randn(4, C, 6, 6, dtype=torch.float64)
        ref = patch_mahalanobis_sq(feats, qf)
        got = patch_mahalanobis_sq(feats.float(), qf.to(torch.float32))
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("N, C, H, W, k, padding", [(5, 3, 9, 7, 3, 0), (4, 2, 6, 6, 3, 1), (6, 4, 8, 8, 1, 0), (3, 2, 12, 11, 5, 2)])
def test_patch_vectors_equal_torch_unfold(N, C, H, W, k, padding):
    feats = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(N + C))
    ref = torch.nn.functional.unfold(feats, k, padding=padding).transpose(1, 2)  # (N, L, D)
    got = patch_vectors(feats, kernel_size=k, padding=padding)
    assert got.is_contiguous() and torch.equal(got, ref)


@pytest.mark.parametrize("form, rank", [("full", 0), ("diag", 0), ("lowrank", 2)])
@pytest.mark.parametrize("K", [1, 3])
def test_kernel_size_one_equals_explicit(form, rank, K):
    """k = 1: no offsets to sum, the constant is the bias of the per-pixel conv."""
    C = 5
    qf = random_form(C, K, form, max(rank, 1), seed=7)
    feats = torch.randn(3, C, 4, 6, dtype=torch.float64)
    got = patch_mahalanobis_sq(feats, qf, kernel_size=1)  # (N, K, H, W)
    p = feats.permute(0, 2, 3, 1)  # (N, H, W, C)
    ref = qf.distance_sq(p.reshape(-1, C)).reshape(3, 4, 6, K).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form, rank", [("full", 0), ("diag", 0), ("lowrank", 3)])
def test_float32_small_and_large_batches_match_float64(form, rank):
    """Small batches keep the contiguous layout, large ones go channels_last: both within float32 rounding."""
    from covguard.patches import _CHANNELS_LAST_MIN_BATCH

    C = 4
    qf = random_form(9 * C, 2, form, max(rank, 1), seed=3, offset=5.0)
    for n in (1, _CHANNELS_LAST_MIN_BATCH):
        feats = torch.randn(n, C, 7, 6, dtype=torch.float64) + 5.0
        ref = patch_mahalanobis_sq(feats, qf, padding=1)
        got = patch_mahalanobis_sq(feats.float(), qf.to(torch.float32), padding=1)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)
