"""Fast Gradient Sign Method: one L-inf step of size ``eps`` along the sign of the gradient."""

from __future__ import annotations

from torch import Tensor, nn

from covguard.attacks.base import Attack, input_gradient

__all__ = ["FGSM"]


class FGSM(Attack):
    r"""FGSM from "Explaining and Harnessing Adversarial Examples" (Goodfellow et al., 2015).

    Distance measure: L-inf. One step

    .. math:: x_{adv} = \mathrm{clip}_{[0, 1]}\big(x + \epsilon\,
              \mathrm{sign}(\nabla_x \mathrm{CE}(f(x), y))\big).

    Parameters
    ----------
    model : nn.Module
        Classifier taking images in ``[0, 1]`` and returning logits of shape ``(N, K)``.
    eps : float, default 8/255
        Maximum L-inf perturbation, in pixel units of ``[0, 1]`` images.

    Raises
    ------
    ValueError
        If ``eps`` is not a finite number > 0.

    Shape
    -----
    - x: ``(N, C, H, W)`` floating-point images; it must have a range ``[0, 1]``.
    - y: ``(N,)`` ``torch.long`` labels.
    - Output: ``(N, C, H, W)``, values in ``[0, 1]``, ``|x_adv - x| <= eps`` everywhere.

    References
    ----------
    https://arxiv.org/abs/1412.6572

    Examples
    --------
    >>> import torch
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    >>> x, y = torch.rand(2, 3, 4, 4), torch.tensor([3, 7])
    >>> x_adv = FGSM(model, eps=8 / 255)(x, y)
    >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
    True
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255) -> None:
        super().__init__(model, eps=eps)

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        grad = input_gradient(self.model, x, y)  # (N, C, H, W)
        return (x + self.eps * grad.sign()).clamp(0.0, 1.0)
