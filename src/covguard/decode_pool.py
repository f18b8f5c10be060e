"""Decode image files in worker processes, in reading order, with a bounded read-ahead.

``covguard score --workers N``: the main process reads the files (a tar archive once, in storage
order) and hands chunks of encoded bytes to ``N`` worker processes, which decode them with
:func:`covguard.imagefiles.decode_image` (the same function, so the same pixels as decoding in
the main process). Results come back in reading order. At most ``prefetch`` images are read
ahead of the consumer: while it runs the model, the workers decode the next images, and memory
does not grow with the number of images.

Workers are forked from a ``forkserver`` process that imported covguard once (so starting N
workers costs one import, not N), never from the main process: forking a process that runs
torch's thread pools can deadlock. Each worker uses one torch thread and leaves Ctrl-C to the
main process, which shuts the pool down.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice

import numpy as np
import torch
from torch import Tensor

from covguard.decode import DecodeError
from covguard.imagefiles import decode_image

__all__ = ["CHUNK_IMAGES", "decode_stream"]

CHUNK_IMAGES = 16  # images per task sent to a worker: large enough to amortize the pickling round trip


def decode_stream(
    items: Iterable[tuple[str, bytes]],
    *,
    channels: int,
    size: tuple[int, int],
    workers: int = 0,
    prefetch: int = 256,
) -> Iterator[tuple[str, Tensor | DecodeError]]:
    """Decode ``(name, bytes)`` items, in their order; each result is pixels or the reason it failed.

    Parameters
    ----------
    items : iterable of (str, bytes)
        As :func:`covguard.imagefiles.list_images` yields them; read lazily, at most
        ``prefetch`` images ahead of the consumer.
    channels, size
        As :func:`covguard.imagefiles.decode_image`.
    workers : int, default 0
        0: decode in this process. ``N >= 1``: in ``N`` worker processes.
    prefetch : int
        Images read and in flight at most (rounded up to whole chunks of :data:`CHUNK_IMAGES`).

    Yields
    ------
    name : str
    pixels : Tensor of shape (channels, H, W), float32 in [0, 1], or DecodeError
        What :func:`~covguard.imagefiles.decode_image` returns or raises for that image.

    Raises
    ------
    ValueError
        ``workers`` or ``prefetch`` is not a non-negative / positive integer; a worker process
        died (killed by the system, or a crash in an image decoder): the message names the
        images it was decoding.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0; got {workers!r}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1; got {prefetch}")
    if workers == 0:
        for name, data in items:
            yield name, _decode_one(data, channels, size)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # used when this process starts its fork server (once)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker)
    pending: deque[tuple[list[str], Future]] = deque()
    max_pending = max(workers, -(-prefetch // CHUNK_IMAGES))
    items = iter(items)
    chunks = iter(lambda: list(islice(items, CHUNK_IMAGES)), [])  # lists of CHUNK_IMAGES items, the last shorter
    try:
        for chunk in chunks:
            names = [name for name, _ in chunk]
            pending.append((names, pool.submit(_decode_chunk, [data for _, data in chunk], channels, size)))
            if len(pending) >= max_pending:
                yield from _results(*pending.popleft())
        while pending:
            yield from _results(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_one(data: bytes, channels: int, size: tuple[int, int]) -> Tensor | DecodeError:
    try:
        return decode_image(data, channels=channels, size=size)
    except DecodeError as err:
        return err


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which shuts the pool down
    torch.set_num_threads(1)


def _decode_chunk(datas: list[bytes], channels: int, size: tuple[int, int]) -> list[np.ndarray | DecodeError]:
    """In a worker: decode each image; pixels as numpy (pickled by value, not torch shared memory)."""
    out = [_decode_one(data, channels, size) for data in datas]
    return [x if isinstance(x, DecodeError) else x.numpy() for x in out]


def _results(names: list[str], future: Future) -> Iterator[tuple[str, Tensor | DecodeError]]:
    try:
        decoded = future.result()
    except BrokenProcessPool as err:
        raise ValueError(
            f"a decoding worker process died while decoding {len(names)} images from {names[0]!r} to {names[-1]!r} "
            "(killed by the system, e.g. for memory, or a crash in an image decoder)"
        ) from err
    for name, x in zip(names, decoded):
        yield name, x if isinstance(x, DecodeError) else torch.from_numpy(x)
