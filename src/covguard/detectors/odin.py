"""ODIN: temperature scaling plus a small input perturbation toward confidence (Liang et al., 2018)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covguard.detectors.base import warn_nonfinite
from covguard.detectors.state import TensorStateDetector
from covguard.features import eval_mode

__all__ = ["ODIN", "odin_perturb"]


def odin_perturb(model: nn.Module, x: Tensor, *, temperature: float, noise: float) -> Tensor:
    """One signed-gradient step that raises the temperature-scaled confidence of the predicted class.

    ``x_tilde = x - noise * sign(grad_x CE(model(x) / T, argmax model(x)))``, with
    ``sign(0) = +1`` as in OpenOOD (``torch.ge(grad, 0)``). The loss is summed over the batch,
    so each image's step depends on that image alone. Gradients are taken with
    ``torch.autograd.grad`` on a detached copy of ``x``: no parameter ``.grad`` is written.
    The model is run in whatever mode it is in.

    Parameters
    ----------
    model : nn.Module
    x : Tensor of shape (N, C, H, W)
        Images in the model's input units.
    temperature : float
    noise : float
        Step size in the units of ``x``.

    Returns
    -------
    Tensor of shape (N, C, H, W)
        Not clamped: it may leave the input range by up to ``noise``.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)  # (N, K)
        loss = F.cross_entropy(logits / temperature, logits.detach().argmax(1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    sign = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
    return x.detach() - noise * sign


class ODIN(TensorStateDetector):
    """ODIN score: negated maximum softmax at temperature ``T`` of a perturbed input.

    Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in
    Neural Networks", ICLR 2018, as in OpenOOD v1.5 ``openood/postprocessors/odin_postprocessor.py``
    (``temperature: 1000``, ``noise: 0.0014`` in ``configs/postprocessors/odin.yml``):

    ``x~ = x - eps * sign(grad_x CE(l(x) / T, argmax l(x)))``,
    ``score(x) = -max_k softmax(l(x~) / T)_k``.

    Needs no fit (a saved file holds its hyperparameters only), but needs input gradients:
    :meth:`score` runs the model twice (forward + backward to the input, then forward on ``x~``)
    in eval mode (the previous mode is restored); :meth:`score_features` expects the logits of
    the *perturbed* images.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C, H, W) in [0, 1] -> logits (N, K).
    temperature : float, default 1000
        ``T``.
    noise : float, default 0.0014
        ``eps``, in [0, 1] pixel units.

    Notes
    -----
    OpenOOD feeds *normalized* images to the network and divides the gradient sign by the
    per-channel std (the fixed CIFAR constants 63.0/255, 62.1/255, 66.7/255 of the original
    ODIN code) before the ``eps`` step; in [0, 1] pixel units that is a step of exactly ``eps``,
    and the sign of the gradient is the same in both units (std > 0). Our models take [0, 1]
    images and normalize internally, so the step ``eps`` is applied to the [0, 1] image:
    identical to OpenOOD on CIFAR-normalized models; for a dataset with another std, OpenOOD's
    pixel step is ``eps * std_data / std_const`` while ours stays ``eps``. As in OpenOOD and the
    original code, ``x~`` is not clamped to [0, 1] (it leaves the range by at most ``eps``).
    Does not work under ``torch.inference_mode``.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> ODIN(model).score(torch.rand(5, 1, 8, 8)).shape
    torch.Size([5])
    """

    requires_fit: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, temperature: float = 1000.0, noise: float = 0.0014) -> None:
        super().__init__(model)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0; got {noise}")
        self.temperature = temperature
        self.noise = noise

    def score(self, x: Tensor) -> Tensor:
        """Anomaly score of each image; larger = more anomalous.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)

        Returns
        -------
        Tensor of shape (N,)
        """
        x = self.check_input(x)
        with eval_mode(self.model):
            x_tilde = odin_perturb(self.model, x, temperature=self.temperature, noise=self.noise)
            with torch.no_grad():
                logits = self.model(x_tilde)  # (N, K)
        return self.score_features(logits, {})

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Scores (N,) from the logits (N, K) of the perturbed images; ``feats`` is unused."""
        scores = -(logits / self.temperature).softmax(1).amax(1)
        return warn_nonfinite(scores, ~torch.isfinite(logits).all(1))
