"""Projected Gradient Descent under an L-inf budget, with a uniform random start."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from covguard.attacks.base import IterativeAttack, input_gradient

__all__ = ["PGD"]


class PGD(IterativeAttack):
    r"""PGD from "Towards Deep Learning Models Resistant to Adversarial Attacks" (Madry et al.).

    Distance measure: L-inf. Starting from ``x`` plus uniform noise in ``[-eps, eps]`` (or from
    ``x`` itself when ``random_start=False``), each of the ``steps`` iterations takes a step of
    size ``alpha`` along the sign of the input gradient of the cross-entropy loss, then projects
    back onto the L-inf ball of radius ``eps`` around ``x`` and onto ``[0, 1]``:

    .. math:: x_{t+1} = \mathrm{clip}_{[0, 1]}\Big(x + \mathrm{clip}_{[-\epsilon, \epsilon]}
              \big(x_t - x + \alpha\,\mathrm{sign}(\nabla_{x_t}\mathrm{CE}(f(x_t), y))\big)\Big).

    With ``steps=1``, ``alpha=eps`` and ``random_start=False`` this is exactly :class:`FGSM`.

    Parameters
    ----------
    model : nn.Module
        Classifier taking images in ``[0, 1]`` and returning logits of shape ``(N, K)``.
    eps : float, default 8/255
        Maximum L-inf perturbation, in pixel units of ``[0, 1]`` images.
    alpha : float, default 2/255
        Step size of each iteration.
    steps : int, default 10
        Number of iterations.
    random_start : bool, default True
        Start from ``x`` plus noise drawn uniformly in ``[-eps, eps]`` (clipped to ``[0, 1]``).
    generator : torch.Generator or None, default None
        Source of the random start, for reproducible attacks; ``None`` uses torch's global
        generator. The noise is drawn on the generator's device, then moved to the device of
        ``x``. The generator advances with every call, so two attacks built with generators
        seeded alike return the same images, call for call.

    Raises
    ------
    ValueError
        If ``eps`` or ``alpha`` is not a finite number > 0, or ``steps`` is not an int >= 1.
    TypeError
        If ``generator`` is neither ``None`` nor a ``torch.Generator``.

    Shape
    -----
    - x: ``(N, C, H, W)`` floating-point images; it must have a range ``[0, 1]``.
    - y: ``(N,)`` ``torch.long`` labels.
    - Output: ``(N, C, H, W)``, values in ``[0, 1]``, ``|x_adv - x| <= eps`` everywhere.

    References
    ----------
    https://arxiv.org/abs/1706.06083

    Examples
    --------
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    >>> x, y = torch.rand(2, 3, 4, 4), torch.tensor([3, 7])
    >>> attack = PGD(model, eps=8 / 255, generator=torch.Generator().manual_seed(0))
    >>> bool((attack(x, y) - x).abs().max() <= 8 / 255 + 1e-6)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, generator=generator)

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        x_adv = x
        if self.random_start:
            unit = self._noise(torch.rand, x.shape, x)  # (N, C, H, W) uniform in [0, 1)
            x_adv = (x + self.eps * (2 * unit - 1)).clamp(0.0, 1.0)
        for _ in range(self.steps):
            direction = self._ascent_direction(x_adv, y)  # (N, C, H, W)
            # x_adv - x first, so that one step from x with alpha=eps is FGSM to the last bit
            delta = (x_adv - x + self.alpha * direction.sign()).clamp(-self.eps, self.eps)
            x_adv = (x + delta).clamp(0.0, 1.0)
        return x_adv

    def _ascent_direction(self, x_adv: Tensor, y: Tensor) -> Tensor:
        """Tensor of shape (N, C, H, W) whose sign is the step; the plain input gradient here."""
        return input_gradient(self.model, x_adv, y)
