"""Capture named feature maps and logits in one forward pass.

Forward hooks are registered by ``model.named_modules()`` name inside a context manager that
removes them on exit; captured outputs are handed over and cleared after each forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from types import TracebackType

import torch
from torch import Tensor, nn

__all__ = ["FeatureTap", "check_layers", "eval_mode", "model_device", "model_dtype", "parameter_sha256", "resolve_layers"]


def _parameters(model: nn.Module) -> Iterator[Tensor]:
    """``model.parameters()`` in its order (modules pre-order, each module's own first), from
    one generator over ``_parameters`` instead of the four nested ones of ``parameters()``:
    reading the first costs a quarter. A parameter shared by two modules comes twice."""
    stack: list[nn.Module | None] = [model]
    seen: set[nn.Module] = set()
    while stack:
        module = stack.pop()
        if module is None or module in seen:  # a submodule registered as None, or met before
            continue
        seen.add(module)
        for p in module._parameters.values():
            if p is not None:
                yield p
        stack.extend(reversed(module._modules.values()))


def model_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the model's first floating-point parameter (float32 for a model without one)."""
    return next((p.dtype for p in _parameters(model) if p.is_floating_point()), torch.float32)


def _any_training(model: nn.Module) -> bool:
    """Whether ``model`` or any of its submodules is in training mode.

    One walk of the module tree over ``_modules`` (each module once, as ``modules()`` visits
    them), stopping at the first module in training mode: a fifth of the cost of
    ``model.modules()``, which scoring pays on every call.
    """
    stack, seen = [model], {model}
    while stack:
        module = stack.pop()
        if module.training:
            return True
        for child in module._modules.values():
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration of a ``with`` block.

    On exit every submodule gets back its own ``training`` flag, so a model with, say, a frozen
    BatchNorm in eval mode inside a network in train mode comes back exactly as it was.

    Parameters
    ----------
    model : nn.Module
        The network to switch.

    Yields
    ------
    nn.Module
        ``model``, now in eval mode.
    """
    if not _any_training(model):  # already in eval mode: nothing to switch (the deploy case)
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]  # pre-order: parents first
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.train(training)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without either)."""
    first = next(itertools.chain(_parameters(model), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def check_layers(model: nn.Module, layers: Sequence[str]) -> tuple[str, ...]:
    """Validate layer names against ``model.named_modules()``.

    Raises
    ------
    ValueError
        Naming the unknown layers and listing the valid names.
    """
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of module names; got the string {layers!r} (wrap it in a list)")
    layers = tuple(layers)
    names = {name for name, _ in model.named_modules() if name}
    unknown = [name for name in layers if name not in names]
    joined = "".join(layers) if all(isinstance(name, str) and len(name) == 1 for name in layers) else ""
    if unknown and len(layers) > 1 and joined in names:
        raise ValueError(
            f"layers must be a sequence of module names; got the string {joined!r} split into letters (wrap it in a list)"
        )
    if unknown:
        raise ValueError(f"layers {unknown} are not modules of the model; valid names: {sorted(names)}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct; got {list(layers)}")
    return layers


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule at a dotted path of registered submodules, or None."""
    module: nn.Module | None = model
    for atom in name.split("."):
        module = module._modules.get(atom)
        if module is None:
            return None
    return module


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The modules named by ``layers``, validated as :func:`check_layers` validates them.

    Each name is looked up as a path of registered submodules (``_modules``, what
    ``model.get_submodule`` follows, without its attribute lookups), not by the walk of
    ``model.named_modules()`` that :func:`check_layers` makes (and that scoring a small batch
    would pay on every call); that walk runs only to name what is wrong.

    Returns
    -------
    dict of str to nn.Module
        In the order of ``layers``.

    Raises
    ------
    ValueError
        As :func:`check_layers`.
    """
    names = None if isinstance(layers, str) else tuple(layers)
    if names is not None and all(isinstance(name, str) and name for name in names) and len(set(names)) == len(names):
        found = {name: _submodule(model, name) for name in names}
        if None not in found.values():
            return found
    names = check_layers(model, layers)
    modules = dict(model.named_modules())
    return {name: modules[name] for name in names}


def parameter_sha256(model: nn.Module) -> str:
    """SHA-256 (hex) of the model's state dict: every tensor's key, dtype, shape and bytes, in key order.

    Identifies the exact weights a detector was fitted on (parameters and persistent buffers
    such as BatchNorm running statistics); any fine-tuning step changes it.
    """
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
        digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureTap:
    """Context manager that runs the model and returns its logits and the named feature maps.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits (N, K).
    layers : sequence of str
        Module names (as in ``model.named_modules()``) whose outputs to capture; the modules
        they name when the tap is created (:func:`resolve_layers`) are hooked.

    Examples
    --------
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    >>> with FeatureTap(model, ["0"]) as tap:
    ...     logits, feats = tap(torch.rand(2, 1, 5, 5))
    >>> feats["0"].shape
    torch.Size([2, 4, 3, 3])
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        self._taps = resolve_layers(model, layers)
        self.layers = tuple(self._taps)
        self._outputs: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}; a Tensor (N, C, H, W) is required")
            self._outputs[name] = output

        return hook

    def __enter__(self) -> FeatureTap:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self._taps.items()]
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = {}

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the model on ``x``.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)

        Returns
        -------
        logits : Tensor of shape (N, K)
        feats : dict of str to Tensor
            Layer name -> its output, in the order of ``layers``.
        """
        if not self._handles and self.layers:
            raise RuntimeError("FeatureTap must be used as a context manager: `with FeatureTap(model, layers) as tap:`")
        logits = self.model(x)
        missing = [name for name in self.layers if name not in self._outputs]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass; tap modules that the forward calls")
        feats = {name: self._outputs[name] for name in self.layers}
        self._outputs = {}
        return logits, feats
