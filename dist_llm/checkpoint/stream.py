"""Writing a safetensors file one tensor at a time, so that consolidating or exporting a model
needs memory for about one tensor, not for the whole model.

Hand-written because safetensors has no streaming writer: `save_file` takes every tensor at
once (and copies them all into one buffer before it writes). The format is small and fixed
(https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length; a
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}} with an optional
"__metadata__" of strings, padded with spaces to a multiple of 8 bytes; then the tensors' raw
little-endian bytes back to back in header order. Shapes and dtypes are known before any tensor
is read (`weight_specs`), so the header goes first and each tensor follows as it is read.

The layout is the one safetensors' own writer chooses (widest element first, then by name, so
every tensor is aligned to its element size): for the same tensors the file is the same bytes
as `save_file`'s (tested), and safetensors' `load_file`/`safe_open` read it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from dist_llm.errors import CheckpointError

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)

# safetensors' dtype names, in the order its writer lays tensors out (widest element first).
DTYPES = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_RANK = {dtype: i for i, dtype in enumerate(DTYPES)}


def order(specs: Specs) -> list[str]:
    """The names in the order their bytes lie in the file, which is the order to write them in."""
    for name, (_, dtype) in specs.items():
        if dtype not in DTYPES:
            raise CheckpointError(f"{name}: dtype {dtype} has no safetensors name")
    return sorted(specs, key=lambda name: (_RANK[specs[name][1]], name))


def header(specs: Specs, metadata: dict[str, str] | None = None) -> bytes:
    """The file's first bytes: the header's length, then the header, space-padded to 8 bytes."""
    entries: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order(specs):
        shape, dtype = specs[name]
        end = offset + math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: str | Path,
    specs: Specs,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `path` from `tensors`, which yields (name, tensor) in `order(specs)`, each of the
    shape and dtype `specs` gives it; each tensor is written and let go before the next is
    asked for. A tensor out of order, of another shape or dtype, or missing is an error (the
    header already promised it)."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this machine is not")
    names = order(specs)
    written = 0
    with open(path, "wb") as f:
        f.write(header(specs, metadata))
        for name, tensor in tensors:
            _check(path, name, tensor, names[written] if written < len(names) else None, specs)
            # Bytes straight from the tensor's memory: no second copy of it.
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            written += 1
            del tensor  # let it go before the next one is read
        if written != len(names):
            raise CheckpointError(f"{path}: {names[written]!r} was never written ({written} of {len(names)})")
        f.flush()
        os.fsync(f.fileno())


def _check(path, name: str, tensor: torch.Tensor, expected: str | None, specs: Specs) -> None:
    if expected is None:
        raise CheckpointError(f"{path}: got tensor {name!r} after the last one the header holds")
    if name != expected:
        raise CheckpointError(f"{path}: got tensor {name!r} where {expected!r} was due")
    shape, dtype = specs[name]
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise CheckpointError(
            f"{path}: {name!r} is {tuple(tensor.shape)} {tensor.dtype}, its metadata says {tuple(shape)} {dtype}"
        )
