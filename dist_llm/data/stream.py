"""Streaming loader over WebDataset shards, with exact and cheap resume.

How the order is defined (all of it a pure function of the seed and the manifests):

* Epoch order of one dataset: shards permuted by `(seed, epoch)`, then the samples of each
  window of `shuffle_shards` consecutive shards permuted together by `(seed, epoch, window)`
  (a shuffle buffer of whole shards, exact rather than approximate). Epochs follow each other
  into one endless stream of positions 0, 1, 2, ...
* Readers: every data-parallel rank runs `max(1, num_workers)` readers; R = dp_size * that in
  all. The stream is cut into chunks of C positions (by default one shuffle window) and chunk j
  belongs to reader j % R, so every position of every epoch belongs to exactly one reader: each
  sequence is seen exactly once per epoch across all ranks and workers, and a reader loads only
  the shards of its own windows (about 1/R of the data).
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

import io
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from dist_llm.data.manifest import DataError, Shard, ShardSet, read_url
from dist_llm.files import sha256_bytes

log = logging.getLogger(__name__)
STATE_VERSION = 1
MIX_BLOCK = 4096
IGNORE_INDEX = -100


# ---------------------------------------------------------------- one shard in memory


@dataclass
class ShardData:
    tokens: np.ndarray  # [n, seq_len + 1]
    doc_starts: list[np.ndarray]
    loss_mask: np.ndarray | None  # [n, seq_len + 1] uint8
    valid: np.ndarray  # [n] bool; False = skipped under on_error="skip"


def load_shard(shard: Shard, spec: ShardSet, verify: bool = True, on_error: str = "raise") -> ShardData:
    """Read one whole shard, checking it against the manifest; never unpickles anything."""
    try:
        return _parse_shard(shard, spec, verify, on_error)
    except DataError as exc:
        if on_error == "raise":
            raise
        log.warning("skipping all %d samples of %s: %s", shard.sequences, shard.url, exc)
        width = spec.seq_len + 1
        return ShardData(
            tokens=np.zeros((shard.sequences, width), dtype=spec.dtype),
            doc_starts=[np.zeros(1, np.int32)] * shard.sequences,
            loss_mask=None,
            valid=np.zeros(shard.sequences, dtype=bool),
        )


def _parse_shard(shard: Shard, spec: ShardSet, verify: bool, on_error: str) -> ShardData:
    raw = read_url(shard.url)
    if verify and sha256_bytes(raw) != shard.sha256:
        raise DataError(
            f"{shard.url}: sha256 {sha256_bytes(raw)[:12]}... disagrees with the manifest "
            f"({shard.sha256[:12]}...): the shard is damaged or was replaced; copy it again or re-run "
            "`dist-llm data shard` (data.verify_sha256=false skips this check)"
        )
    try:
        members = ({**m, "__url__": shard.url} for m in tar_file_iterator(io.BytesIO(raw)))
        samples = list(group_by_keys(members))
    except Exception as exc:  # tarfile raises ReadError, EOFError, ValueError... on damage
        raise DataError(f"{shard.url}: truncated or corrupt tar ({exc}); copy the shard again") from None
    if len(samples) != shard.sequences:
        raise DataError(
            f"{shard.url}: holds {len(samples)} samples but the manifest says {shard.sequences}; "
            "the shard is truncated or does not belong to this manifest"
        )
    width = spec.seq_len + 1
    tokens = np.zeros((len(samples), width), dtype=spec.dtype)
    mask = np.ones((len(samples), width), dtype=np.uint8) if spec.has_loss_mask else None
    valid = np.ones(len(samples), dtype=bool)
    starts: list[np.ndarray] = []
    bad = 0
    for i, sample in enumerate(samples):
        try:
            tokens[i], doc_starts, sample_mask = _decode_sample(sample, spec)
        except DataError as exc:
            if on_error == "raise":
                raise DataError(f"{shard.url}: sample {sample.get('__key__')}: {exc}") from None
            valid[i], doc_starts, sample_mask = False, np.zeros(1, np.int32), None
            bad += 1
        starts.append(doc_starts)
        if mask is not None and sample_mask is not None:
            mask[i] = sample_mask
    if bad:
        log.warning("skipped %d bad samples of %s (data.on_error=skip)", bad, shard.url)
    return ShardData(tokens, starts, mask, valid)


def _decode_sample(sample: dict, spec: ShardSet) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ids = _npy(sample, "input_ids.npy")
    if ids.shape != (spec.seq_len + 1,):
        raise DataError(
            f"sequence of shape {ids.shape}, expected ({spec.seq_len + 1},) for seq_len {spec.seq_len}; "
            "the shard was written with another --seq-len than its manifest says"
        )
    if ids.dtype != np.dtype(spec.dtype):
        raise DataError(f"token dtype {ids.dtype}, manifest says {spec.dtype}")
    top = int(ids.max())
    if top >= spec.vocab_size:
        raise DataError(
            f"token id {top} outside the vocabulary (size {spec.vocab_size}); "
            "the shard was made with another tokenizer: re-shard it"
        )
    mask = _npy(sample, "loss_mask.npy") if spec.has_loss_mask else None
    if mask is not None and mask.shape != ids.shape:
        raise DataError(f"loss mask of shape {mask.shape} does not match the tokens {ids.shape}")
    return ids, _npy(sample, "doc_starts.npy").astype(np.int32), mask


def _npy(sample: dict, name: str) -> np.ndarray:
    if name not in sample:
        raise DataError(f"member {name} missing (has {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        return np.lib.format.read_array(io.BytesIO(sample[name]), allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{name} is not a plain .npy array ({exc})") from None


# ---------------------------------------------------------------- order


class _EpochOrder:
    """Maps a position of the endless stream to (epoch, shard, sample within shard).

    Each epoch permutes the shards, cuts the permuted list into windows of `window` shards,
    and permutes all samples of a window together: a shuffle buffer of `window` whole shards.
    """

    def __init__(self, counts: Sequence[int], seed: int, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.window = seed, window
        self._epoch = -1
        self._windows: OrderedDict = OrderedDict()

    def locate(self, position: int) -> tuple[int, int, int]:
        epoch, offset = divmod(position, self.total)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            ends = np.cumsum(self.counts[self._perm])
            last = np.arange(len(ends))[self.window - 1 :: self.window]
            if len(ends) % self.window:
                last = np.append(last, len(ends) - 1)
            self._window_ends = ends[last]
            self._epoch = epoch
        w = int(np.searchsorted(self._window_ends, offset, side="right"))
        start = int(self._window_ends[w - 1]) if w else 0
        shards, bounds, order = self._window(epoch, w)
        j = int(order[offset - start])
        slot = int(np.searchsorted(bounds, j, side="right")) - 1
        return epoch, int(shards[slot]), j - int(bounds[slot])

    def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (epoch, w)
        if key not in self._windows:
            shards = self._perm[w * self.window : (w + 1) * self.window]
            bounds = np.concatenate([[0], np.cumsum(self.counts[shards])])
            order = np.random.default_rng([self.seed, epoch, w, 1]).permutation(int(bounds[-1]))
            self._windows[key] = (shards, bounds, order)
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        return self._windows[key]


class _Mixture:
    """Which source each of a reader's positions draws from: exact quotas per block, shuffled."""

    def __init__(self, weights: Sequence[float], seed: int, reader: int):
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        quota = np.floor(w * MIX_BLOCK).astype(np.int64)
        remainder = MIX_BLOCK - int(quota.sum())
        quota[np.argsort(-(w * MIX_BLOCK - quota), kind="stable")[:remainder]] += 1
        self.quota, self.seed, self.reader = quota, seed, reader
        self._cached = (-1, None)

    def block(self, index: int) -> np.ndarray:
        if self._cached[0] != index:
            slots = np.repeat(np.arange(len(self.quota)), self.quota)
            rng = np.random.default_rng([self.seed, self.reader, index, 2])
            self._cached = (index, rng.permutation(slots))
        return self._cached[1]

    def counts_before(self, position: int) -> np.ndarray:
        index, rest = divmod(position, MIX_BLOCK)
        return index * self.quota + np.bincount(self.block(index)[:rest], minlength=len(self.quota))


# ---------------------------------------------------------------- one reader


@dataclass(frozen=True)
class _Plan:
    """Everything a reader needs; picklable so that DataLoader workers receive it."""

    sources: tuple[ShardSet, ...]
    weights: tuple[float, ...]
    chunks: tuple[int, ...]
    window: int
    seed: int
    batch_size: int
    dp_rank: int
    readers_per_rank: int
    readers: int
    verify: bool
    on_error: str
    with_mask: bool


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

    def _global_position(self, source: int, k: int) -> int:
        chunk = self.plan.chunks[source]
        return ((k // chunk) * self.plan.readers + self.index) * chunk + k % chunk

    def _shard(self, source: int, shard: int) -> ShardData:
        key = (source, shard)
        if key not in self._shards:
            spec = self.plan.sources[source]
            self._shards[key] = load_shard(spec.shards[shard], spec, self.plan.verify, self.plan.on_error)
            while len(self._shards) > 2 * self.plan.window * len(self.plan.sources):
                self._shards.popitem(last=False)
        return self._shards[key]

    def batches(self, position: int, skipped: int) -> Iterator[dict]:
        counts = [int(c) for c in self.mixture.counts_before(position)]
        while True:
            rows = []
            while len(rows) < self.plan.batch_size:
                source = int(self.mixture.block(position // MIX_BLOCK)[position % MIX_BLOCK])
                k = counts[source]
                counts[source] += 1
                position += 1
                epoch, shard, index = self.orders[source].locate(self._global_position(source, k))
                data = self._shard(source, shard)
                if not data.valid[index]:
                    skipped += 1
                    continue
                rows.append((data, index, (source, epoch, shard, index)))
            batch = _collate(rows, self.plan.with_mask)
            batch.update(_reader=self.local, _position=position, _skipped=skipped)
            yield batch


def _collate(rows: list, with_mask: bool) -> dict:
    tokens = torch.from_numpy(np.stack([d.tokens[i] for d, i, _ in rows]).astype(np.int64))
    seq_len = tokens.shape[1] - 1
    labels = tokens[:, 1:].clone()
    batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": labels}
    if with_mask:
        mask = np.stack(
            [
                d.loss_mask[i] if d.loss_mask is not None else np.ones(seq_len + 1, np.uint8)
                for d, i, _ in rows
            ]
        )
        loss_mask = torch.from_numpy(mask[:, 1:].astype(bool))
        labels[~loss_mask] = IGNORE_INDEX
        batch["loss_mask"] = loss_mask
    positions = np.arange(seq_len)
    batch["document_ids"] = torch.from_numpy(
        np.stack(
            [
                np.searchsorted(d.doc_starts[i][d.doc_starts[i] > 0], positions, side="right")
                for d, i, _ in rows
            ]
        )
    ).to(torch.int32)
    batch["sample_ids"] = torch.tensor([meta for _, _, meta in rows], dtype=torch.int64)
    return batch


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
        chunk: int = 0,
        on_error: str = "raise",
        verify: bool = True,
    ):
        _check_sources(sources)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        readers_per_rank = max(1, num_workers)
        readers = dp_size * readers_per_rank
        specs = tuple(s for s, _ in sources)
        self.plan = _Plan(
            sources=specs,
            weights=tuple(float(w) for _, w in sources),
            chunks=tuple(chunk or _default_chunk(s, shuffle_shards, readers) for s in specs),
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
            "chunks": "keep data.chunk_sequences",
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
            "chunks": list(self.plan.chunks),
            "window": self.plan.window,
            "sources": [
                [s.fingerprint, w] for s, w in zip(self.plan.sources, self.plan.weights, strict=True)
            ],
        }


def _default_chunk(spec: ShardSet, window: int, readers: int) -> int:
    """One shuffle window per chunk, so that a reader loads only the shards it uses;
    smaller when the data is too small to give every reader a share of each epoch."""
    return max(1, min(window * max(s.sequences for s in spec.shards), spec.sequences // readers))


def _check_sources(sources: Sequence[tuple[ShardSet, float]]) -> None:
    if not sources:
        raise DataError("no data source given: set data.sources to at least one sharded dataset")
    first = sources[0][0]
    for spec, weight in sources:
        if weight <= 0:
            raise DataError(f"{spec.location}: mixing weight must be positive, got {weight}")
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
