"""Basic Iterative Method: L-inf PGD from the clean image, with Kurakin et al.'s step count."""

from __future__ import annotations

import math

from torch import nn

from covguard.attacks.base import check_positive
from covguard.attacks.pgd import PGD

__all__ = ["BIM", "kurakin_steps"]


def kurakin_steps(eps: float) -> int:
    """Number of BIM iterations chosen by Kurakin et al.: ``min(255 eps + 4, 1.25 * 255 eps)``.

    The paper states the rule for a budget in grey levels of 8-bit images, ``e = 255 * eps``;
    the result is rounded down (``int``, as torchattacks does) and is at least 1. A ``1e-6``
    slack absorbs the rounding of ``k / 255 * 255``.

    Parameters
    ----------
    eps : float
        L-inf budget in pixel units of ``[0, 1]`` images, > 0.

    Returns
    -------
    int
        ``max(1, floor(min(e + 4, 1.25 e)))`` with ``e = 255 * eps``.

    Examples
    --------
    >>> kurakin_steps(8 / 255), kurakin_steps(4 / 255), kurakin_steps(1 / 255)
    (10, 5, 1)
    """
    grey_levels = 255 * eps
    return max(1, math.floor(min(grey_levels + 4, 1.25 * grey_levels) + 1e-6))


class BIM(PGD):
    r"""BIM (I-FGSM) from "Adversarial Examples in the Physical World" (Kurakin et al., 2017).

    Distance measure: L-inf. :class:`PGD` without the random start: from ``x`` itself, ``steps``
    signed-gradient steps of size ``alpha``, each projected onto the L-inf ball of radius ``eps``
    around ``x`` and onto ``[0, 1]``. The defaults follow the paper: a step of one grey level
    (``alpha = 1/255``) and ``steps = min(255 eps + 4, 1.25 * 255 eps)`` iterations (see
    :func:`kurakin_steps`; 10 for ``eps = 8/255``), enough to reach the edge of the ball while
    leaving room to move along it.

    Parameters
    ----------
    model : nn.Module
        Classifier taking images in ``[0, 1]`` and returning logits of shape ``(N, K)``.
    eps : float, default 8/255
        Maximum L-inf perturbation, in pixel units of ``[0, 1]`` images.
    alpha : float, default 1/255
        Step size of each iteration.
    steps : int or None, default None
        Number of iterations; ``None`` uses ``kurakin_steps(eps)``.

    Raises
    ------
    ValueError
        If ``eps`` or ``alpha`` is not a finite number > 0, or ``steps`` is neither ``None`` nor
        an int >= 1.

    Shape
    -----
    - x: ``(N, C, H, W)`` floating-point images; it must have a range ``[0, 1]``.
    - y: ``(N,)`` ``torch.long`` labels.
    - Output: ``(N, C, H, W)``, values in ``[0, 1]``, ``|x_adv - x| <= eps`` everywhere.

    References
    ----------
    https://arxiv.org/abs/1607.02533

    Examples
    --------
    >>> import torch
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    >>> BIM(model, eps=8 / 255).steps
    10
    >>> x, y = torch.rand(2, 3, 4, 4), torch.tensor([3, 7])
    >>> BIM(model)(x, y).shape
    torch.Size([2, 3, 4, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        alpha: float = 1 / 255,
        steps: int | None = None,
    ) -> None:
        eps = check_positive(eps, name="eps")
        super().__init__(
            model,
            eps=eps,
            alpha=alpha,
            steps=kurakin_steps(eps) if steps is None else steps,
            random_start=False,
        )
