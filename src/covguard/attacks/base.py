"""The contract every covguard attack follows, and the plumbing it shares.

An attack is built once with its hyperparameters and called on batches: ``attack(x, y)`` returns
adversarial images of the same shape as ``x``, in ``[0, 1]``, within the attack's budget of
``x``. Models take images in ``[0, 1]`` and normalize them themselves, so every budget is in pixel
units of ``[0, 1]`` images (``eps=8/255`` is eight grey levels of an 8-bit image).

While it runs, an attack switches the model to eval mode (BatchNorm uses its running statistics
and leaves them alone, Dropout is off) and restores every submodule's own mode afterwards. It
differentiates with respect to the images only (:func:`torch.autograd.grad`), so it neither
fills the parameters' ``.grad`` nor touches their ``requires_grad`` flags, and it works inside a
caller's ``torch.no_grad()`` block.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covguard.features import eval_mode

__all__ = [
    "Attack",
    "IterativeAttack",
    "check_batch",
    "check_positive",
    "check_steps",
    "eval_mode",
    "input_gradient",
    "success_mask",
]


def check_positive(value: float, *, name: str) -> float:
    """Return ``value`` as a float if it is finite and > 0, else raise naming ``name``.

    Raises
    ------
    ValueError
        If ``value`` is not a real number, not finite, or not > 0.
    """
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_real and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_steps(value: int, *, name: str) -> int:
    """Return ``value`` if it is an ``int`` >= 1, else raise naming ``name``.

    Raises
    ------
    ValueError
        If ``value`` is not an ``int`` (``bool`` excluded) or is < 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return value


def check_batch(x: Tensor, y: Tensor, *, x_name: str = "x") -> Tensor:
    """Validate a batch of images and labels; return ``y`` on the device of ``x``.

    Parameters
    ----------
    x : Tensor of shape (N, C, H, W)
        Floating-point images with every value in ``[0, 1]``, ``N >= 1``.
    y : Tensor of shape (N,)
        Integer class labels, dtype ``torch.long``.
    x_name : str, default "x"
        Name of the images argument in the caller, used in error messages.

    Returns
    -------
    Tensor of shape (N,)
        ``y`` moved to ``x.device``.

    Raises
    ------
    ValueError
        If ``x`` is not a floating 4-D tensor with at least one image and values in ``[0, 1]``
        (NaN included), or ``y`` is not a ``torch.long`` tensor of shape ``(N,)``.
    """
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{x_name} must be a torch.Tensor of shape (N, C, H, W); got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{x_name} must be a floating-point tensor with values in [0, 1]; got dtype {x.dtype} "
            "(convert uint8 images with x.float() / 255)"
        )
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(
            f"{x_name} must be (N, C, H, W) with N >= 1; got shape {tuple(x.shape)}"
        )
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(
            f"{x_name} must have every value in [0, 1]; got min {x.min().item():.4g}, "
            f"max {x.max().item():.4g}, {int(x.isnan().sum())} NaN"
        )
    if not isinstance(y, Tensor) or y.dtype != torch.long or tuple(y.shape) != (x.shape[0],):
        received = (
            f"dtype {y.dtype}, shape {tuple(y.shape)}"
            if isinstance(y, Tensor)
            else type(y).__name__
        )
        raise ValueError(f"y must be a torch.long tensor of shape ({x.shape[0]},); got {received}")
    return y.to(x.device)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the summed cross-entropy loss with respect to the input images.

    The loss is summed, not averaged, over the batch, so the gradient of each image does not
    depend on the batch size or on the other images in the batch. Call it with grad mode
    enabled, as :meth:`Attack.__call__` does.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits of shape ``(N, K)``; its mode is left as it is.
    x : Tensor of shape (N, C, H, W)
        Images at which to differentiate.
    y : Tensor of shape (N,)
        Class labels.

    Returns
    -------
    Tensor of shape (N, C, H, W)
        ``d/dx sum_i CE(model(x)_i, y_i)``, detached.
    """
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def success_mask(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    """Which images the model misclassifies: ``argmax(model(x_adv)) != y``.

    The model runs in eval mode and without gradients; its mode is restored afterwards.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits of shape ``(N, K)``.
    x_adv : Tensor of shape (N, C, H, W)
        Images in ``[0, 1]``, typically the output of an attack.
    y : Tensor of shape (N,)
        True labels, dtype ``torch.long``.

    Returns
    -------
    BoolTensor of shape (N,)
        ``True`` where the attack succeeded (prediction differs from ``y``), on ``x_adv.device``.

    Raises
    ------
    ValueError
        If ``x_adv`` is not a floating 4-D tensor with values in ``[0, 1]`` or ``y`` is not a
        ``torch.long`` tensor of shape ``(N,)``.

    Examples
    --------
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> success_mask(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 1])).shape
    torch.Size([3])
    """
    y = check_batch(x_adv, y, x_name="x_adv")
    with eval_mode(model), torch.no_grad():
        return model(x_adv).argmax(dim=1) != y


class Attack(ABC):
    """Base class of the untargeted, cross-entropy attacks on classifiers of ``[0, 1]`` images.

    Subclasses implement :meth:`_perturb`; the base class validates the batch, moves the labels
    to the device of the images, runs :meth:`_perturb` with the model in eval mode and gradients
    enabled, and restores the mode of every submodule afterwards.

    Parameters
    ----------
    model : nn.Module
        Classifier taking images in ``[0, 1]`` (it normalizes them itself) and returning logits
        of shape ``(N, K)``.
    eps : float
        Perturbation budget (> 0) in pixel units of ``[0, 1]`` images; the norm it bounds (L-inf
        or L2) is set by the subclass.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If ``eps`` is not a finite number > 0.

    Shape
    -----
    - x: ``(N, C, H, W)`` floating-point images with values in ``[0, 1]``.
    - y: ``(N,)`` ``torch.long`` labels.
    - Output: ``(N, C, H, W)``, same dtype and device as ``x``, values in ``[0, 1]``.
    """

    def __init__(self, model: nn.Module, *, eps: float) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.model = model
        self.eps = check_positive(eps, name="eps")

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial versions of ``x``; ``x`` itself is not modified.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)
            Floating-point images with values in ``[0, 1]``.
        y : Tensor of shape (N,)
            True labels, dtype ``torch.long``; moved to ``x.device``.

        Returns
        -------
        Tensor of shape (N, C, H, W)
            Adversarial images, detached, in ``[0, 1]`` and within the budget of ``x``.

        Raises
        ------
        ValueError
            If ``x`` is not a floating 4-D tensor with values in ``[0, 1]`` or ``y`` is not a
            ``torch.long`` tensor of shape ``(N,)``.
        """
        y = check_batch(x, y)
        with eval_mode(self.model), torch.enable_grad():
            x_adv = self._perturb(x.detach(), y)
        return x_adv.detach()

    @abstractmethod
    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Compute the adversarial images; ``x`` and ``y`` are validated, the model is in eval.

        Implementations must not modify ``x`` in place.
        """


class IterativeAttack(Attack):
    """Base of the iterative attacks with a step size and an optional seeded random start (PGD, PGD-L2).

    Parameters
    ----------
    model : nn.Module
    eps : float
        Budget, as :class:`Attack`.
    alpha : float
        Size of each step.
    steps : int
        Number of iterations.
    random_start : bool
        Start from a random point of the budget ball around ``x`` (drawn by :meth:`_noise`).
    generator : torch.Generator or None
        Source of the random start, for reproducible attacks; ``None`` uses torch's global
        generator. The noise is drawn on the generator's device, then moved to the device of
        ``x``; the generator advances with every call.

    Raises
    ------
    ValueError
        If ``eps`` or ``alpha`` is not a finite number > 0, or ``steps`` is not an int >= 1.
    TypeError
        If ``generator`` is neither ``None`` nor a ``torch.Generator``.
    """

    def __init__(
        self, model: nn.Module, *, eps: float, alpha: float, steps: int, random_start: bool, generator: torch.Generator | None
    ) -> None:
        super().__init__(model, eps=eps)
        self.alpha = check_positive(alpha, name="alpha")
        self.steps = check_steps(steps, name="steps")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.random_start = random_start
        self.generator = generator

    def _noise(self, draw, shape: tuple[int, ...], x: Tensor) -> Tensor:
        """``draw(shape)`` (``torch.rand`` or ``torch.randn``) from the attack's generator, in the
        dtype of ``x``, on the device of ``x``."""
        device = x.device if self.generator is None else self.generator.device
        return draw(shape, generator=self.generator, device=device, dtype=x.dtype).to(x.device)
