"""The dataset manifest: what `data shard` wrote and what the loader trusts.

A dataset location is a local folder, a URL prefix (`https://host/data/`), or a template with
`{shard}` standing for a file name, e.g. `pipe:aws s3 cp s3://bucket/data/{shard} -`.
`manifest.json` is found the same way as the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from webdataset.gopen import gopen

FORMAT = "dist-llm-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class DataError(RuntimeError):
    """Bad data met while loading; the message names the file and says what to do."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def resolve(location: str, name: str) -> str:
    if "{shard}" in location:
        return location.replace("{shard}", name)
    if location.startswith("pipe:") or "://" in location:
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def read_url(url: str) -> bytes:
    try:
        stream = gopen(url, "rb")
        try:
            return stream.read()
        finally:
            stream.close()
    except Exception as exc:  # gopen raises OSError, ValueError or a pipe's status error
        raise DataError(f"{url}: cannot read ({exc})") from None


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    sequences: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    """One split of one dataset, as its manifest describes it."""

    location: str
    split: str
    shards: tuple[Shard, ...]
    seq_len: int
    dtype: str
    vocab_size: int
    has_loss_mask: bool
    tokenizer_sha256: str
    fingerprint: str  # sha256 of the manifest: identifies the data in loader state

    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.shards)


def read_manifest(location: str) -> dict:
    url = resolve(location, MANIFEST)
    try:
        raw = read_url(url)
    except DataError as exc:
        raise DataError(f"{exc}; point the data path at a folder written by `dist-llm data shard`") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{url}: not valid JSON ({exc}); re-run `dist-llm data shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{url}: not a dist-llm manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{url}: manifest version {manifest.get('version')} is not {VERSION}; re-shard the data"
        )
    manifest["_fingerprint"] = hashlib.sha256(raw).hexdigest()
    return manifest


def open_split(location: str, split: str = "train") -> ShardSet:
    manifest = read_manifest(location)
    if split not in manifest["splits"]:
        raise DataError(
            f"{resolve(location, MANIFEST)}: no split {split!r} (has {sorted(manifest['splits'])})"
        )
    entries = manifest["splits"][split]["shards"]
    if not entries:
        raise DataError(f"{resolve(location, MANIFEST)}: split {split!r} has no shards")
    shards = tuple(
        Shard(
            name=e["name"],
            url=resolve(location, e["name"]),
            sequences=int(e["sequences"]),
            sha256=e["sha256"],
        )
        for e in entries
    )
    return ShardSet(
        location=location,
        split=split,
        shards=shards,
        seq_len=int(manifest["seq_len"]),
        dtype=manifest["dtype"],
        vocab_size=int(manifest["tokenizer"]["vocab_size"]),
        has_loss_mask=bool(manifest["has_loss_mask"]),
        tokenizer_sha256=manifest["tokenizer"]["sha256"],
        fingerprint=manifest["_fingerprint"],
    )
