"""Patch vectors of feature maps, and their squared Mahalanobis distances as convolutions.

This is the only module that knows how a ``k x k`` patch of a ``(N, C, H, W)`` feature map maps
to a vector of size ``D = C k^2``: channel-major, as :func:`torch.nn.functional.unfold` orders
it (index ``c * k^2 + i * k + j``), which is also the layout of a ``(out, C, k, k)`` conv kernel.

For a :class:`~covguard.covariance.QuadraticForm` with K groups the distance map is

``z = conv(F, proj^T) - proj^T mean``, ``sum_r gain_r z_r^2``, plus
``conv(F^2, diag) - 2 conv(F, diag * mean) + sum(diag * mean^2)`` for the diagonal part,

so a low-rank form costs a ``K r``-channel conv plus a one-channel box filter, never a D x D
kernel. Before the convolutions the map is shifted by a per-channel offset (the mean of the
group means), which leaves every distance unchanged but keeps float32 from cancelling when
activations have a large mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from covguard.covariance import QuadraticForm

__all__ = ["patch_vectors", "patch_mahalanobis_sq", "output_size"]


def output_size(size: int, kernel_size: int, padding: int) -> int:
    """Number of patch positions along one axis (stride 1)."""
    return size + 2 * padding - kernel_size + 1


def patch_vectors(feats: Tensor, *, kernel_size: int = 3, padding: int = 0) -> Tensor:
    """All ``kernel_size x kernel_size`` patches as vectors (explicit unfold).

    Parameters
    ----------
    feats : Tensor of shape (N, C, H, W)
    kernel_size : int
    padding : int
        Zero padding on each side.

    Returns
    -------
    Tensor of shape (N, L, D)
        ``L = H' W'`` patch positions in row-major order, ``D = C kernel_size^2``.
    """
    cols = F.unfold(feats, kernel_size, padding=padding)  # (N, D, L)
    return cols.transpose(1, 2)  # (N, L, D)


def patch_mahalanobis_sq(feats: Tensor, form: QuadraticForm, *, kernel_size: int = 3, padding: int = 0) -> Tensor:
    """Squared Mahalanobis distance of every patch, computed with ``conv2d``.

    Parameters
    ----------
    feats : Tensor of shape (N, C, H, W)
    form : QuadraticForm
        ``mean`` (K, D), ``proj`` (K, D, r) and ``gain`` (K, r) or None, ``diag`` (K, D) or None, with
        ``D = C kernel_size^2``, in the dtype and on the device of ``feats``.
    kernel_size : int
    padding : int
        Zero padding of the feature map on each side (applied before the offset shift, so
        padded values are true zeros).

    Returns
    -------
    Tensor of shape (N, K, H', W')
        Non-negative squared distances, ``H' = H + 2 padding - kernel_size + 1``.
    """
    N, C, H, W = feats.shape
    K, D = form.mean.shape
    kk = kernel_size * kernel_size
    if padding:
        feats = F.pad(feats, (padding,) * 4)
    mean = form.mean.reshape(K, C, kk)  # (K, C, k^2)
    offset = mean.mean(dim=(0, 2))  # (C,)
    x = feats - offset[None, :, None, None]  # (N, C, H+2p, W+2p)
    mean = (mean - offset[None, :, None]).reshape(K, D)  # (K, D)
    H2, W2 = x.shape[-2] - kernel_size + 1, x.shape[-1] - kernel_size + 1
    out = torch.zeros(N, K, H2, W2, dtype=feats.dtype, device=feats.device)
    if form.proj is not None:
        r = form.proj.shape[-1]
        weight = form.proj.permute(0, 2, 1).reshape(K * r, C, kernel_size, kernel_size)  # (K r, C, k, k)
        bias = -torch.einsum("kdr,kd->kr", form.proj, mean).reshape(K * r)  # (K r,)
        z = F.conv2d(x, weight, bias)  # (N, K r, H', W')
        out = out + (z.square().reshape(N, K, r, H2, W2) * form.gain[None, :, :, None, None]).sum(2)
    if form.diag is not None:
        weight = torch.cat([form.diag, -2 * form.diag * mean], dim=1)  # (K, 2D)
        weight = weight.reshape(K, 2, C, kk).transpose(1, 2).reshape(K, 2 * C, kernel_size, kernel_size)
        xx = torch.stack([x * x, x], dim=2).reshape(N, 2 * C, *x.shape[-2:])  # (N, 2C, H, W): [x_c^2, x_c] pairs
        bias = (form.diag * mean * mean).sum(-1)  # (K,)
        out = out + F.conv2d(xx, weight, bias)  # (N, K, H', W')
    return out.clamp_min_(0.0)
