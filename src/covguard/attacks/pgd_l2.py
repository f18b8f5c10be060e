"""Projected Gradient Descent under an L2 budget, with a random start inside the L2 ball."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from covguard.attacks.base import IterativeAttack, input_gradient

__all__ = ["PGDL2"]


def _l2_norm(t: Tensor) -> Tensor:
    """Euclidean norm of each image of ``t`` (N, C, H, W), shaped (N, 1, 1, 1) to broadcast."""
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # (N, C*H*W) -> (N, 1, 1, 1)


class PGDL2(IterativeAttack):
    r"""PGD under an L2 budget, after Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks".

    Distance measure: L2, per image (the norm of all ``C*H*W`` values of one image). Each of the
    ``steps`` iterations moves ``alpha`` along the L2-normalized input gradient of the
    cross-entropy loss, rescales the perturbation onto the L2 ball of radius ``eps`` around
    ``x`` if it left it, and clips to ``[0, 1]`` (which moves every pixel towards ``x``, so the
    budget still holds):

    .. math:: \delta = x_t - x + \alpha\, g / \lVert g \rVert_2, \quad
              x_{t+1} = \mathrm{clip}_{[0, 1]}\big(x + \delta \min(1, \epsilon /
              \lVert \delta \rVert_2)\big),

    with :math:`g = \nabla_{x_t}\mathrm{CE}(f(x_t), y)`; an image whose gradient is exactly zero
    does not move. The random start is ``x + r u`` clipped to ``[0, 1]``, with ``u`` uniform on
    the unit sphere (a normalized Gaussian draw) and radius ``r`` uniform in ``[0, eps]``, as in
    torchattacks.

    Parameters
    ----------
    model : nn.Module
        Classifier taking images in ``[0, 1]`` and returning logits of shape ``(N, K)``.
    eps : float, default 0.5
        Maximum L2 norm of the perturbation of each image, in pixel units of ``[0, 1]`` images.
    alpha : float, default 0.1
        L2 length of each step.
    steps : int, default 10
        Number of iterations.
    random_start : bool, default True
        Start from a random point of the L2 ball of radius ``eps`` around ``x``.
    generator : torch.Generator or None, default None
        Source of the random start, for reproducible attacks; ``None`` uses torch's global
        generator. The noise is drawn on the generator's device, then moved to the device of
        ``x``; the generator advances with every call.

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
    - Output: ``(N, C, H, W)``, values in ``[0, 1]``, ``||x_adv[i] - x[i]||_2 <= eps``.

    References
    ----------
    https://arxiv.org/abs/1706.06083

    Examples
    --------
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    >>> x, y = torch.rand(2, 3, 4, 4), torch.tensor([3, 7])
    >>> x_adv = PGDL2(model, eps=0.5)(x, y)
    >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all())
    True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 0.5,
        alpha: float = 0.1,
        steps: int = 10,
        random_start: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, generator=generator)

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        tiny = torch.finfo(x.dtype).tiny  # keeps 0 / 0 out of the normalizations
        x_adv = x
        if self.random_start:
            gauss = self._noise(torch.randn, x.shape, x)  # (N, C, H, W)
            radius = self._noise(torch.rand, (x.shape[0], 1, 1, 1), x)  # (N, 1, 1, 1)
            unit = gauss / _l2_norm(gauss).clamp_min(tiny)  # (N, C, H, W), unit L2 norm
            x_adv = (x + self.eps * radius * unit).clamp(0.0, 1.0)
        for _ in range(self.steps):
            grad = input_gradient(self.model, x_adv, y)  # (N, C, H, W)
            delta = x_adv - x + self.alpha * grad / _l2_norm(grad).clamp_min(tiny)
            scale = (self.eps / _l2_norm(delta).clamp_min(tiny)).clamp(max=1.0)  # (N, 1, 1, 1)
            x_adv = (x + delta * scale).clamp(0.0, 1.0)
        return x_adv
