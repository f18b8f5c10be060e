"""Cache of decoded image sets, so that 60,000 JPEGs are decoded once, not on every run.

An entry is a safetensors file (never pickle) holding ``images`` (N, 3, S, S) uint8 and
``labels`` (N,) int64, with the class names, set name and source path as string metadata. Its
key is a SHA-256 over

* every source file's absolute path, size and modification time (``st_mtime_ns``); a folder
  counts as all the files below it, so editing, adding or removing a file changes the key;
* the loader parameters (set name, size, limit, ...);
* the cache format version and the Pillow version (a different libjpeg may decode differently).

The cache folder is ``cache_dir`` if given, else ``$COVGUARD_CACHE``, else ``~/.cache/covguard``.
Entries are never deleted automatically; remove the folder to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import PIL
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from covguard.data.images import ImageSet

__all__ = ["cache_key", "cached", "default_cache_dir", "fingerprint"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$COVGUARD_CACHE`` if set, else ``~/.cache/covguard``."""
    env = os.environ.get("COVGUARD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "covguard"


def fingerprint(paths: Sequence[str | Path]) -> list[list]:
    """``[absolute path, size, mtime_ns]`` of every file in ``paths`` (folders walked, sorted)."""
    rows = []
    for path in paths:
        path = Path(path).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            rows.append([str(f), st.st_size, st.st_mtime_ns])
    return rows


def cache_key(sources: Sequence[str | Path], params: Mapping[str, object]) -> str:
    """Hex SHA-256 of the sources' fingerprint, the loader parameters and the format versions."""
    payload = {
        "format": FORMAT_VERSION,
        "pillow": PIL.__version__,
        "sources": fingerprint(sources),
        "params": dict(params),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path, key: str) -> ImageSet | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        tensors = load_file(str(path))
        return ImageSet(
            images=tensors["images"],
            labels=tensors["labels"],
            classes=tuple(json.loads(meta["classes"])),
            name=meta["name"],
            source=meta["source"],
            skipped=int(meta.get("skipped", "0")),
        )
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        warnings.warn(f"ignoring unreadable cache entry {str(path)!r} ({err}); decoding again", stacklevel=3)
        return None


def _write(path: Path, key: str, data: ImageSet) -> None:
    meta = {
        "format_version": str(FORMAT_VERSION),
        "key": key,
        "classes": json.dumps(list(data.classes)),
        "name": data.name,
        "source": data.source,
        "skipped": str(data.skipped),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {"images": data.images.contiguous(), "labels": data.labels.contiguous()}, tmp, metadata=meta
        )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared $COVGUARD_CACHE should be readable
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached(
    build: Callable[[], ImageSet],
    *,
    sources: Sequence[str | Path],
    params: Mapping[str, object],
    cache_dir: str | Path | None = None,
) -> ImageSet:
    """Return the cached :class:`ImageSet` for ``(sources, params)``, or ``build()`` it and store it.

    Parameters
    ----------
    build : callable
        Decodes the set; called only on a cache miss.
    sources : sequence of str or Path
        Files or folders the set is read from (their path, size and mtime enter the key).
    params : mapping
        Loader parameters that change the result (JSON-serializable; ``name`` names the file).
    cache_dir : str or Path, optional
        Cache folder; default :func:`default_cache_dir`.

    Returns
    -------
    ImageSet
        The cached or freshly built set. A cache folder that cannot be written gives a warning
        and the freshly built set.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(sources, params)
    stem = str(params.get("name", "imageset")).replace(os.sep, "_")
    path = folder / f"{stem}-{key[:20]}.safetensors"
    if path.is_file():
        hit = _read(path, key)
        if hit is not None:
            logger.info("loaded %s (%d images) from cache %s", hit.name, len(hit), path)
            if hit.skipped:  # the decode warning is not lost on later runs
                warnings.warn(
                    f"{hit.source}: {hit.skipped} images failed to decode and are missing from the "
                    f"cached set {path}",
                    stacklevel=2,
                )
            return hit
    data = build()
    try:
        _write(path, key, data)
        logger.info("cached %s (%d images) in %s", data.name, len(data), path)
    except OSError as err:
        warnings.warn(f"could not write cache entry {str(path)!r}: {err}", stacklevel=2)
    return data
