"""Per-channel input normalization as the first submodule of every covguard model.

covguard models take images in ``[0, 1]`` and normalize them themselves, so detectors, attacks
and data loaders all work in one pixel space. The mean and standard deviation are
*non-persistent* buffers: they follow ``model.to(device)`` but stay out of ``state_dict()``, so a
model's checkpoint keys are exactly those of the original, unnormalized network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize"]


class Normalize(nn.Module):
    """Subtract a per-channel mean and divide by a per-channel standard deviation.

    Parameters
    ----------
    mean : sequence of float
        Per-channel mean, one value per input channel, or a single value shared by all channels.
    std : sequence of float
        Per-channel standard deviation, same length as ``mean``, every value > 0.

    Raises
    ------
    ValueError
        If ``mean`` is empty, ``mean`` and ``std`` differ in length, or a ``std`` value is not
        positive.

    Shape
    -----
    - Input: ``(N, C, H, W)`` images in ``[0, 1]``; ``C == len(mean)`` unless ``len(mean) == 1``.
    - Output: ``(N, C, H, W)``, ``(x - mean) / std`` channel by channel.

    Examples
    --------
    >>> norm = Normalize((0.5,), (0.25,))
    >>> norm(torch.ones(2, 1, 4, 4)).unique()
    tensor([2.])
    >>> list(norm.state_dict())
    []
    """

    mean: Tensor  # (1, C, 1, 1)
    std: Tensor  # (1, C, 1, 1)

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()  # (C,)
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()  # (C,)
        if mean_t.numel() == 0:
            raise ValueError(f"mean must hold at least one value; got {tuple(mean)!r}")
        if mean_t.shape != std_t.shape:
            raise ValueError(
                "mean and std must have the same length; "
                f"got {mean_t.numel()} values for mean and {std_t.numel()} for std"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive in every channel; got {tuple(std)!r}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize a batch of images.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)
            Images in ``[0, 1]``.

        Returns
        -------
        Tensor of shape (N, C, H, W)
            ``(x - mean) / std``.

        Raises
        ------
        ValueError
            If ``x`` is not 4-D or its channel count does not match ``mean``.
        """
        channels = self.mean.shape[1]
        if x.dim() != 4 or (channels != 1 and x.shape[1] != channels):
            expected = "any C" if channels == 1 else f"C={channels}"
            raise ValueError(f"x must be (N, C, H, W) with {expected}; got {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"
