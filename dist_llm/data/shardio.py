"""Read one shard into memory and check it against its manifest entry.

This is the loader's hot path, so the common case is parsed directly: our own writer emits
plain ustar headers and fixed-shape `.npy` members, which take a few microseconds each this
way instead of ~100 us through `tarfile` and `numpy.load`. Anything else (pax headers, other
member types) falls back to WebDataset's tarfile-based iterator, and every `.npy` header not
seen before goes through `numpy.lib.format.read_array(allow_pickle=False)`, so nothing is
ever unpickled either way.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from webdataset.tariterators import tar_file_iterator

from dist_llm.data.manifest import DataError, Shard, ShardSet, read_url
from dist_llm.files import sha256_bytes

log = logging.getLogger(__name__)
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


@dataclass
class ShardData:
    tokens: np.ndarray  # [n, seq_len + 1]
    starts: np.ndarray  # document start positions of all samples, concatenated
    offsets: np.ndarray  # [n + 1]: sample i's starts are starts[offsets[i]:offsets[i + 1]]
    loss_mask: np.ndarray | None  # [n, seq_len + 1] uint8
    valid: np.ndarray  # [n] bool; False = skipped under on_error="skip"


def load_shard(shard: Shard, spec: ShardSet, verify: bool = True, on_error: str = "raise") -> ShardData:
    """Read one whole shard; raise DataError naming it, or (on_error="skip") mark bad samples."""
    try:
        return _parse_shard(shard, spec, verify, on_error)
    except DataError as exc:
        if on_error == "raise":
            raise
        log.warning("skipping all %d samples of %s: %s", shard.sequences, shard.url, exc)
        n = shard.sequences
        return ShardData(
            tokens=np.zeros((n, spec.seq_len + 1), dtype=spec.dtype),
            starts=np.zeros(0, np.int32),
            offsets=np.zeros(n + 1, np.int64),
            loss_mask=None,
            valid=np.zeros(n, dtype=bool),
        )


def _parse_shard(shard: Shard, spec: ShardSet, verify: bool, on_error: str) -> ShardData:
    raw = read_url(shard.url)
    if verify and sha256_bytes(raw) != shard.sha256:
        raise DataError(
            f"{shard.url}: sha256 {sha256_bytes(raw)[:12]}... disagrees with the manifest "
            f"({shard.sha256[:12]}...): the shard is damaged or was replaced; copy it again or re-run "
            "`dist-llm data shard` (data.verify_sha256=false skips this check)"
        )
    samples = _samples(raw, shard.url, verified=verify)
    if len(samples) != shard.sequences:
        raise DataError(
            f"{shard.url}: holds {len(samples)} samples but the manifest says {shard.sequences}; "
            "the shard is truncated or does not belong to this manifest"
        )
    n, width = len(samples), spec.seq_len + 1
    tokens = np.zeros((n, width), dtype=spec.dtype)
    mask = np.ones((n, width), dtype=np.uint8) if spec.has_loss_mask else None
    valid = np.ones(n, dtype=bool)
    starts: list[np.ndarray] = []
    ids_header = _expected_header(spec)
    for i, (key, members) in enumerate(samples):
        try:
            tokens[i], sample_starts, sample_mask = _decode_sample(members, spec, ids_header)
        except DataError as exc:
            if on_error == "raise":
                raise DataError(f"{shard.url}: sample {key}: {exc}") from None
            valid[i], sample_starts, sample_mask = False, np.zeros(0, np.int32), None
        starts.append(sample_starts)
        if mask is not None and sample_mask is not None:
            mask[i] = sample_mask
    for i in np.flatnonzero(tokens.max(axis=1) >= spec.vocab_size):  # one vectorized check per shard
        message = (
            f"token id {int(tokens[i].max())} outside the vocabulary (size {spec.vocab_size}); "
            "the shard was made with another tokenizer: re-shard it"
        )
        if on_error == "raise":
            raise DataError(f"{shard.url}: sample {samples[i][0]}: {message}")
        valid[i] = False
    if not valid.all():
        log.warning("skipped %d bad samples of %s (data.on_error=skip)", int((~valid).sum()), shard.url)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(s) for s in starts], out=offsets[1:])
    flat = np.concatenate(starts).astype(np.int32) if starts else np.zeros(0, np.int32)
    return ShardData(tokens, flat, offsets, mask, valid)


def _expected_header(spec: ShardSet) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(spec.seq_len + 1, dtype=spec.dtype), allow_pickle=False)
    return _npy_header(buf.getvalue())


def _decode_sample(
    members: dict, spec: ShardSet, ids_header: bytes
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ids = members.get("input_ids.npy")
    expected = len(ids_header) + (spec.seq_len + 1) * np.dtype(spec.dtype).itemsize
    if ids is not None and len(ids) == expected and ids[: len(ids_header)] == ids_header:
        # Fast path: exactly the header our writer makes (dtype and length match the manifest).
        ids = np.frombuffer(ids, dtype=spec.dtype, offset=len(ids_header))
    else:
        ids = _array(members, "input_ids.npy")
    if ids.shape != (spec.seq_len + 1,):
        raise DataError(
            f"sequence of shape {ids.shape}, expected ({spec.seq_len + 1},) for seq_len {spec.seq_len}; "
            "the shard was written with another --seq-len than its manifest says"
        )
    if ids.dtype != np.dtype(spec.dtype):
        raise DataError(f"token dtype {ids.dtype}, manifest says {spec.dtype}")
    mask = _array(members, "loss_mask.npy") if spec.has_loss_mask else None
    if mask is not None and mask.shape != ids.shape:
        raise DataError(f"loss mask of shape {mask.shape} does not match the tokens {ids.shape}")
    return ids, _array(members, "doc_starts.npy"), mask


# ---------------------------------------------------------------- tar


def _samples(raw: bytes, url: str, verified: bool) -> list[tuple[str, dict]]:
    """[(key, {field: bytes})] in archive order, grouped WebDataset-style by the key before the first dot."""
    try:
        members = list(_ustar_members(raw, url, checksums=not verified))
    except _Unsupported:
        try:
            members = [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(raw))]
        except Exception as exc:  # tarfile raises ReadError, EOFError, ValueError... on damage
            raise DataError(f"{url}: truncated or corrupt tar ({exc}); copy the shard again") from None
    samples: list[tuple[str, dict]] = []
    for name, data in members:
        key, _, field = name.partition(".")
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][field] = data
    return samples


class _Unsupported(Exception):
    """A tar feature the fast path does not handle; tarfile takes over."""


def _ustar_members(raw: bytes, url: str, checksums: bool) -> Iterator[tuple[str, memoryview]]:
    """Regular files of a plain ustar archive. Header checksums are skipped when the caller has
    already verified the whole shard's sha256 (they cost as much as the rest of the parse)."""
    view, pos, end = memoryview(raw), 0, len(raw)
    while pos + _BLOCK <= end:
        if raw[pos] == 0 and raw[pos : pos + _BLOCK] == _ZERO_BLOCK:
            return
        if raw[pos + 257 : pos + 262] != b"ustar" or raw[pos + 156] not in (48, 0) or raw[pos + 345] != 0:
            raise _Unsupported
        if checksums:
            header = raw[pos : pos + _BLOCK]
            if _octal(header[148:156], url) != sum(header[:148]) + 256 + sum(header[156:]):
                raise DataError(f"{url}: corrupt tar header at byte {pos}; copy the shard again")
        size = _octal(raw[pos + 124 : pos + 136], url)
        start = pos + _BLOCK
        if start + size > end:
            break
        try:
            name = raw[pos : pos + 100].rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{url}: member name at byte {pos} is not UTF-8; copy the shard again") from None
        yield name, view[start : start + size]
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    raise DataError(
        f"{url}: truncated tar (ends inside a member or without an end marker); copy the shard again"
    )


def _octal(field: bytes, url: str) -> int:
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise DataError(f"{url}: corrupt tar header field {field!r}; copy the shard again") from None


# ---------------------------------------------------------------- npy

_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def _array(members: dict, name: str) -> np.ndarray:
    if name not in members:
        raise DataError(f"member {name} missing (has {sorted(members)})")
    data = members[name]
    header = _npy_header(data)
    known = _NPY_HEADERS.get(header) if header else None
    if known is not None:
        dtype, shape = known
        if len(data) - len(header) != math.prod(shape) * dtype.itemsize:
            raise DataError(
                f"{name} holds {len(data) - len(header)} data bytes, its header promises {shape} {dtype}"
            )
        return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=len(header)).reshape(shape)
    try:
        array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{name} is not a plain .npy array ({exc})") from None
    if header and not array.dtype.hasobject and array.flags.c_contiguous and len(_NPY_HEADERS) < 4096:
        _NPY_HEADERS[header] = (array.dtype, array.shape)
    return array


def _npy_header(data) -> bytes:
    """The magic, version and header dict of a version 1 .npy member (b"" for anything else)."""
    if len(data) < 10 or bytes(data[:8]) != b"\x93NUMPY\x01\x00":
        return b""
    return bytes(data[: 10 + int.from_bytes(data[8:10], "little")])
