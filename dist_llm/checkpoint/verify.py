"""`dist-llm checkpoint verify`: every problem with a checkpoint's files in one pass, each naming
the file. What dist_llm.json lists must be there at its size; the shards must match the sha256
that shards.json records for each and cover every tensor whole. A weights-only checkpoint, or
one from before sharding, has no hashes: its files are checked by size."""

from __future__ import annotations

from pathlib import Path

from dist_llm.checkpoint import sharded
from dist_llm.checkpoint.format import META, SHARDS, WEIGHTS, is_sharded, read_meta
from dist_llm.errors import CheckpointError


def verify_checkpoint(path: str | Path) -> str:
    """A one-line summary with the counts when every check passes; else a CheckpointError
    that lists every problem (an unreadable dist_llm.json is the only one then)."""
    path = Path(path)
    meta = read_meta(path, verify=False)
    listed = meta.get("files") or {WEIGHTS: None}  # checkpoints from before the list: the weights
    problems = [p for name, size in listed.items() if (p := _file_problem(path / name, size))]
    index = path / SHARDS / sharded.INDEX
    if is_sharded(path) and not any(p.startswith(f"{index}:") for p in problems):
        # A shard named above as missing or truncated is not named again.
        problems += [p for p in sharded.verify(path / SHARDS) if not any(_same_file(p, q) for q in problems)]
    if problems:
        raise CheckpointError(f"{_count(problems, 'problem')} in {path}:\n  " + "\n  ".join(problems))
    return _summary(path, meta, listed)


def _file_problem(file: Path, size: int | None) -> str | None:
    if not file.is_file():
        return f"{file}: missing (listed in {META})"
    if size is not None and file.stat().st_size != size:
        return f"{file}: {file.stat().st_size} bytes, {META} says {size} (truncated or changed)"
    return None


def _same_file(a: str, b: str) -> bool:
    """Two problems that name the same file (each starts with "<file>: ")."""
    return a.split(": ", 1)[0] == b.split(": ", 1)[0]


def _summary(path: Path, meta: dict, listed: dict) -> str:
    total = sum(size or 0 for size in listed.values())
    line = (
        f"OK {path}: step {meta.get('step')}, {_count(listed, 'file')} ({total / 1e6:,.1f} MB) at their sizes"
    )
    if not is_sharded(path):
        kind = "weights-only" if meta.get("resumable") is False else "from before sharding"
        return f"{line}; {kind}, no shards to hash"
    index = sharded.read_index(path / SHARDS)
    files, tensors = _count(index["files"], "shard file"), _count(index["tensors"], "tensor")
    return f"{line}; sha256 of {files} as recorded, {tensors} whole"


def _count(things, noun: str) -> str:
    return f"{len(things)} {noun}{'' if len(things) == 1 else 's'}"
