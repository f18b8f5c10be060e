"""Load pretrained weights into covguard models without unpickling arbitrary code.

Checkpoints are read with ``torch.load(..., weights_only=True)`` (or ``safetensors``), which
refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from covguard.models.resnet_cifar import ResNetCIFAR, resnet20, resnet32, resnet44

__all__ = ["CHECKPOINT_SUFFIXES", "cifar_resnet", "load_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".th", ".pt", ".pth", ".safetensors")
_WRAPPER_KEYS = ("state_dict", "model", "net")  # where training scripts nest the weights
_PREFIX = "module."  # added by nn.DataParallel / DistributedDataParallel
_MAX_LISTED = 10  # keys shown in an error message
_CIFAR_RESNETS: dict[str, Callable[..., ResNetCIFAR]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
}

ModelT = TypeVar("ModelT", bound=nn.Module)


def load_checkpoint(model: ModelT, path: str | os.PathLike[str], *, strict: bool = True) -> ModelT:
    """Load a checkpoint file into ``model`` in place.

    The file holds either a state dict or a dict with the state dict under ``"state_dict"``,
    ``"model"`` or ``"net"`` (other entries such as ``best_prec1`` are ignored). A ``module.``
    prefix on every key (from ``DataParallel``) is stripped. Checkpoints written before PyTorch
    0.4.1 lack BatchNorm's ``num_batches_tracked``; BatchNorm fills it in, so they load strictly.

    Parameters
    ----------
    model : nn.Module
        The model to fill, e.g. ``resnet20()``.
    path : str or os.PathLike
        A ``.th``, ``.pt`` or ``.pth`` file written by ``torch.save`` (read with
        ``weights_only=True``), or a ``.safetensors`` file.
    strict : bool, default=True
        If True, the keys of the file must be exactly those of ``model.state_dict()`` and nothing
        is loaded otherwise. If False, matching keys are loaded and the missing and unexpected
        ones are reported with a warning.

    Returns
    -------
    nn.Module
        ``model`` itself, with the loaded weights and unchanged training mode.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If the suffix is not one of ``CHECKPOINT_SUFFIXES``; if the file cannot be read (truncated,
        text, not the format its suffix says); if the file holds no state dict; if
        a tensor's shape differs from the model's; or, with ``strict=True``, if keys are missing
        or unexpected (the message lists up to 10 of each).

    Examples
    --------
    >>> from covguard.models import resnet20
    >>> model = load_checkpoint(resnet20(), "resnet20-12fca82f.th")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"path must end in one of {', '.join(CHECKPOINT_SUFFIXES)}; got {str(path)!r}"
        )
    try:
        if suffix == ".safetensors":
            content: object = load_file(path, device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError) as err:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {type(err).__name__}: {err}") from err
    except Exception as err:  # noqa: BLE001 (torch.load and safetensors raise many types on a bad file)
        kind = "safetensors" if suffix == ".safetensors" else "torch.save (zip or legacy pickle of tensors)"
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable {kind} file, or it is truncated or corrupted: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    state_dict = _strip_prefix(_find_state_dict(content, path))

    expected = model.state_dict()
    missing = [
        key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")
    ]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"{len(mismatched)} tensor shapes differ: {_listing(mismatched)}"
        )
    if missing or unexpected:
        message = (
            f"checkpoint {str(path)!r} does not match the keys of {type(model).__name__}: "
            f"{len(missing)} missing ({_listing(missing)}), "
            f"{len(unexpected)} unexpected ({_listing(unexpected)})"
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    model.load_state_dict(state_dict, strict=False)
    logger.info("loaded %d tensors from %s into %s", len(state_dict), path, type(model).__name__)
    return model


def cifar_resnet(name: str, path: str | os.PathLike[str] | None = None) -> ResNetCIFAR:
    """Build a CIFAR-10 ResNet-20/32/44 and optionally load pretrained weights.

    Parameters
    ----------
    name : {"resnet20", "resnet32", "resnet44"}
        Architecture.
    path : str or os.PathLike, optional
        Checkpoint to load strictly with :func:`load_checkpoint`, e.g. akamaster's
        ``resnet20-12fca82f.th``. Without it the model is randomly initialized.

    Returns
    -------
    ResNetCIFAR
        The model, in training mode like any new ``nn.Module``: call ``.eval()`` before scoring.

    Raises
    ------
    ValueError
        If ``name`` is unknown, or as :func:`load_checkpoint`.
    FileNotFoundError
        As :func:`load_checkpoint`.

    Examples
    --------
    >>> model = cifar_resnet("resnet20")
    >>> sum(p.numel() for p in model.parameters())
    269722
    """
    if name not in _CIFAR_RESNETS:
        raise ValueError(f"name must be one of {', '.join(_CIFAR_RESNETS)}; got {name!r}")
    model = _CIFAR_RESNETS[name]()
    if path is not None:
        load_checkpoint(model, path)
    return model


def _find_state_dict(content: object, path: Path) -> Mapping[str, Tensor]:
    if isinstance(content, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
        if content and all(isinstance(v, Tensor) for v in content.values()):
            return content
    if isinstance(content, Mapping):
        found = f"a dict with keys {_listing(map(str, content))}"
    else:
        found = type(content).__name__
    raise ValueError(
        f"checkpoint {str(path)!r} must hold a state dict of tensors, directly or under one of "
        f"{', '.join(map(repr, _WRAPPER_KEYS))}; got {found}"
    )


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if state_dict and all(key.startswith(_PREFIX) for key in state_dict):
        return {key[len(_PREFIX) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _listing(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    if len(keys) > _MAX_LISTED:
        shown += f", ... and {len(keys) - _MAX_LISTED} more"
    return shown or "none"
