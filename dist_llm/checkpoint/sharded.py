"""Sharded tensors on disk: every rank writes the pieces of full tensors it owns, and any rank
reads back any rectangle of any tensor, whatever pieces were written.

Built on torch.distributed.checkpoint (DCP): its planners agree on who writes what (a piece
two ranks hold, a replicated norm weight, is written once), its file writer writes each rank's
file in parallel, and its resharding computes which stored pieces overlap a wanted rectangle
and reads only those. Two things are ours:

- Pieces are rectangles in the coordinates of the *full* tensor, as many per rank as it needs
  (a ZeRO partition is a flat range of a tensor-parallel slice: up to three rectangles of
  it). DCP's own state dicts want DTensors or ShardedTensors for that; `_SavePlanner` and
  `_LoadPlanner` take the pieces as they are.
- The metadata is JSON (`shards.json`, with the size and sha256 of every file), not DCP's
  pickled `.metadata`: reading a checkpoint unpickles nothing. The tensor files hold one
  `torch.save`d tensor per piece, which DCP reads back with `torch.load(weights_only=True)`.

```
shards/
  shards.json        {"tensors": {name: {"shape", "dtype", "pieces": [[offsets, sizes, file, offset, length]]}},
                      "files": {file: {"size", "sha256"}}}
  __0_0.distcp ...   rank 0's pieces, rank 1's in __1_0.distcp, ...
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

from dist_llm.errors import CheckpointError

INDEX = "shards.json"


@dataclass
class Piece:
    """A rectangle of a full tensor: where it starts, and its values (shape = its sizes)."""

    offsets: tuple[int, ...]
    tensor: torch.Tensor


@dataclass
class Sharded:
    """The pieces of one full tensor that this rank writes (or wants to read)."""

    shape: tuple[int, ...]
    pieces: list[Piece]


# name -> the pieces of that full tensor this rank holds
Shards = dict[str, Sharded]


# ---------------------------------------------------------------- planners


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner (dedup of pieces several ranks hold, global metadata, its validation that
    pieces do not overlap), fed with our pieces instead of a state dict of DTensors."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.shards: Shards = state_dict
        self.is_coordinator = is_coordinator
        self.data = {
            (name, tuple(piece.offsets)): piece.tensor
            for name, sharded in self.shards.items()
            for piece in sharded.pieces
        }

    def create_local_plan(self) -> SavePlan:
        items = []
        for name, sharded in self.shards.items():
            for piece in sharded.pieces:
                offsets = torch.Size(piece.offsets)
                items.append(
                    WriteItem(
                        index=MetadataIndex(name, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=offsets, sizes=piece.tensor.shape),
                            properties=TensorProperties(dtype=piece.tensor.dtype),
                            size=torch.Size(sharded.shape),
                        ),
                    )
                )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.data[(write_item.index.fqn, tuple(write_item.index.offset))]


class _LoadPlanner(LoadPlanner):
    """Reads the rectangles asked for, each straight into its destination tensor."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.wanted: Shards = state_dict
        self.metadata = metadata
        self.dest = {
            (name, tuple(piece.offsets)): piece.tensor
            for name, sharded in self.wanted.items()
            for piece in sharded.pieces
        }

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        items: list[ReadItem] = []
        for name, sharded in self.wanted.items():  # names and shapes checked in `load`
            chunks = [ChunkStorageMetadata(torch.Size(p.offsets), p.tensor.shape) for p in sharded.pieces]
            items += create_read_items_for_chunk_list(name, stored[name], chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise CheckpointError(f"unexpected non-tensor entry {read_item.dest_index.fqn!r} in the shards")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the copy landed in place


# ---------------------------------------------------------------- storage: JSON metadata, hashed files


class _Writer(FileSystemWriter):
    """DCP's parallel file writer (one file per rank, fsync'd); the metadata goes to
    shards.json with each file's size and sha256, hashed by the rank that wrote it."""

    def __init__(self, path: Path):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, overwrite=True)

    def write_data(self, plan, planner) -> Future:
        results = super().write_data(plan, planner).wait()
        hashes = {
            name: _sha256(Path(self.path) / name) for name in {r.storage_data.relative_path for r in results}
        }
        done: Future = Future()
        done.set_result(
            [
                dataclasses.replace(r, storage_data=(r.storage_data, hashes[r.storage_data.relative_path]))
                for r in results
            ]
        )
        return done

    def finish(self, metadata: Metadata, results) -> None:
        tensors: dict[str, dict] = {}
        for name, md in metadata.state_dict_metadata.items():
            tensors[name] = {
                "shape": list(md.size),
                "dtype": str(md.properties.dtype).removeprefix("torch."),
                "pieces": [],
            }
        files = {}
        chunks = {
            (name, tuple(c.offsets)): c
            for name, md in metadata.state_dict_metadata.items()
            for c in md.chunks
        }
        for result in (r for rank in results for r in rank):
            info, sha = result.storage_data
            chunk = chunks[(result.index.fqn, tuple(result.index.offset))]
            tensors[result.index.fqn]["pieces"].append(
                [list(chunk.offsets), list(chunk.sizes), info.relative_path, info.offset, info.length]
            )
            files[info.relative_path] = {"size": None, "sha256": sha}
        for name in files:
            files[name]["size"] = (Path(self.path) / name).stat().st_size
        tmp = Path(self.path) / f"{INDEX}.tmp"
        with open(tmp, "w") as f:
            json.dump({"tensors": tensors, "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(self.path) / INDEX)


class _Reader(FileSystemReader):
    """Reads shards.json instead of DCP's pickled metadata, once (a reader kept for many loads,
    `read_each`, does not parse it again per tensor), and checks each file it is about to read
    (only those: a rank reads a few of a large job's files)."""

    _metadata: Metadata | None = None

    def read_data(self, plan, planner) -> Future:
        files = read_index(Path(self.path))["files"]
        for name in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
            _check_file(Path(self.path), name, files.get(name))
        return super().read_data(plan, planner)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            self._metadata = self._parse_index()
        return self._metadata

    def _parse_index(self) -> Metadata:
        index = read_index(Path(self.path))
        state, storage = {}, {}
        for name, spec in index["tensors"].items():
            chunks = []
            for offsets, sizes, file, offset, length in spec["pieces"]:
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                storage[MetadataIndex(name, torch.Size(offsets))] = _StorageInfo(file, offset, length)
            state[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=getattr(torch, spec["dtype"])),
                size=torch.Size(spec["shape"]),
                chunks=chunks,
            )
        return Metadata(state_dict_metadata=state, storage_data=storage)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the API


def save(folder: Path, shards: Shards, process_group: dist.ProcessGroup | None = None) -> None:
    """Every rank writes its pieces into `folder` (a collective over `process_group`, the
    default group when None; one process alone when no group exists). Returns once
    shards.json, written last by the coordinator, names every file."""
    with _errors_named("writing", folder), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process": it is
        dcp.save(
            shards,
            storage_writer=_Writer(folder),
            planner=_SavePlanner(),
            process_group=process_group,
            no_dist=not dist.is_initialized(),
        )


def load(folder: Path, wanted: Shards) -> None:
    """Fill every wanted rectangle from `folder`, reading only the stored pieces that overlap
    it. Needs no other rank: each plans its own reads."""
    _check_wanted(folder, wanted)
    _load(_Reader(str(folder)), wanted, folder)


def _load(reader: _Reader, wanted: Shards, folder: Path) -> None:
    with _errors_named("reading", folder), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process": it is
        dcp.load(wanted, storage_reader=reader, planner=_LoadPlanner(), no_dist=True)


@functools.lru_cache(maxsize=4)
def _parsed(file: str, mtime_ns: int, size: int) -> dict:
    """shards.json parsed once per version of it: a pipeline stage's layers each read it."""
    return json.loads(Path(file).read_text())


@contextlib.contextmanager
def _errors_named(action: str, folder: Path):
    """DCP reports any rank's failure as a CheckpointException carrying every rank's traceback;
    say the first cause in one line instead (a full disk, a read-only folder, a bad piece)."""
    try:
        yield
    except CheckpointException as exc:
        ranks = sorted(exc.failures)
        cause = exc.failures[ranks[0]][0]
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise CheckpointError(
            f"{action} the shards in {folder} failed on rank {', '.join(map(str, ranks))}: "
            f"{type(cause).__name__}: {cause}"
        ) from None


def _check_wanted(folder: Path, wanted: Shards) -> None:
    shapes = specs(folder)
    for name, want in wanted.items():
        if name not in shapes:
            raise CheckpointError(f"{Path(folder) / INDEX} holds no tensor {name!r}")
        if tuple(shapes[name][0]) != tuple(want.shape):
            raise CheckpointError(
                f"the checkpoint's {name!r} has shape {tuple(shapes[name][0])}, this model's {tuple(want.shape)}"
            )


def read_index(folder: Path) -> dict:
    file = Path(folder) / INDEX
    try:
        stat = file.stat()
        return _parsed(str(file), stat.st_mtime_ns, stat.st_size)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the shards of this checkpoint are incomplete") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is damaged (not valid JSON: {exc})") from None


def specs(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (full shape, dtype)} of every tensor in the shards."""
    return {
        name: (tuple(spec["shape"]), getattr(torch, spec["dtype"]))
        for name, spec in read_index(folder)["tensors"].items()
    }


def read_full(folder: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Whole tensors, assembled from their pieces (one process, no group)."""
    shapes = specs(folder)
    wanted = {}
    for name in names:
        if name not in shapes:
            raise CheckpointError(f"{Path(folder) / INDEX} holds no tensor {name!r}")
        shape, dtype = shapes[name]
        wanted[name] = Sharded(shape, [Piece((0,) * len(shape), torch.empty(shape, dtype=dtype))])
    load(folder, wanted)
    return {name: sharded.pieces[0].tensor for name, sharded in wanted.items()}


def _check_file(folder: Path, name: str, info: dict | None) -> None:
    """A file shards.json names is there at its size (cheap: no hashing)."""
    file = folder / name
    if info is None:
        raise CheckpointError(f"{folder / INDEX} does not list {name}, which it says holds a piece")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (listed in {folder / INDEX}); the checkpoint is damaged")
    if file.stat().st_size != info["size"]:
        raise CheckpointError(
            f"{file} is truncated or changed: {file.stat().st_size} bytes, {INDEX} says {info['size']}; "
            "the checkpoint is damaged"
        )


def read_each(folder: Path, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) one at a time in the order of `names`, each assembled only when the
    caller asks for the next: a caller that lets each go first holds one tensor (streaming
    consolidation). The index is read once."""
    reader = _Reader(str(folder))
    shapes = specs(folder)
    for name in names:
        if name not in shapes:
            raise CheckpointError(f"{Path(folder) / INDEX} has no tensor {name!r}")
        shape, dtype = shapes[name]
        tensor = torch.empty(shape, dtype=dtype)
        _load(reader, {name: Sharded(shape, [Piece((0,) * len(shape), tensor)])}, folder)
        yield name, tensor
        del tensor  # before the next one is allocated


def verify(folder: Path) -> list[str]:
    """Every problem with the shards: a file missing, truncated, or with a sha256 that
    disagrees; a tensor its pieces do not cover whole. Each problem starts with the file."""
    try:
        index = read_index(folder)
    except CheckpointError as exc:
        return [str(exc)]
    return _file_problems(folder, index["files"]) + _coverage_problems(folder, index)


def _coverage_problems(folder: Path, index: dict) -> list[str]:
    # DCP checked at the save that no two pieces overlap: covered whole = as many elements.
    problems = []
    for name, spec in sorted(index["tensors"].items()):
        held = sum(math.prod(sizes) for _, sizes, *_ in spec["pieces"])
        if held != math.prod(spec["shape"]):
            problems.append(
                f"{Path(folder) / INDEX}: its pieces of {name!r} hold {held} of its "
                f"{math.prod(spec['shape'])} elements"
            )
        for file in sorted({piece[2] for piece in spec["pieces"]} - set(index["files"])):
            problems.append(
                f"{Path(folder) / INDEX}: a piece of {name!r} is in {file}, which it does not list"
            )
    return problems


def _file_problems(folder: Path, files: dict) -> list[str]:
    problems = []
    for name, info in sorted(files.items()):
        file = Path(folder) / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != info["size"]:
            problems.append(
                f"{file}: {file.stat().st_size} bytes, {INDEX} says {info['size']} (truncated or changed)"
            )
        elif _sha256(file) != info["sha256"]:
            problems.append(f"{file}: sha256 differs from {INDEX} (the file is damaged)")
    return problems
