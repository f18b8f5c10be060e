"""Bounded reads and atomic writes of the files covguard reads and writes.

- :func:`read_bounded` reads a whole file only if it is not larger than a limit, and never
  more than ``limit + 1`` bytes (a file that grows while it is read is still refused), so
  a hostile input cannot make covguard allocate more than the limit.
- :func:`atomic_writer` writes to a temporary file next to the destination and renames it
  over the destination only when the block succeeds: an aborted write leaves the previous
  file intact and no partial file. The file gets the permissions of a plain ``open``
  (``0o666`` minus the process umask), not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_writer", "format_bytes", "read_bounded"]


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1536 bytes (1.5 KiB)"``: exact, then readable."""
    value, unit = float(n), "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{n} bytes" if n < 1024 else f"{n} bytes ({value:.1f} {unit})"


def read_bounded(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refusing files larger than ``limit`` bytes.

    Parameters
    ----------
    path : str or Path
        A regular file.
    limit : int
        Largest size accepted, in bytes.
    what : str
        How the error message names the file (e.g. ``"image"``).

    Raises
    ------
    ValueError
        The file is larger than ``limit`` (its size is in the message).
    OSError
        The file cannot be opened or read (missing, a folder, no permission).
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise ValueError(f"{what} {str(path)!r} is {format_bytes(size)}, larger than the limit of {format_bytes(limit)}")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {str(path)!r} grew past the limit of {format_bytes(limit)} while it was read")
    return data


def _umask_mode() -> int:
    """``0o666`` minus the process umask: the mode a plain ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb", **kwargs: object) -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it to ``path`` when the block succeeds.

    Parameters
    ----------
    path : str or Path
        Destination; its folder must exist. An existing file is replaced only at the end.
    mode : {"wb", "w"}
        Binary or text.
    **kwargs
        Passed to :func:`open` (``encoding``, ``newline``, ``errors``).

    Yields
    ------
    file object
        Write the content to it; on an exception (or Ctrl-C) the temporary file is deleted and
        ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
