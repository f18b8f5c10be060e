"""A user's own classifier from a Python file: ``--model-file path.py:factory``.

The command-line tools (``covguard fit``, ``score``, ``export``) build either a model of
:data:`covguard.models.MODELS` (``--model NAME``) or one returned by a function of the user's
own file (``--model-file path.py:factory``). **The file is imported and runs as Python code**,
with the rights of the user running covguard: name only files you trust, as you would with
``python path.py``. The factory is called with the ``--model-arg KEY=VALUE`` keyword arguments
and must return the ``nn.Module`` (architecture only); its trained weights come from
``--weights`` (read without unpickling code, as for the registry models).

Examples
--------
``mynet.py``::

    from torch import nn

    def build(num_classes=10):
        return nn.Sequential(...)

``covguard fit --model-file mynet.py:build --weights mynet.pt --train digits/train --out guard.safetensors``
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_classifier", "load_model_file"]


def load_model_file(spec: str, *, model_args: Sequence[str] = ()) -> nn.Module:
    """Import ``path.py`` and return ``factory(**model_args)`` (this runs the file's code).

    Parameters
    ----------
    spec : str
        ``"path/to/file.py:factory"``; the factory is a module-level callable (a function or an
        ``nn.Module`` subclass).
    model_args : sequence of str
        ``KEY=VALUE`` keyword arguments of the factory (values parsed as JSON, else strings).

    Returns
    -------
    nn.Module
        The model as the factory returns it (weights not loaded, mode unchanged).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        ``spec`` is not ``path.py:factory``; the file fails to import; it has no callable
        ``factory``; the factory raises or returns something that is not an ``nn.Module``.
    """
    from covguard.models import parse_model_args

    path_text, sep, factory = str(spec).rpartition(":")
    if not sep or not path_text or not factory.isidentifier():
        raise ValueError(f"--model-file must be PATH.py:FACTORY (e.g. mynet.py:build); got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"--model-file {path_text!r} does not exist or is not a file")
    if path.suffix != ".py":
        raise ValueError(f"--model-file must name a Python file ending in .py; got {path_text!r}")
    kwargs = parse_model_args(model_args)
    # A private module name per file: two files with the same stem do not collide.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"covguard_user_model_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--model-file {path_text!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ValueError(f"--model-file {path_text!r} failed to import: {type(err).__name__}: {err}") from err
    build = getattr(module, factory, None)
    if not callable(build):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(
            f"--model-file {path_text!r} has no callable {factory!r}; its module-level callables: {found[:10]}"
        )
    try:
        model = build(**kwargs)
    except Exception as err:
        raise ValueError(f"--model-file factory {factory}({_call_args(kwargs)}) raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model-file factory {factory!r} must return a torch.nn.Module; got {type(model).__name__}")
    return model


def _call_args(kwargs: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def load_classifier(
    *,
    name: str | None,
    model_file: str | None,
    weights: str | Path,
    model_args: Sequence[str] = (),
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The classifier named by ``--model`` or ``--model-file``, its ``--weights`` loaded strictly, in eval mode.

    Exactly one of ``name`` and ``model_file`` is given. See :func:`load_model_file` and
    :func:`covguard.models.load_model`; checkpoint errors name ``--weights``.
    """
    from covguard.models import check_device, load_checkpoint, load_model

    if (name is None) == (model_file is None):
        raise ValueError("give exactly one of --model NAME and --model-file PATH.py:FACTORY")
    try:
        if name is not None:
            return load_model(name, weights, model_args=model_args, device=device)
        return load_checkpoint(load_model_file(model_file, model_args=model_args), weights).to(check_device(device)).eval()
    except FileNotFoundError as err:
        if "checkpoint" in str(err):
            raise FileNotFoundError(f"--weights: {err}") from err
        raise
    except ValueError as err:
        if str(err).startswith(("checkpoint", "path must end")):
            raise ValueError(f"--weights: {err}") from err
        raise
