"""Decoding in worker processes gives what decoding in the main process gives, in order (covguard.decode_pool)."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from covguard.decode import DecodeError
from covguard.decode_pool import CHUNK_IMAGES, decode_stream
from covguard.imagefiles import UnreadableImage


def _png(seed, size):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_workers_decode_like_the_main_process_in_order():
    items = [(f"{k:03d}.png", _png(k, (10 + k % 3, 12))) for k in range(2 * CHUNK_IMAGES + 5)]
    items[3] = ("003.png", b"not an image")
    items[20] = ("020.png", UnreadableImage("image is too large"))
    assert pickle.loads(pickle.dumps(items[20][1])).reason == "image is too large"
    inline = list(decode_stream(iter(items), channels=1, size=(8, 8), workers=0))
    pooled = list(decode_stream(iter(items), channels=1, size=(8, 8), workers=1, prefetch=1))
    assert [name for name, _ in pooled] == [name for name, _ in items] == [name for name, _ in inline]
    for (_, a), (_, b) in zip(inline, pooled):
        if isinstance(a, DecodeError):
            assert type(b) is DecodeError and str(b) == str(a)
        else:
            assert b.shape == (1, 8, 8) and torch.equal(a, b)
    assert str(pooled[20][1]) == "image is too large" and "cannot decode image" in str(pooled[3][1])


def test_bad_workers_and_prefetch_are_refused():
    with pytest.raises(ValueError, match="workers must be an integer >= 0; got -1"):
        next(decode_stream([], channels=1, size=(8, 8), workers=-1))
    with pytest.raises(ValueError, match="prefetch must be >= 1; got 0"):
        next(decode_stream([], channels=1, size=(8, 8), prefetch=0))
