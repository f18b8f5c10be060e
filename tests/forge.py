"""Hand-edited covguard files: change metadata or tensors and recompute the checksum, as an attacker
(or a careless script) would, so that the schema checks behind the checksum are what is tested."""

import json
import struct
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save as save_bytes

from covguard.guardfile import checksum, dumps


def contents(path):
    """(metadata, tensors) of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def pack(header, data):
    text = dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def forge(src, dst, *, meta=None, tensors=None, drop=(), edit=None, checksummed=True):
    """Copy ``src`` to ``dst`` with ``meta`` / ``tensors`` updated, keys in ``drop`` removed, the JSON
    metadata value ``edit = (key, function)`` changed, and (``checksummed``) a valid checksum."""
    m, t = contents(src)
    m.update(meta or {})
    t.update(tensors or {})
    for key in drop:
        m.pop(key, None)
        t.pop(key, None)
    if edit is not None:
        key, change = edit
        value = json.loads(m[key])
        change(value)
        m[key] = json.dumps(value)
    raw = save_bytes(t, metadata=m)
    (size,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    header["__metadata__"].pop("checksum", None)
    if checksummed:
        header["__metadata__"]["checksum"] = checksum(header, data)
    Path(dst).write_bytes(pack(header, data))
    return Path(dst)
