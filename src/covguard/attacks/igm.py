"""Integrated-gradient method: L-inf PGD stepping along the sign of integrated gradients."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from covguard.attacks.base import check_positive, check_steps, input_gradient
from covguard.attacks.pgd import PGD

__all__ = ["IGM", "integrated_gradient"]


def integrated_gradient(model: nn.Module, x: Tensor, y: Tensor, *, m: int) -> Tensor:
    r"""Riemann sum of the integrated gradients of the loss from a black (all-zero) baseline.

    Computes, image by image,

    .. math:: \mathrm{IG}(x) = x \odot \frac{1}{m} \sum_{k=1}^{m}
              \nabla_z \mathrm{CE}(f(z), y)\big|_{z = (k/m)\,x},

    the right Riemann sum with ``m`` intervals of
    :math:`(x - x') \odot \int_0^1 \nabla \mathrm{CE}(f(x' + a (x - x')), y)\,da` with baseline
    :math:`x' = 0` (Sundararajan et al., 2017, Eq. 3). The gradient is taken with respect to
    the scaled image ``z`` itself (no ``k/m`` chain-rule factor), averaged over ``k = 1..m`` and
    multiplied elementwise by ``x``. With ``m = 1`` it is ``x * grad CE(f(x), y)``. The ``m``
    scaled batches are run one after another, so memory does not grow with ``m``.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits of shape ``(N, K)``; its mode is left as it is and grad mode
        must be enabled.
    x : Tensor of shape (N, C, H, W)
        Images in ``[0, 1]``.
    y : Tensor of shape (N,)
        Class labels.
    m : int
        Number of points of the Riemann sum, >= 1 (not checked here).

    Returns
    -------
    Tensor of shape (N, C, H, W)
        The integrated gradients, detached.
    """
    total = torch.zeros_like(x)
    for k in range(1, m + 1):
        total += input_gradient(model, (k / m) * x, y)  # (N, C, H, W)
    return x * total / m


class IGM(PGD):
    r"""L-inf PGD whose step direction is the sign of the integrated gradients of the loss.

    Distance measure: L-inf. Identical to :class:`PGD` except that the gradient
    :math:`\nabla_{x_t}\mathrm{CE}` in each step is replaced by the Riemann-sum integrated
    gradients :math:`\mathrm{IG}(x_t)` of :func:`integrated_gradient` (``m`` points, black
    baseline), recomputed at the current iterate:

    .. math:: x_{t+1} = \mathrm{clip}_{[0, 1]}\Big(x + \mathrm{clip}_{[-\epsilon, \epsilon]}
              \big(x_t - x + \alpha\,\mathrm{sign}(\mathrm{IG}(x_t))\big)\Big).

    Because images are non-negative, ``sign(IG)`` equals the sign of the path-averaged gradient
    wherever ``x_t > 0`` and is 0 on black pixels, which the attack therefore leaves alone in
    that step. The idea of attacking along integrated gradients is that of Huang and Kong
    (TAIG, 2022); this class is the plain white-box L-inf version specified above, not a
    reproduction of their transfer attack. Each step costs ``m`` forward and backward passes.

    Parameters
    ----------
    model : nn.Module
        Classifier taking images in ``[0, 1]`` and returning logits of shape ``(N, K)``.
    eps : float, default 8/255
        Maximum L-inf perturbation, in pixel units of ``[0, 1]`` images.
    alpha : float or None, default None
        Step size of each iteration; ``None`` uses ``eps / 4`` (2/255 for the default ``eps``,
        as :class:`PGD`).
    steps : int, default 10
        Number of iterations.
    m : int, default 8
        Number of points of the Riemann sum of the integrated gradients.
    random_start : bool, default True
        Start from ``x`` plus noise drawn uniformly in ``[-eps, eps]``, as :class:`PGD`.
    generator : torch.Generator or None, default None
        Source of the random start (see :class:`PGD`).

    Raises
    ------
    ValueError
        If ``eps`` or ``alpha`` is not a finite number > 0, or ``steps`` or ``m`` is not an
        int >= 1.
    TypeError
        If ``generator`` is neither ``None`` nor a ``torch.Generator``.

    Shape
    -----
    - x: ``(N, C, H, W)`` floating-point images; it must have a range ``[0, 1]``.
    - y: ``(N,)`` ``torch.long`` labels.
    - Output: ``(N, C, H, W)``, values in ``[0, 1]``, ``|x_adv - x| <= eps`` everywhere.

    References
    ----------
    Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017,
    https://arxiv.org/abs/1703.01365. Huang and Kong, "Transferable Adversarial Attack Based on
    Integrated Gradients", ICLR 2022.

    Examples
    --------
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    >>> x, y = torch.rand(2, 3, 4, 4), torch.tensor([3, 7])
    >>> attack = IGM(model, m=4, generator=torch.Generator().manual_seed(0))
    >>> bool((attack(x, y) - x).abs().max() <= 8 / 255 + 1e-6)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        m: int = 8,
        random_start: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        eps = check_positive(eps, name="eps")
        super().__init__(
            model,
            eps=eps,
            alpha=eps / 4 if alpha is None else alpha,
            steps=steps,
            random_start=random_start,
            generator=generator,
        )
        self.m = check_steps(m, name="m")

    def _ascent_direction(self, x_adv: Tensor, y: Tensor) -> Tensor:
        return integrated_gradient(self.model, x_adv, y, m=self.m)
