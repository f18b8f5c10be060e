"""On-disk cache of a benchmark's expensive tensors (detector scores, generated attacks) between runs.

An entry is one safetensors file (never pickle) of named tensors under
``<folder>/<kind>/<key[:24]>.safetensors``, with string metadata: ``key`` (the full hex key),
``parts`` (the JSON that was hashed, for a human reading the file) and ``format_version``.

The key is the SHA-256 of a JSON document (sorted keys) of the caller's ``parts`` (what the
tensors depend on: checkpoint weights, data, settings) plus :data:`FORMAT_VERSION` and the
covguard and torch versions, so a change to any of them misses. :func:`tensor_sha256`
fingerprints data by content: the exact images used, not the files they came from, so a change
in decoding or in a subset misses too.

A file whose stored key differs from the one asked for is a miss. A file that cannot be read
(truncated, corrupted, not safetensors) is ignored with a warning, recomputed and overwritten.
Files are written to a temporary name and renamed, so a stopped run never leaves half an entry.
The folder is ``folder`` if given, else ``$COVGUARD_CACHE/suite``, else ``~/.cache/covguard/suite``;
entries are never deleted automatically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes
from torch import Tensor

from covguard.data.cache import default_cache_dir
from covguard.files import atomic_writer

__all__ = ["FORMAT_VERSION", "TensorCache", "cache_key", "default_suite_cache_dir", "tensor_sha256"]

logger = logging.getLogger(__name__)

#: Raised when the layout or meaning of entries changes: every older entry then misses.
FORMAT_VERSION = 1


def default_suite_cache_dir() -> Path:
    """``$COVGUARD_CACHE/suite`` if the variable is set, else ``~/.cache/covguard/suite``."""
    return default_cache_dir() / "suite"


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes (on the CPU, contiguous)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    digest = hashlib.sha256(f"{flat.dtype}|{tuple(t.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(parts: Mapping[str, object]) -> str:
    """Hex SHA-256 of ``parts`` (JSON, sorted keys), the format version and the covguard and torch versions."""
    from covguard import __version__

    payload = {"format": FORMAT_VERSION, "covguard": __version__, "torch": torch.__version__, "parts": dict(parts)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class TensorCache:
    """Named tensors stored on disk under a key derived from what they depend on.

    Parameters
    ----------
    folder : str or Path, optional
        Cache folder; default :func:`default_suite_cache_dir`.
    enabled : bool, default True
        False: :meth:`get` always computes and nothing is read or written.

    Attributes
    ----------
    hits, misses : int
        Entries read from disk and entries computed, since construction.

    Examples
    --------
    >>> import tempfile
    >>> cache = TensorCache(tempfile.mkdtemp())
    >>> compute = lambda: {"scores": torch.arange(3.0)}
    >>> first = cache.get("scores", {"model": "abc", "n": 3}, compute)
    >>> again = cache.get("scores", {"model": "abc", "n": 3}, compute)
    >>> cache.hits, cache.misses, torch.equal(first["scores"], again["scores"])
    (1, 1, True)
    """

    def __init__(self, folder: str | Path | None = None, *, enabled: bool = True) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_suite_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, parts: Mapping[str, object]) -> Path:
        """Where the entry of ``kind`` for ``parts`` lives (whether or not it exists)."""
        if not kind or "/" in kind or kind.startswith("."):
            raise ValueError(f"kind must be a plain folder name; got {kind!r}")
        return self.folder / kind / f"{cache_key(parts)[:24]}.safetensors"

    def load(self, kind: str, parts: Mapping[str, object]) -> dict[str, Tensor] | None:
        """The stored tensors for ``parts``, or None (no entry, another key, or unreadable: warned)."""
        path, key = self.path(kind, parts), cache_key(parts)
        if not self.enabled or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            warnings.warn(f"ignoring unreadable cache entry {str(path)!r} ({err}); computing it again", stacklevel=2)
            return None

    def save(self, kind: str, parts: Mapping[str, object], tensors: Mapping[str, Tensor]) -> Path | None:
        """Store ``tensors`` for ``parts``; returns the file, or None when disabled or not writable (warned)."""
        if not self.enabled:
            return None
        path = self.path(kind, parts)
        meta = {
            "key": cache_key(parts),
            "parts": json.dumps(dict(parts), sort_keys=True, default=str),
            "format_version": str(FORMAT_VERSION),
        }
        data = save_bytes({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, metadata=meta)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_writer(path) as f:
                f.write(data)
        except OSError as err:
            warnings.warn(f"could not write cache entry {str(path)!r}: {err}", stacklevel=2)
            return None
        return path

    def get(
        self, kind: str, parts: Mapping[str, object], compute: Callable[[], Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The stored tensors for ``parts``, or ``compute()``'s, stored for the next run.

        Parameters
        ----------
        kind : str
            Sub-folder of the entry, e.g. ``"scores"`` or ``"attacks"``.
        parts : mapping
            JSON-serializable description of everything the tensors depend on.
        compute : callable
            Returns the tensors {name: Tensor}; called only on a miss.
        """
        hit = self.load(kind, parts)
        if hit is not None:
            self.hits += 1
            logger.info("cache hit: %s %s", kind, self.path(kind, parts).name)
            return hit
        self.misses += 1
        tensors = dict(compute())
        self.save(kind, parts, tensors)
        return tensors
