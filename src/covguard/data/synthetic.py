"""Out-of-distribution sets for the digits model, built from data that ships with the libraries.

Every generator returns a float32 tensor of shape ``(N, C, size, size)`` in ``[0, 1]``, the
range of the in-distribution images, and is deterministic for a given ``seed``. Nothing is
downloaded: the photographs are the two sample images bundled with scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images
from torch import Tensor

__all__ = ["BLANK_COLOURS", "blank_frames", "gaussian_noise", "inverted", "ood_sets", "photo_crops", "uniform_noise"]

_MIN_CROP = 24  # smallest side of a photo crop, in source pixels
_MAX_CROP = 96  # largest side of a photo crop, in source pixels
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in grey
#: Colours of :func:`blank_frames` as (R, G, B) in [0, 1]: black, white, three greys, the primaries
#: and the secondaries: what a lens cap, an over-exposed sensor or a test card sends.
BLANK_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "grey25": (0.25, 0.25, 0.25),
    "grey50": (0.5, 0.5, 0.5),
    "grey75": (0.75, 0.75, 0.75),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")


def _check_size(size: int, name: str = "size") -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {size!r}")


def uniform_noise(n: int, *, size: int = 16, channels: int = 1, seed: int = 0) -> Tensor:
    """Images of independent pixels drawn uniformly from ``[0, 1)``.

    Parameters
    ----------
    n : int
        Number of images, at least 1.
    size : int, default=16
        Side of the images in pixels.
    channels : int, default=1
        Number of channels.
    seed : int, default=0
        Seed of the ``torch.Generator`` that draws the pixels.

    Returns
    -------
    Tensor of shape (n, channels, size, size)
        float32 in ``[0, 1)``.

    Raises
    ------
    ValueError
        If ``n``, ``size`` or ``channels`` is not a positive integer.

    Examples
    --------
    >>> uniform_noise(4, size=16, seed=0).shape
    torch.Size([4, 1, 16, 16])
    """
    _check_count(n)
    _check_size(size)
    _check_size(channels, "channels")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, channels, size, size), generator=generator)


def gaussian_noise(
    n: int,
    *,
    size: int = 16,
    channels: int = 1,
    seed: int = 0,
    mean: float = 0.5,
    std: float = 0.25,
) -> Tensor:
    """Images of independent Gaussian pixels, clipped to ``[0, 1]``.

    Parameters
    ----------
    n : int
        Number of images, at least 1.
    size : int, default=16
        Side of the images in pixels.
    channels : int, default=1
        Number of channels.
    seed : int, default=0
        Seed of the ``torch.Generator`` that draws the pixels.
    mean : float, default=0.5
        Mean of the pixels before clipping.
    std : float, default=0.25
        Standard deviation of the pixels before clipping, positive.

    Returns
    -------
    Tensor of shape (n, channels, size, size)
        float32 in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``n``, ``size`` or ``channels`` is not a positive integer, or ``std <= 0``.

    Examples
    --------
    >>> x = gaussian_noise(4, size=16, seed=0)
    >>> bool(x.min() >= 0) and bool(x.max() <= 1)
    True
    """
    _check_count(n)
    _check_size(size)
    _check_size(channels, "channels")
    if not std > 0:
        raise ValueError(f"std must be > 0; got {std!r}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, channels, size, size), generator=generator)
    return x.mul_(std).add_(mean).clamp_(0.0, 1.0)


def blank_frames(
    n: int, *, size: int = 32, channels: int = 3, seed: int = 0, near_constant: float = 0.5, noise_std: float = 2 / 255
) -> Tensor:
    """Blank frames: solid-colour images and near-constant ones (a colour plus faint noise).

    Image ``i`` takes colour ``i mod 11`` of :data:`BLANK_COLOURS` (black, white, greys 0.25 /
    0.5 / 0.75, red, green, blue, yellow, cyan, magenta), so every colour appears about equally
    often. The first ``n - round(near_constant * n)`` images are exactly that colour; the others
    add independent Gaussian pixel noise of standard deviation ``noise_std``, clipped to [0, 1]
    (a sensor's read noise on a blank frame). One-channel images use the colour's luma (ITU-R
    BT.601).

    Parameters
    ----------
    n : int
        Number of images, at least 1.
    size : int, default=32
        Side of the images in pixels.
    channels : int, default=3
        1 (grey) or 3 (RGB).
    seed : int, default=0
        Seed of the ``torch.Generator`` that draws the noise.
    near_constant : float, default=0.5
        Fraction of the images that get the noise, in [0, 1].
    noise_std : float, default=2/255
        Standard deviation of the noise, >= 0, in [0, 1] pixel units.

    Returns
    -------
    Tensor of shape (n, channels, size, size)
        float32 in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``n`` or ``size`` is not a positive integer, ``channels`` not 1 or 3,
        ``near_constant`` outside [0, 1] or ``noise_std < 0``.

    Examples
    --------
    >>> x = blank_frames(22, size=8, seed=0)
    >>> x.shape, float(x[0].max()), float(x[1].min())  # black, then white
    (torch.Size([22, 3, 8, 8]), 0.0, 1.0)
    """
    _check_count(n)
    _check_size(size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    if not 0.0 <= near_constant <= 1.0:
        raise ValueError(f"near_constant must be in [0, 1]; got {near_constant!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std!r}")
    palette = torch.tensor(list(BLANK_COLOURS.values()), dtype=torch.float32)  # (P, 3)
    if channels == 1:
        palette = palette @ torch.tensor(_LUMA)[:, None]  # (P, 1)
    colours = palette[torch.arange(n) % len(palette)]  # (n, channels)
    x = colours[:, :, None, None].expand(n, channels, size, size).clone()  # (n, channels, size, size)
    n_noisy = round(near_constant * n)
    if n_noisy:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((n_noisy, channels, size, size), generator=generator)
        x[n - n_noisy :] += noise * noise_std
    return x.clamp_(0.0, 1.0)


def inverted(images: Tensor) -> Tensor:
    """Photographic negative ``1 - images``: white digits on black become black on white.

    The same shapes, but the background is now bright, a shift in low-level statistics that a
    classifier trained on the originals never saw. Applying it twice gives back the input.

    Parameters
    ----------
    images : Tensor of shape (N, C, H, W)
        Floating point, range ``[0, 1]``.

    Returns
    -------
    Tensor of shape (N, C, H, W)
        ``1 - images``, same dtype, range ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``images`` is not a 4-d floating point tensor with values in ``[0, 1]``.

    Examples
    --------
    >>> inverted(torch.tensor([[[[0.0, 0.25, 1.0]]]]))
    tensor([[[[1.0000, 0.7500, 0.0000]]]])
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = (
            f"{tuple(images.shape)} {images.dtype}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise ValueError(f"images must be a floating point tensor (N, C, H, W); got {got}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            "images must have range [0, 1]; "
            f"got [{images.min().item():.4g}, {images.max().item():.4g}]"
        )
    return 1.0 - images


def _grey_photos() -> list[Tensor]:
    """scikit-learn's sample photographs (china.jpg, flower.jpg) in grey, (427, 640) in [0, 1]."""
    luma = torch.tensor(_LUMA, dtype=torch.float32)
    return [
        torch.from_numpy(photo.astype(np.float32)).div_(255.0) @ luma  # (H, W)
        for photo in load_sample_images().images  # each (H, W, 3) uint8
    ]


def photo_crops(n: int, *, size: int = 16, seed: int = 0) -> Tensor:
    """Random grey crops of natural photographs, contrast-stretched to ``[0, 1]``.

    Crops come from the two photographs bundled with scikit-learn
    (``sklearn.datasets.load_sample_images``: a Chinese temple and a flower, 427x640 each, read
    from the installed package, no download). For each image a photograph is picked at random,
    converted to grey (ITU-R BT.601 luma), a square of random side in ``[24, 96]`` source pixels
    is cut at a random position, resized to ``size x size`` with antialiased bilinear
    interpolation, and its values are stretched linearly so the darkest pixel is 0 and the
    brightest 1 (a constant crop becomes all zeros). The stretch gives the crops the intensity
    range of the digits, so a detector has to tell them apart by content, not by a narrower or
    shifted range of values.

    Parameters
    ----------
    n : int
        Number of images, at least 1.
    size : int, default=16
        Side of the images in pixels.
    seed : int, default=0
        Seed of the ``numpy.random.default_rng`` that picks photographs, sides and positions.

    Returns
    -------
    Tensor of shape (n, 1, size, size)
        float32 in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``n`` or ``size`` is not a positive integer.

    Examples
    --------
    >>> x = photo_crops(8, size=16, seed=0)
    >>> x.shape, float(x.amin(dim=(1, 2, 3)).max()), float(x.amax(dim=(1, 2, 3)).min())
    (torch.Size([8, 1, 16, 16]), 0.0, 1.0)
    """
    _check_count(n)
    _check_size(size)
    photos = _grey_photos()
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(_MIN_CROP, _MAX_CROP, endpoint=True))
        top = int(rng.integers(photo.shape[0] - side, endpoint=True))
        left = int(rng.integers(photo.shape[1] - side, endpoint=True))
        crop = photo[top : top + side, left : left + side]  # (side, side)
        crops.append(
            F.interpolate(
                crop[None, None],  # (1, 1, side, side)
                size=(size, size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        )
    x = torch.cat(crops)  # (n, 1, size, size)
    low = x.amin(dim=(1, 2, 3), keepdim=True)  # (n, 1, 1, 1)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - low  # (n, 1, 1, 1)
    return (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)


def ood_sets(x_test: Tensor, *, n: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """The out-of-distribution sets of the digits benchmark, matched to an in-distribution set.

    Parameters
    ----------
    x_test : Tensor of shape (N, 1, S, S)
        In-distribution test images in ``[0, 1]``; they fix the image side ``S`` and are the
        source of ``"inverted_digits"``.
    n : int, optional
        Images per set, at most ``N``; default ``N``.
    seed : int, default=0
        Master seed; each set gets its own stream derived from it with
        ``numpy.random.SeedSequence``.

    Returns
    -------
    dict of str to Tensor of shape (n, 1, S, S)
        float32 in ``[0, 1]``, keys in order: ``"photo_crops"`` (:func:`photo_crops`, near
        OOD: natural image structure), ``"uniform_noise"`` and ``"gaussian_noise"`` (far OOD),
        ``"inverted_digits"`` (:func:`inverted` applied to ``n`` images of ``x_test`` drawn
        without replacement: same shapes, shifted statistics).

    Raises
    ------
    ValueError
        If ``x_test`` is not a non-empty (N, 1, S, S) floating point tensor in ``[0, 1]``, or
        ``n`` is not in ``[1, N]``.

    Examples
    --------
    >>> sets = ood_sets(torch.rand(10, 1, 16, 16), seed=0)
    >>> {name: tuple(x.shape) for name, x in sets.items()}["photo_crops"]
    (10, 1, 16, 16)
    """
    if (
        not isinstance(x_test, Tensor)
        or x_test.ndim != 4
        or x_test.shape[1] != 1
        or x_test.shape[2] != x_test.shape[3]
        or len(x_test) == 0
    ):
        got = tuple(x_test.shape) if isinstance(x_test, Tensor) else type(x_test).__name__
        raise ValueError(f"x_test must be a non-empty tensor (N, 1, S, S); got {got}")
    if n is None:
        n = len(x_test)
    elif isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(x_test):
        raise ValueError(f"n must be an integer in [1, {len(x_test)}] (len(x_test)); got {n!r}")
    size = x_test.shape[-1]
    photo_seed, uniform_seed, gaussian_seed, subset_seed = (
        int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(4)
    )
    rows = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(subset_seed))[:n]
    return {
        "photo_crops": photo_crops(n, size=size, seed=photo_seed),
        "uniform_noise": uniform_noise(n, size=size, seed=uniform_seed),
        "gaussian_noise": gaussian_noise(n, size=size, seed=gaussian_seed),
        "inverted_digits": inverted(x_test[rows.to(x_test.device)]).to("cpu", torch.float32),
    }
