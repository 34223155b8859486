"""Streaming loader over WebDataset shards, with exact and cheap resume.

How the order is defined (all of it a pure function of the seed and the manifests):

* Epoch order of one dataset: shards permuted by `(seed, epoch)`, then the samples of each
  window of `shuffle_shards` consecutive shards permuted together by `(seed, epoch, window)`
  (a shuffle buffer of whole shards, exact rather than approximate). Epochs follow each other
  into one endless stream of positions 0, 1, 2, ...
* Readers: every data-parallel rank runs `max(1, num_workers)` readers; R = dp_size * that in
  all. Each epoch's order is cut into R contiguous ranges of floor(T/R) or ceil(T/R) positions
  and reader q takes range q of every epoch, so every sequence is seen exactly once per epoch
  across all ranks and workers, all readers finish an epoch within one sample of each other,
  and a reader loads only the shards of the windows its range covers (about 1/R of the data).
* Mixing: a reader interleaves its share of several datasets by exact quotas per block of
  4,096 samples (weights rounded to 1/4,096), the slots shuffled by `(seed, reader, block)`.
* DataLoader workers each play one reader and yield whole batches; PyTorch hands batches out
  round-robin, so the rank's batch order is fixed.

A reader's progress is one integer (its position), so the resumable state is a handful of
integers per rank: on resume every reader jumps straight to its position (no replay), and the
first worker plays the reader whose batch was due next. Changing the number of ranks, workers
or the batch size changes the order itself, so such a resume is refused rather than silently
different.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_llm.data.manifest import DataError, ShardSet, open_split
from dist_llm.data.shardio import ShardData, load_shard

STATE_VERSION = 1
MIX_BLOCK = 4096
IGNORE_INDEX = -100


# ---------------------------------------------------------------- order


class _EpochOrder:
    """Maps positions of the endless stream to (epoch, shard, sample within shard).

    Each epoch permutes the shards, cuts the permuted list into windows of `window` shards,
    and permutes all samples of a window together: a shuffle buffer of `window` whole shards.
    """

    def __init__(self, counts: Sequence[int], seed: int, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.window = seed, window
        self._epochs: OrderedDict = OrderedDict()
        self._windows: OrderedDict = OrderedDict()

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epochs, offsets = np.divmod(positions, self.total)
        shards = np.empty_like(positions)
        index = np.empty_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            window_ends = self._epoch(int(epoch))[1]
            off = offsets[in_epoch]
            w = np.searchsorted(window_ends, off, side="right")
            first = np.where(w > 0, window_ends[np.maximum(w - 1, 0)], 0)
            s, i = np.empty_like(off), np.empty_like(off)
            for window in np.unique(w):
                in_window = w == window
                members, bounds, order = self._window(int(epoch), int(window))
                j = order[off[in_window] - first[in_window]]
                slot = np.searchsorted(bounds, j, side="right") - 1
                s[in_window], i[in_window] = members[slot], j - bounds[slot]
            shards[in_epoch], index[in_epoch] = s, i
        return epochs, shards, index

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            ends = np.cumsum(self.counts[perm])
            last = np.arange(len(ends))[self.window - 1 :: self.window]
            if len(ends) % self.window:
                last = np.append(last, len(ends) - 1)
            self._epochs[epoch] = (perm, ends[last])
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _window(self, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (epoch, window)
        if key not in self._windows:
            members = self._epoch(epoch)[0][window * self.window : (window + 1) * self.window]
            bounds = np.concatenate([[0], np.cumsum(self.counts[members])])
            order = np.random.default_rng([self.seed, epoch, window, 1]).permutation(int(bounds[-1]))
            self._windows[key] = (members, bounds, order)
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        return self._windows[key]


def mixing_quotas(weights: Sequence[float]) -> np.ndarray:
    """Samples per source in each block of MIX_BLOCK: weights rounded by largest remainder."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    quota = np.floor(w * MIX_BLOCK).astype(np.int64)
    remainder = MIX_BLOCK - int(quota.sum())
    quota[np.argsort(-(w * MIX_BLOCK - quota), kind="stable")[:remainder]] += 1
    return quota


class _Mixture:
    """Which source each of a reader's positions draws from: exact quotas per block, shuffled."""

    def __init__(self, weights: Sequence[float], seed: int, reader: int):
        self.quota, self.seed, self.reader = mixing_quotas(weights), seed, reader
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    def _block(self, index: int) -> np.ndarray:
        if self._cached[0] != index:
            slots = np.repeat(np.arange(len(self.quota)), self.quota)
            self._cached = (
                index,
                np.random.default_rng([self.seed, self.reader, index, 2]).permutation(slots),
            )
        return self._cached[1]

    def sources(self, position: int, n: int) -> np.ndarray:
        if len(self.quota) == 1:
            return np.zeros(n, dtype=np.int64)
        parts, end = [], position + n
        while position < end:
            index, rest = divmod(position, MIX_BLOCK)
            take = min(MIX_BLOCK - rest, end - position)
            parts.append(self._block(index)[rest : rest + take])
            position += take
        return np.concatenate(parts)

    def counts_before(self, position: int) -> np.ndarray:
        index, rest = divmod(position, MIX_BLOCK)
        if len(self.quota) == 1:
            return np.array([position], dtype=np.int64)
        return index * self.quota + np.bincount(self._block(index)[:rest], minlength=len(self.quota))


# ---------------------------------------------------------------- one reader


@dataclass(frozen=True)
class _Plan:
    """Everything a reader needs; picklable so that DataLoader workers receive it."""

    sources: tuple[ShardSet, ...]
    weights: tuple[float, ...]
    window: int
    seed: int
    batch_size: int
    dp_rank: int
    readers_per_rank: int
    readers: int
    verify: bool
    on_error: str
    with_mask: bool


@dataclass
class _Rows:
    """Samples gathered for (part of) a batch, in batch order."""

    tokens: np.ndarray
    starts: list[np.ndarray]
    mask: np.ndarray | None
    ids: np.ndarray  # [n, 4]: source, epoch, shard, index


class _Reader:
    def __init__(self, plan: _Plan, local: int):
        self.plan = plan
        self.local = local
        self.index = plan.dp_rank * plan.readers_per_rank + local
        self.orders = [
            _EpochOrder([s.sequences for s in src.shards], plan.seed + 7919 * i, plan.window)
            for i, src in enumerate(plan.sources)
        ]
        self.mixture = _Mixture(plan.weights, plan.seed, self.index)
        self._shards: OrderedDict = OrderedDict()

    def batches(self, position: int, skipped: int) -> Iterator[dict]:
        counts = self.mixture.counts_before(position)
        everything = sum(s.sequences for s in self.plan.sources)
        streak = 0  # positions skipped since the last good sample
        while True:
            parts, have = [], 0
            while have < self.plan.batch_size:
                need = self.plan.batch_size - have
                rows, bad = self._gather(self.mixture.sources(position, need), counts)
                position += need
                skipped += bad
                streak = streak + bad if len(rows.tokens) == 0 else 0
                if streak > everything:
                    raise DataError(
                        f"no readable sample in {streak} positions (more than a whole epoch of every source) "
                        f"with data.on_error=skip: check {[s.location for s in self.plan.sources]}"
                    )
                have += len(rows.tokens)
                parts.append(rows)
            batch = _collate(parts, self.plan.with_mask)
            batch.update(_reader=self.local, _position=position, _skipped=skipped)
            yield batch

    def _gather(self, sources: np.ndarray, counts: np.ndarray) -> tuple[_Rows, int]:
        n, width = len(sources), self.plan.sources[0].seq_len + 1
        tokens = np.empty((n, width), dtype=np.int64)
        mask = np.ones((n, width), dtype=np.uint8) if self.plan.with_mask else None
        ids = np.empty((n, 4), dtype=np.int64)
        valid = np.empty(n, dtype=bool)
        starts: list = [None] * n
        for source in np.unique(sources):
            slots = np.flatnonzero(sources == source)
            k = counts[source] + np.arange(len(slots))
            counts[source] += len(slots)
            epochs, shards, index = self.orders[source].locate(self._global_positions(int(source), k))
            ids[slots] = np.stack([np.full_like(k, source), epochs, shards, index], axis=1)
            for shard in np.unique(shards):
                here = shards == shard
                data, rows, at = self._shard(int(source), int(shard)), index[here], slots[here]
                tokens[at] = data.tokens[rows]
                valid[at] = data.valid[rows]
                if mask is not None and data.loss_mask is not None:
                    mask[at] = data.loss_mask[rows]
                for slot, row in zip(at.tolist(), rows.tolist(), strict=True):
                    starts[slot] = data.starts[data.offsets[row] : data.offsets[row + 1]]
        if valid.all():  # the usual case: no copy
            return _Rows(tokens, starts, mask, ids), 0
        keep = np.flatnonzero(valid)
        rows = _Rows(tokens[keep], [starts[i] for i in keep], None if mask is None else mask[keep], ids[keep])
        return rows, n - len(keep)

    def _global_positions(self, source: int, k: np.ndarray) -> np.ndarray:
        """Reader-local counts -> positions of the endless epoch stream (this reader's range)."""
        total = self.plan.sources[source].sequences
        start = self.index * total // self.plan.readers
        length = (self.index + 1) * total // self.plan.readers - start
        epochs, offsets = np.divmod(k, length)
        return epochs * total + start + offsets

    def _shard(self, source: int, shard: int) -> ShardData:
        key = (source, shard)
        if key not in self._shards:
            spec = self.plan.sources[source]
            self._shards[key] = load_shard(spec.shards[shard], spec, self.plan.verify, self.plan.on_error)
            while len(self._shards) > 2 * self.plan.window * len(self.plan.sources):
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(key)
        return self._shards[key]


def _collate(parts: list[_Rows], with_mask: bool) -> dict:
    tokens = torch.from_numpy(
        parts[0].tokens if len(parts) == 1 else np.concatenate([p.tokens for p in parts])
    )
    starts = [s for p in parts for s in p.starts]
    batch = {
        "input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "document_ids": document_ids(starts, tokens.shape[1] - 1),
        "sample_ids": torch.from_numpy(np.concatenate([p.ids for p in parts])),
    }
    if with_mask:
        loss_mask = torch.from_numpy(np.concatenate([p.mask for p in parts])[:, 1:].astype(bool))
        batch["labels"] = batch["labels"].masked_fill(~loss_mask, IGNORE_INDEX)
        batch["loss_mask"] = loss_mask
    return batch


def document_ids(starts: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """Document index [B, seq_len] of every input position of rows whose documents begin at
    `starts` (one array per row): the count of document starts at or before it."""
    flags = np.zeros((len(starts), seq_len), dtype=np.int32)
    rows = np.repeat(np.arange(len(starts)), [len(s) for s in starts])
    cols = np.concatenate(starts) if starts else np.zeros(0, np.int32)
    inside = (cols > 0) & (cols < seq_len)
    flags[rows[inside], cols[inside]] = 1
    return torch.from_numpy(flags).cumsum(dim=1, dtype=torch.int32)  # 4x numpy's cumsum


class _ReaderDataset(IterableDataset):
    def __init__(self, plan: _Plan, positions: list[int], skipped: list[int], first: int):
        self.plan, self.positions, self.skipped, self.first = plan, positions, skipped, first

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (self.first + worker) % self.plan.readers_per_rank
        return _Reader(self.plan, local).batches(self.positions[local], self.skipped[local])


# ---------------------------------------------------------------- the loader


class TokenLoader:
    """Batches of `input_ids`, `labels` (-100 where not trained on), `document_ids`,
    `sample_ids` (source, epoch, shard, index) and `loss_mask` when the data has one.

    Iterating continues from the current state; `state_dict()` after k batches describes
    exactly the (k+1)-th batch onwards.
    """

    def __init__(
        self,
        sources: Sequence[tuple[ShardSet, float]],
        *,
        batch_size: int,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        shuffle_shards: int = 4,
        on_error: str = "raise",
        verify: bool = True,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        readers_per_rank = max(1, num_workers)
        readers = dp_size * readers_per_rank
        _check_sources(sources, readers)
        specs = tuple(s for s, _ in sources)
        self.plan = _Plan(
            sources=specs,
            weights=tuple(float(w) for _, w in sources),
            window=shuffle_shards,
            seed=seed,
            batch_size=batch_size,
            dp_rank=dp_rank,
            readers_per_rank=readers_per_rank,
            readers=readers,
            verify=verify,
            on_error=on_error,
            with_mask=any(s.has_loss_mask for s in specs),
        )
        self.dp_size = dp_size
        self.num_workers = num_workers
        self.seq_len = specs[0].seq_len
        self._positions = [0] * readers_per_rank
        self._skipped = [0] * readers_per_rank
        self._next = 0

    @property
    def skipped(self) -> int:
        """Samples skipped so far on this rank under on_error="skip"."""
        return sum(self._skipped)

    def __iter__(self) -> Iterator[dict]:
        dataset = _ReaderDataset(self.plan, list(self._positions), list(self._skipped), self._next)
        if self.num_workers == 0:
            stream = iter(dataset)
        else:
            stream = iter(
                DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4)
            )
        for batch in stream:
            reader = int(batch.pop("_reader"))
            self._positions[reader] = int(batch.pop("_position"))
            self._skipped[reader] = int(batch.pop("_skipped"))
            self._next = (reader + 1) % self.plan.readers_per_rank
            yield batch

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "dp_rank": self.plan.dp_rank,
            "positions": list(self._positions),
            "skipped": list(self._skipped),
            "next_reader": self._next,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data-loader state version {state.get('version')} is not {STATE_VERSION}")
        saved, current = {k: state.get(k) for k in self._layout()}, self._layout()
        hints = {
            "dp_size": "run with the same number of data-parallel ranks",
            "readers_per_rank": "set data.num_workers as when the checkpoint was saved (0 and 1 are the same)",
            "batch_size": "keep train.micro_batch_size",
            "seed": "keep data.seed",
            "window": "keep data.shuffle_shards",
            "sources": "keep data.sources (paths, weights, and the data they point to)",
        }
        for key, value in current.items():
            if saved[key] != value:
                raise DataError(
                    f"cannot resume the data stream exactly: {key} was {saved[key]} when saved, now {value}; "
                    f"{hints[key]}, or start the data stream afresh"
                )
        if state.get("dp_rank") != self.plan.dp_rank:
            raise DataError(
                f"data-loader state of rank {state.get('dp_rank')} given to rank {self.plan.dp_rank}"
            )
        self._positions = [int(p) for p in state["positions"]]
        self._skipped = [int(s) for s in state["skipped"]]
        self._next = int(state["next_reader"])

    def _layout(self) -> dict:
        return {
            "dp_size": self.dp_size,
            "readers_per_rank": self.plan.readers_per_rank,
            "batch_size": self.plan.batch_size,
            "seed": self.plan.seed,
            "window": self.plan.window,
            "sources": [
                [s.fingerprint, w] for s, w in zip(self.plan.sources, self.plan.weights, strict=True)
            ],
        }


def _check_sources(sources: Sequence[tuple[ShardSet, float]], readers: int) -> None:
    if not sources:
        raise DataError("no data source given: set data.sources to at least one sharded dataset")
    first = sources[0][0]
    for spec, weight in sources:
        if not (weight > 0 and math.isfinite(weight)):
            raise DataError(f"{spec.location}: mixing weight must be a positive number, got {weight}")
        if spec.sequences < readers:
            raise DataError(
                f"{spec.location} holds {spec.sequences} sequences, fewer than the {readers} readers "
                "(data-parallel ranks x max(1, data.num_workers)); lower data.num_workers or add data"
            )
        if spec.seq_len != first.seq_len:
            raise DataError(
                f"{spec.location} has seq_len {spec.seq_len} but {first.location} has {first.seq_len}; "
                "shard all sources with the same --seq-len"
            )
        if spec.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(
                f"{spec.location} and {first.location} were tokenized with different tokenizers; "
                "re-shard them with one tokenizer"
            )
    quotas = mixing_quotas([w for _, w in sources])
    for (spec, weight), quota in zip(sources, quotas, strict=True):
        if quota == 0:
            raise DataError(
                f"{spec.location}: weight {weight} rounds to no sample in {MIX_BLOCK} "
                f"(weights are rounded to 1/{MIX_BLOCK} of their total); raise it or drop the source"
            )


def loader_from_config(data, batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> TokenLoader:
    """The training loader that `data:` in a config describes (a `DataConfig`)."""
    if not data.sources:
        raise DataError("data.sources is empty: add at least one `- path: <folder written by data shard>`")
    specs = [(open_split(src.path, "train"), src.weight) for src in data.sources]
    for spec, _ in specs:
        if spec.seq_len != data.seq_len:
            raise DataError(
                f"{spec.location} was sharded with --seq-len {spec.seq_len} but data.seq_len is {data.seq_len}; "
                "set data.seq_len to match or re-shard"
            )
    return TokenLoader(
        specs,
        batch_size=batch_size,
        seed=data.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=data.num_workers,
        shuffle_shards=data.shuffle_shards,
        on_error=data.on_error,
        verify=data.verify_sha256,
    )


def eval_batches(
    spec: ShardSet,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_batches: int = 0,
    verify: bool = True,
) -> Iterator[dict]:
    """Every sample of a split once, in manifest order, each rank a contiguous block.

    All ranks yield the same number of batches (short ones padded with rows whose labels are
    all -100), because a sharded model needs every rank in every forward pass. Batches hold
    `input_ids`, `labels` and `document_ids`, as the training batches do.
    """
    per_rank = -(-spec.sequences // dp_size)
    n_batches = -(-per_rank // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    first = dp_rank * per_rank
    wanted = range(first, min(first + min(per_rank, n_batches * batch_size), spec.sequences))
    rows = _rows_in_order(spec, wanted, verify)
    width = spec.seq_len + 1
    for _ in range(n_batches):
        tokens = np.zeros((batch_size, width), dtype=np.int64)
        keep = np.zeros((batch_size, width), dtype=bool)
        starts = [np.zeros(0, np.int32)] * batch_size
        for i in range(batch_size):
            row = next(rows, None)
            if row is not None:
                tokens[i], keep[i], starts[i] = row
        tokens_t = torch.from_numpy(tokens)
        labels = tokens_t[:, 1:].masked_fill(~torch.from_numpy(keep[:, 1:]), IGNORE_INDEX)
        yield {
            "input_ids": tokens_t[:, :-1],
            "labels": labels,
            "document_ids": document_ids(starts, spec.seq_len),
        }


def _rows_in_order(spec: ShardSet, wanted: range, verify: bool) -> Iterator[tuple[np.ndarray, ...]]:
    start = 0
    for shard in spec.shards:
        end = start + shard.sequences
        lo, hi = max(start, wanted.start), min(end, wanted.stop)
        if lo < hi:
            data = load_shard(shard, spec, verify)
            for i in range(lo - start, hi - start):
                mask = (
                    data.loss_mask[i].astype(bool)
                    if data.loss_mask is not None
                    else np.ones(spec.seq_len + 1, bool)
                )
                yield data.tokens[i], mask, data.starts[data.offsets[i] : data.offsets[i + 1]]
        start = end
