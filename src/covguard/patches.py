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

How it is made fast (each step measured by ``covguard bench timing``):

- The kernels of a form are built once (:func:`patch_kernels`) and cached on the form object,
  so repeated scoring pays only for the convolutions.
- One ``k x k`` convolution per layer and form, for the projections only (weights scaled by
  ``sqrt|gain|``, reduced with one fused ``vector_norm`` over channels: no temporaries the size
  of the conv output). The diagonal part (``||p - mean||^2`` of ``lowrank``, the variances of
  ``diag``) needs only per-pixel products: a ``1 x 1`` conv to ``k^2`` channels, ``sum_c F_c^2``,
  and a one-hot ``k x k`` grouped conv that sums the offsets; a ``k x k`` conv with one output
  channel costs more than all three on oneDNN.
- The per-channel shift is skipped (no copy of the map) when the mean is small next to the
  spread, where float32 does not need it.
- An upper-triangular ``proj`` (the Cholesky whitening of the ``full`` form) is cut into
  ``_TRIANGULAR_CHUNKS`` column chunks, each convolving only the channels its columns touch:
  ``(1 + 1/G) / 2`` of the multiply-adds of a dense ``D x D`` kernel.
- On CPU, float32 maps of ``_CHANNELS_LAST_MIN_BATCH`` or more images are convolved in
  ``channels_last`` layout (oneDNN's fast path); smaller batches keep the contiguous layout,
  where the conversion and oneDNN's channels_last kernels cost more than they save. Sums of
  squares over channels are one fused ``vector_norm`` where channels are contiguous, squares
  summed otherwise (a norm across strided channels costs up to 20 times more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from covguard.covariance import QuadraticForm

__all__ = ["PatchKernels", "patch_kernels", "patch_vectors", "patch_vectors_at", "patch_mahalanobis_sq", "output_size"]

# Column chunks of a triangular projection: fewer chunks waste multiply-adds on zeros, more
# chunks make convolutions too small to run at full speed (G = 4 measured best on ResNet-18).
_TRIANGULAR_CHUNKS = 4
# Smallest batch convolved in channels_last layout on CPU. ResNet-20 maps, one thread: the
# contiguous layout is 1.5-2x faster at batch 1-8, about even at 32, channels_last faster above.
_CHANNELS_LAST_MIN_BATCH = 16


def output_size(size: int, kernel_size: int, padding: int) -> int:
    """Number of patch positions along one axis (stride 1)."""
    return size + 2 * padding - kernel_size + 1


def patch_vectors(feats: Tensor, *, kernel_size: int = 3, padding: int = 0) -> Tensor:
    """All ``kernel_size x kernel_size`` patches as vectors (explicit unfold).

    Laid out as :func:`torch.nn.functional.unfold` orders them, but built from a strided view in
    one copy: ``F.unfold`` loops over the batch in parallel regions of one image each, which
    costs far more than the copy when the machine is busy.

    Parameters
    ----------
    feats : Tensor of shape (N, C, H, W)
    kernel_size : int
    padding : int
        Zero padding on each side.

    Returns
    -------
    Tensor of shape (N, L, D)
        Contiguous; ``L = H' W'`` patch positions in row-major order, ``D = C kernel_size^2``.
    """
    if padding:
        feats = F.pad(feats, (padding,) * 4)
    N, C = feats.shape[:2]
    windows = feats.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # (N, C, H', W', k, k) view
    H2, W2 = windows.shape[2:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(N, H2 * W2, C * kernel_size * kernel_size).contiguous()  # (N, L, D)


def patch_vectors_at(feats: Tensor, rows: Tensor, *, kernel_size: int = 3, padding: int = 0) -> Tensor:
    """The patches of :func:`patch_vectors` at chosen rows only, without unfolding the others.

    Parameters
    ----------
    feats : Tensor of shape (N, C, H, W)
    rows : Tensor of shape (M,)
        Integer rows ``n L + l`` of the flattened (N L, D) patch matrix.
    kernel_size, padding : int
        As :func:`patch_vectors`.

    Returns
    -------
    Tensor of shape (M, D)
        Equal to ``patch_vectors(feats, ...).reshape(N * L, D)[rows]``.
    """
    if padding:
        feats = F.pad(feats, (padding,) * 4)
    windows = feats.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1).permute(0, 2, 3, 1, 4, 5)  # (N, H', W', C, k, k) view
    W2 = windows.shape[2]
    rows = rows.to(feats.device)
    L = windows.shape[1] * W2
    n, pos = rows // L, rows % L
    return windows[n, pos // W2, pos % W2].reshape(len(rows), -1)  # (M, D)


@dataclass(frozen=True)
class _Conv:
    """One convolution of the map: ``z = conv(x[:, :cin], weight) + bias``.

    Its output channels are contiguous segments ``(lo, hi, k, sign)``: group ``k`` gains
    ``sign * ||z[lo:hi]||^2`` (the weights carry ``sqrt(|gain|)``).
    """

    cin: int
    weight: Tensor  # (R, cin, k, k)
    bias: Tensor  # (R,)
    segments: tuple[tuple[int, int, int, float], ...]


@dataclass(frozen=True)
class PatchKernels:
    """A :class:`~covguard.covariance.QuadraticForm` compiled into convolutions for ``k x k`` patches.

    Build it with :func:`patch_kernels` (cached per form); :func:`patch_mahalanobis_sq` uses it.
    The distance of group ``k`` at position ``(i, j)`` is

    ``sum_segments sign ||z_segment||^2 + sum_a y[k, a, i + a_i, j + a_j] + const_k``

    where the per-pixel terms ``y = conv1x1(x, linear) + box * sum_c x_c^2`` (isotropic diagonal)
    or ``+ conv1x1(x^2, square)`` (general diagonal; one ``conv1x1([x, x^2], linear_square)``
    for small batches) carry the diagonal part of the form, one channel per group and kernel
    offset ``a``, and the sum over offsets is a grouped conv with one-hot kernels (``shifts``).
    This is cheaper than a ``k x k`` conv with one output channel. For ``k = 1`` there are no
    offsets to sum: ``y`` is the distance, with ``const`` as the bias of the linear conv.

    Attributes
    ----------
    kernel_size : int
    channels : int
        ``C = D / kernel_size^2``.
    offset : Tensor of shape (1, C, 1, 1) or None
        Per-channel shift subtracted from the map first; None when the form's mean is small
        next to its spread (``||mean||^2 <= tr(cov)``), so that float32 loses at most a factor
        ``sqrt(2)`` of accuracy without it and the copy is saved.
    convs : tuple
        Convolutions of the projection part (one, or several for a triangular projection).
    linear : Tensor of shape (K k^2, C, 1, 1) or None
        ``-2 diag * mean`` per group and kernel offset.
    box : Tensor of shape (1, K k^2, 1, 1) or None
        Weight of ``sum_c x_c^2`` (isotropic diagonal, e.g. ``lowrank``).
    square : Tensor of shape (K k^2, C, 1, 1) or None
        Weights of ``x_c^2`` (general diagonal, ``diag``).
    linear_square : Tensor of shape (K k^2, 2 C, 1, 1) or None
        ``linear`` and ``square`` side by side: the weights of ``[x, x^2]``.
    shifts : Tensor of shape (K, k^2, k, k) or None
        One-hot kernels summing each group's ``k^2`` channels over the kernel offsets; None
        for ``k = 1``.
    const : Tensor of shape (K,) or None
        ``sum diag * mean^2`` per group.
    """

    kernel_size: int
    channels: int
    offset: Tensor | None
    convs: tuple[_Conv, ...]
    linear: Tensor | None
    box: Tensor | None
    square: Tensor | None
    linear_square: Tensor | None
    shifts: Tensor | None
    const: Tensor | None


def patch_kernels(form: QuadraticForm, *, kernel_size: int = 3) -> PatchKernels:
    """Convolution kernels of ``form`` for ``kernel_size x kernel_size`` patches, built once per form.

    Parameters
    ----------
    form : QuadraticForm
        ``mean`` (K, D) with ``D = C kernel_size^2``; kept in its dtype and on its device.
    kernel_size : int

    Returns
    -------
    PatchKernels
        Cached on ``form``: later calls with the same form and ``kernel_size`` return it at once.
    """
    key = ("patch_kernels", kernel_size)
    if key not in form._cache:
        form._cache[key] = _build_kernels(form, kernel_size)
    return form._cache[key]


def _total_variance(form: QuadraticForm) -> Tensor | None:
    """``tr(cov)`` of each group (K,) for diagonal and isotropic-residual forms; None otherwise."""
    if form.diag is None:
        return None
    diag = form.diag.double()  # (K, D)
    if form.proj is None:
        return (1.0 / diag).sum(-1)
    if not bool((diag == diag[:, :1]).all()):
        return None
    d, D, r = diag[:, 0], diag.shape[1], form.proj.shape[-1]  # eigenvalues g + d inside the span, d outside
    return (1.0 / (form.gain.double() + d[:, None])).sum(-1) + (D - r) / d


def _build_kernels(form: QuadraticForm, kernel_size: int) -> PatchKernels:
    dtype, device = form.mean.dtype, form.mean.device
    K, D = form.mean.shape
    kk = kernel_size * kernel_size
    C = D // kk
    if C * kk != D:
        raise ValueError(f"form dimension D={D} is not C * kernel_size^2 for kernel_size={kernel_size}")
    mean = form.mean.double().reshape(K, C, kk)  # (K, C, k^2)
    offset = mean.mean(dim=(0, 2))  # (C,)
    variance = _total_variance(form)
    if variance is not None and bool(((form.mean.double() ** 2).sum(-1) <= variance).all()):
        offset = torch.zeros_like(offset)  # small mean: convolve the map as it is
        shift = None
    else:
        shift = offset.to(dtype).reshape(1, C, 1, 1)
    mean = (mean - offset[None, :, None]).reshape(K, D)  # (K, D) mean of the (shifted) map

    def kernel(rows: Tensor, cin: int) -> Tensor:
        """(R, D) rows -> (R, cin, k, k) conv weight over the first ``cin`` channels."""
        return rows.reshape(-1, C, kernel_size, kernel_size)[:, :cin].to(dtype).contiguous()

    convs = []
    if form.proj is not None:
        proj, gain = form.proj.double(), form.gain.double()  # (K, D, r), (K, r)
        r = proj.shape[-1]
        last_row = D - 1 - (proj != 0).flip(1).to(torch.uint8).argmax(1)  # (K, r): last nonzero row of each column
        cin_col = last_row // kk + 1  # (K, r) channels each column touches
        triangular = bool((cin_col < C).any())
        bounds = torch.linspace(0, r, (_TRIANGULAR_CHUNKS if triangular else 1) + 1).round().long().tolist()
        pieces = []  # (cin, group, columns)
        for k in range(K):
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                if hi > lo:
                    pieces.append((int(cin_col[k, lo:hi].max()), k, torch.arange(lo, hi, device=device)))
        # Pieces that read every channel share one convolution (all groups of a dense form).
        dense = [p for p in pieces if p[0] == C]
        groups = [[p] for p in pieces if p[0] < C] + ([dense] if dense else [])
        for group in groups:
            rows, biases, segments, start = [], [], [], 0
            for _, k, cols in group:
                g = gain[k, cols]  # (c,)
                order = torch.argsort((g < 0).to(torch.uint8), stable=True)  # positive gains first
                cols, g = cols[order], g[order]
                w = proj[k][:, cols].T * g.abs().sqrt()[:, None]  # (c, D) scaled by sqrt|gain|
                rows.append(w)
                biases.append(-(w @ mean[k]))
                n_pos = int((g > 0).sum())
                for lo, hi, sign in ((0, n_pos, 1.0), (n_pos, len(cols), -1.0)):
                    if hi > lo:
                        segments.append((start + lo, start + hi, k, sign))
                start += len(cols)
            cin = max(p[0] for p in group)
            convs.append(_Conv(cin, kernel(torch.cat(rows), cin), torch.cat(biases).to(dtype), tuple(segments)))
    linear = box = square = linear_square = shifts = const = None
    if form.diag is not None:
        diag = form.diag.double()  # (K, D)
        const = (diag * mean * mean).sum(-1).to(dtype)  # (K,)
        linear = (-2 * diag * mean).reshape(K, C, kk).transpose(1, 2).reshape(K * kk, C, 1, 1).to(dtype).contiguous()  # (K k^2, C, 1, 1)
        if bool((diag == diag[:, :1]).all()):
            box = diag[:, :1].expand(K, kk).reshape(1, K * kk, 1, 1).to(dtype).contiguous()
        else:
            square = diag.reshape(K, C, kk).transpose(1, 2).reshape(K * kk, C, 1, 1).to(dtype).contiguous()
            linear_square = torch.cat([linear, square], 1)  # (K k^2, 2C, 1, 1)
        if kernel_size > 1:
            shifts = torch.eye(kk, dtype=dtype, device=device).reshape(1, kk, kernel_size, kernel_size).repeat(K, 1, 1, 1)
    return PatchKernels(kernel_size, C, shift, tuple(convs), linear, box, square, linear_square, shifts, const)


def _channels_last(x: Tensor) -> bool:
    """Whether to convolve ``x`` (N, C, H, W) in channels_last layout (oneDNN's fast path for
    float32 on CPU, from ``_CHANNELS_LAST_MIN_BATCH`` images on)."""
    return x.shape[0] >= _CHANNELS_LAST_MIN_BATCH and x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu


def _channel_sum_sq(t: Tensor, keepdim: bool = False) -> Tensor:
    """``sum_c t_c^2`` of a map (N, C, H, W): (N, H, W), or (N, 1, H, W) with ``keepdim``.

    One fused ``vector_norm`` (no temporary) where the channels are contiguous; otherwise the
    squares summed, since a norm across the strided channels of a contiguous map is slow.
    """
    if t.stride(1) == 1:
        return torch.linalg.vector_norm(t, dim=1, keepdim=keepdim).square_()
    return (t * t).sum(1, keepdim=keepdim)


def patch_mahalanobis_sq(feats: Tensor, form: QuadraticForm, *, kernel_size: int = 3, padding: int = 0) -> Tensor:
    """Squared Mahalanobis distance of every patch, computed with ``conv2d``.

    Parameters
    ----------
    feats : Tensor of shape (N, C, H, W)
    form : QuadraticForm
        ``mean`` (K, D), ``proj`` (K, D, r) and ``gain`` (K, r) or None, ``diag`` (K, D) or None, with
        ``D = C kernel_size^2``, in the dtype and on the device of ``feats``. Its kernels are
        built on the first call and cached on the form (:func:`patch_kernels`).
    kernel_size : int
    padding : int
        Zero padding of the feature map on each side (applied before the offset shift, so
        padded values are true zeros).

    Returns
    -------
    Tensor of shape (N, K, H', W')
        Non-negative squared distances, ``H' = H + 2 padding - kernel_size + 1``.
    """
    kernels = patch_kernels(form, kernel_size=kernel_size)
    N, C = feats.shape[:2]
    K = form.mean.shape[0]
    if padding:
        feats = F.pad(feats, (padding,) * 4)
    layout = torch.channels_last if _channels_last(feats) else torch.contiguous_format
    if kernels.offset is None:
        x = feats.contiguous(memory_format=layout)
    elif feats.is_contiguous(memory_format=layout):
        x = feats - kernels.offset  # (N, C, H+2p, W+2p) shifted, in the layout of feats
    else:
        x = torch.empty_like(feats, memory_format=layout)
        torch.sub(feats, kernels.offset, out=x)  # (N, C, H+2p, W+2p) shifted, converted
    H, W = x.shape[-2:]
    H2, W2 = H - kernel_size + 1, W - kernel_size + 1
    if kernels.linear is not None:
        bias = kernels.const if kernels.shifts is None else None  # k = 1: y is the distance
        if kernels.box is not None:  # (N, K k^2, H, W): per-pixel terms of every group and offset
            y = F.conv2d(x, kernels.linear, bias).addcmul_(_channel_sum_sq(x, keepdim=True), kernels.box)
        elif layout == torch.contiguous_format:
            y = F.conv2d(torch.cat([x, x * x], 1), kernels.linear_square, bias)
        else:
            y = F.conv2d(x, kernels.linear, bias).add_(F.conv2d(x * x, kernels.square))
        out = y if kernels.shifts is None else F.conv2d(y, kernels.shifts, kernels.const, groups=K)  # (N, K, H', W')
    else:
        out = torch.zeros(N, K, H2, W2, dtype=feats.dtype, device=feats.device)
    for conv in kernels.convs:
        z = F.conv2d(x if conv.cin == C else x[:, : conv.cin], conv.weight, conv.bias)  # (N, R, H', W')
        for lo, hi, k, sign in conv.segments:
            squares = _channel_sum_sq(z if hi - lo == z.shape[1] else z[:, lo:hi], keepdim=True)  # (N, 1, H', W')
            (out if K == 1 else out[:, k : k + 1]).add_(squares, alpha=sign)
    return out.clamp_min_(0.0)  # (N, K, H', W')

