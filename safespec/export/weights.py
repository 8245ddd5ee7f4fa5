"""A safetensors file's weights digest without torch: the same ``sha256:`` that ``safespec.model.tensor_digest``
gives the file's tensors (names, dtypes, shapes and bytes, in sorted name order), read from the file's
header and its little-endian, row-major data. The export checks with it that the model file it uploads holds
exactly the weights result.json certified."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..errors import RunError

#: safetensors' dtype names -> str(torch.dtype), which tensor_digest hashes
_DTYPES = {
    "F64": "torch.float64",
    "F32": "torch.float32",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
    "I64": "torch.int64",
    "I32": "torch.int32",
    "I16": "torch.int16",
    "I8": "torch.int8",
    "U64": "torch.uint64",
    "U32": "torch.uint32",
    "U16": "torch.uint16",
    "U8": "torch.uint8",
    "BOOL": "torch.bool",
}
_MAX_HEADER = 100_000_000  # what the safetensors format itself allows
_CHUNK = 1 << 22


def safetensors_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the weights in a safetensors file; a file that is not one is a :class:`RunError`."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise RunError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise RunError(f"{path}: not a safetensors file (its header length is {n} bytes)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise RunError(f"{path}: not a safetensors file (its header is not JSON)") from None
            if not isinstance(header, dict):
                raise RunError(f"{path}: not a safetensors file (its header is not an object)")
            h = hashlib.sha256()
            base = 8 + n
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                try:
                    dtype, shape, (start, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise RunError(f"{path}: tensor {name!r}: an entry this reader does not know") from None
                if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= size - base):
                    raise RunError(f"{path}: tensor {name!r}: its data lie outside the file")
                h.update(
                    name.encode("utf-8") + b"\0" + dtype.encode() + b"\0" + json.dumps(list(shape)).encode() + b"\0"
                )
                f.seek(base + start)
                left = end - start
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    if not chunk:
                        raise RunError(f"{path}: tensor {name!r}: the file ends inside its data")
                    h.update(chunk)
                    left -= len(chunk)
    except OSError as e:
        raise RunError(f"{path}: cannot read the model file: {e.strerror or e}") from None
    return "sha256:" + h.hexdigest()
