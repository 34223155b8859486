"""`dist-llm data shard`: raw text -> cleaned, tokenized, packed WebDataset tar shards + manifest.

Each sample is one packed sequence of `seq_len + 1` tokens (inputs are tokens[:-1], targets
tokens[1:]; consecutive samples share one token, as in Megatron), stored as `.npy` members:
`input_ids.npy`, `doc_starts.npy` (positions where a document begins, for document-aware
attention) and, for fine-tuning data, `loss_mask.npy`. `.npy` is read with allow_pickle=False.

The output is a pure function of the inputs: documents are processed in sorted file order,
parallel workers return results in order, tar headers carry fixed times and owners, and the
train/validation split is decided by each document's content hash (so a document is never in
both splits and the split does not depend on order or worker count).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from dist_llm.data.chat import ChatEncoder, ChatError, read_chat_template, write_chat_template
from dist_llm.data.clean import clean_text
from dist_llm.data.documents import Document, InputError, ReadOptions, expand_inputs, read_documents
from dist_llm.data.manifest import FORMAT, MANIFEST, VERSION, shard_name
from dist_llm.data.tokenizer import TOKENIZER_FILE, TokenizerInfo, load_tokenizer, load_tokenizer_info
from dist_llm.files import (
    OutputKind,
    atomic_writer,
    check_output_dir,
    sha256_file,
    staged_output,
    write_json_atomic,
)

CHUNK_DOCS = 64
DATASET = OutputKind("a sharded dataset", f"a folder holding {MANIFEST}", lambda p: (p / MANIFEST).is_file())


@dataclass(frozen=True)
class ShardOptions:
    seq_len: int
    val_fraction: float = 0.01
    shard_tokens: int = 1 << 24
    workers: int = 1
    mask_pii: bool = False
    overwrite: bool = False
    read: ReadOptions = field(default_factory=ReadOptions)


def shard_corpus(
    inputs: Sequence[str], tokenizer_dir: str | Path, out_dir: str | Path, opts: ShardOptions
) -> dict:
    """Write shards and manifest.json to `out_dir`; return the manifest."""
    _check_options(opts)
    files = expand_inputs(inputs)
    info = load_tokenizer_info(tokenizer_dir)
    if opts.read.messages_field:
        ChatEncoder(info.path)  # a tokenizer with no template it can use fails here, not in a worker
    out = Path(out_dir)
    check_output_dir(out, DATASET, opts.overwrite)  # before anything is written
    with staged_output(out, DATASET, opts.overwrite) as staging:
        manifest = _write_dataset(files, info, staging, opts)
    return manifest


def _check_options(opts: ShardOptions) -> None:
    if opts.seq_len < 1:
        raise InputError(f"--seq-len must be positive, got {opts.seq_len}")
    if not 0 <= opts.val_fraction < 1:
        raise InputError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.read.messages_field and (opts.read.prompt_field or opts.read.response_field):
        raise InputError(
            "--messages-field and --prompt-field/--response-field are two fine-tuning formats; pass one"
        )
    if opts.shard_tokens < opts.seq_len:
        raise InputError(f"--shard-tokens {opts.shard_tokens} is smaller than one sequence ({opts.seq_len})")


def _write_dataset(files: list[Path], info: TokenizerInfo, out: Path, opts: ShardOptions) -> dict:
    dtype = np.uint16 if info.vocab_size <= 1 << 16 else np.uint32
    pairs = bool(opts.read.prompt_field and opts.read.response_field)
    with_mask = pairs or bool(opts.read.messages_field)
    per_shard = max(1, opts.shard_tokens // opts.seq_len)
    packers = {
        split: _Packer(opts.seq_len, dtype, with_mask, _ShardWriter(out, split, per_shard, with_mask))
        for split in ("train", "val")
    }
    counts: Counter = Counter()
    sources = [
        {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p), "documents": 0} for p in files
    ]
    seen: set[bytes] = set()
    docs = ((i, doc) for i, path in enumerate(files) for doc in read_documents(path, opts.read, counts))
    initargs = (str(info.path), opts.mask_pii, bool(opts.read.messages_field), opts.read.on_error)
    results = _ordered_map(_encode_chunk, _chunks(docs, CHUNK_DOCS), opts.workers, _init_worker, initargs)
    with _Progress(files) as progress:
        for chunk in results:
            for file_index, digest, ids, ids_mask, doc_counts in chunk:
                progress.at(file_index)
                counts.update(doc_counts)
                counts["documents_read"] += 1
                if digest == SKIPPED:  # counted by the worker
                    continue
                if digest is None:
                    counts["empty_documents_dropped"] += 1
                    continue
                if digest in seen:
                    counts["duplicate_documents_dropped"] += 1
                    continue
                seen.add(digest)
                sources[file_index]["documents"] += 1
                split = "val" if _in_val(digest, opts.val_fraction) else "train"
                tokens = np.append(ids, info.eot_id).astype(dtype)
                # A response's end-of-text is its end of turn (trained); a conversation's turns end
                # in the template's own token, so its end-of-text only separates it from the next.
                mask = np.append(ids_mask, int(pairs)).astype(np.uint8) if with_mask else None
                packers[split].add(tokens, mask)
    splits = {split: packer.finish() for split, packer in packers.items()}
    if splits["train"]["sequences"] == 0:
        raise InputError(
            f"no training sequence could be packed from {len(files)} file(s): "
            f"{splits['train']['document_tokens']} tokens for sequences of {opts.seq_len + 1}; "
            "add text or lower --seq-len"
        )
    if opts.val_fraction > 0 and splits["val"]["sequences"] == 0:
        raise InputError(
            f"validation split is empty ({splits['val']['documents']} documents, "
            f"{splits['val']['document_tokens']} tokens at --val-fraction {opts.val_fraction}); "
            "raise --val-fraction, split documents finer with --doc-split, or set --val-fraction 0"
        )
    for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
        if (info.path.parent / name).exists():
            shutil.copyfile(info.path.parent / name, out / name)
    template = read_chat_template(info.path.parent)
    if template is not None:  # into tokenizer_config.json, which training copies into checkpoints
        write_chat_template(out, template)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": opts.seq_len,
        "sample_tokens": opts.seq_len + 1,
        "dtype": np.dtype(dtype).name,
        "has_loss_mask": with_mask,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": info.sha256,
            "vocab_size": info.vocab_size,
            "eot_id": info.eot_id,
            "pad_id": info.pad_id,
        },
        "splits": splits,
        "sources": sources,
        "cleaning": {key: counts[key] for key in sorted(counts)},
        "options": {
            "val_fraction": opts.val_fraction,
            "shard_tokens": opts.shard_tokens,
            "mask_pii": opts.mask_pii,
            "read": asdict(opts.read),
        },
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _in_val(digest: bytes, fraction: float) -> bool:
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class _Progress:
    """A bar over input bytes, advanced as tokenized results (not reads) come back."""

    def __init__(self, files: list[Path]):
        self.sizes = [p.stat().st_size for p in files]
        self.bar = tqdm(total=sum(self.sizes), unit="B", unit_scale=True, desc="shard", mininterval=1.0)
        self.done = 0

    def at(self, file_index: int) -> None:
        if file_index > self.done:
            self.bar.update(sum(self.sizes[self.done : file_index]))
            self.done = file_index

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.at(len(self.sizes))
        else:  # the bar is cleared, so that the error line is the first thing on screen
            self.bar.leave = False
        self.bar.close()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- worker side

_worker: dict = {}
SKIPPED = b""  # the content hash of a conversation skipped (and counted) by --on-error skip


def _init_worker(tokenizer_path: str, mask_pii: bool, chat: bool, on_error: str) -> None:
    _worker["tokenizer"] = load_tokenizer(tokenizer_path)
    _worker["chat"] = ChatEncoder(tokenizer_path) if chat else None
    _worker["mask_pii"], _worker["on_error"] = mask_pii, on_error


def _encode_chunk(chunk: list[tuple[int, Document]]) -> list[tuple]:
    """Clean and tokenize documents: (file, content hash or None if empty, ids, mask of ids, counts)."""
    tokenizer, mask_pii = _worker["tokenizer"], _worker["mask_pii"]
    out = []
    for file_index, doc in chunk:
        counts: Counter = Counter()
        if doc.messages:
            out.append((file_index, *_encode_conversation(doc, counts), counts))
            continue
        text = clean_text(doc.text, mask_pii, counts)
        prompt = clean_text(doc.prompt, mask_pii, counts) if doc.prompt else ""
        if not text.strip():
            out.append((file_index, None, None, None, counts))
            continue
        digest = hashlib.blake2b(f"{len(prompt)}:{prompt}{text}".encode(), digest_size=16).digest()
        prompt_ids = tokenizer.encode(prompt).ids if prompt else []
        ids = np.asarray(prompt_ids + tokenizer.encode(text).ids, dtype=np.int64)
        mask = np.ones(len(ids), dtype=np.uint8)
        mask[: len(prompt_ids)] = 0
        out.append((file_index, digest, ids, mask, counts))
    return out


def _encode_conversation(doc: Document, counts: Counter) -> tuple:
    """(content hash, ids, mask) of a conversation, each message's content cleaned like text."""
    messages = tuple(
        (role, clean_text(content, _worker["mask_pii"], counts)) for role, content in doc.messages
    )
    try:
        ids, mask = _worker["chat"].encode_chat(messages)
    except ChatError as exc:
        if _worker["on_error"] == "raise":
            raise InputError(
                f"{doc.where}: {exc} (or pass --on-error skip to skip and count such records)"
            ) from None
        counts["conversations_not_maskable"] += 1
        return SKIPPED, None, None
    digest = hashlib.blake2b(json.dumps(messages).encode(), digest_size=16).digest()
    return digest, np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def _ordered_map(
    fn: Callable, items: Iterable, workers: int, initializer: Callable, initargs: tuple
) -> Iterator:
    """map() over a process pool, results in input order, at most a few chunks in flight."""
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one tokenizer thread per worker process
    with ProcessPoolExecutor(
        workers, get_context("fork"), initializer=initializer, initargs=initargs
    ) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------- packing and writing


class _Packer:
    """Concatenates documents and cuts them into samples of seq_len + 1 tokens."""

    def __init__(self, seq_len: int, dtype, with_mask: bool, writer: _ShardWriter):
        self.seq_len, self.writer = seq_len, writer
        self.ids = np.empty(0, dtype=dtype)
        self.mask = np.empty(0, dtype=np.uint8) if with_mask else None
        self.starts: list[int] = []
        self.documents = self.document_tokens = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        self.documents += 1
        self.document_tokens += len(tokens)
        self.starts.append(len(self.ids))
        self.ids = np.concatenate([self.ids, tokens])
        if self.mask is not None:
            self.mask = np.concatenate([self.mask, mask])
        span = self.seq_len + 1
        while len(self.ids) >= span:
            starts = np.asarray([s for s in self.starts if s < span], dtype=np.int32)
            self.writer.write(self.ids[:span], None if self.mask is None else self.mask[:span], starts)
            # The last token of this sample is the first of the next one.
            self.ids = self.ids[self.seq_len :]
            if self.mask is not None:
                self.mask = self.mask[self.seq_len :]
            self.starts = [s - self.seq_len for s in self.starts if s >= self.seq_len]

    def finish(self) -> dict:
        shards = self.writer.close()
        for shard in shards:
            shard["tokens"] = shard["sequences"] * self.seq_len
        sequences = sum(s["sequences"] for s in shards)
        leftover = len(self.ids) - (1 if sequences else 0)
        return {
            "documents": self.documents,
            "document_tokens": self.document_tokens,
            "sequences": sequences,
            "tokens": sequences * self.seq_len,
            "tail_tokens_dropped": max(leftover, 0),
            "shards": shards,
        }


class _ShardWriter:
    def __init__(self, out: Path, split: str, per_shard: int, with_mask: bool):
        self.out, self.split, self.per_shard, self.with_mask = out, split, per_shard, with_mask
        self.shards: list[dict] = []
        self.count = 0
        self._file_ctx = self._tar = None

    def write(self, ids: np.ndarray, mask: np.ndarray | None, starts: np.ndarray) -> None:
        if self._tar is None:
            self._open()
        key = f"{sum(s['sequences'] for s in self.shards) + self.count:010d}"
        sample = {"__key__": key, "input_ids.npy": _npy(ids), "doc_starts.npy": _npy(starts)}
        if mask is not None:
            sample["loss_mask.npy"] = _npy(mask)
        self._tar.write(sample)
        self.count += 1
        if self.count == self.per_shard:
            self._close_shard()

    def _open(self) -> None:
        self._file_ctx = atomic_writer(self.out / shard_name(self.split, len(self.shards)))
        fileobj = self._file_ctx.__enter__()
        # Fixed owner and time: identical inputs give byte-identical tars.
        self._tar = wds.TarWriter(fileobj, encoder=False, mtime=0, user="dist-llm", group="dist-llm")

    def _close_shard(self) -> None:
        self._tar.close()
        self._file_ctx.__exit__(None, None, None)
        path = self.out / shard_name(self.split, len(self.shards))
        self.shards.append(
            {
                "name": path.name,
                "sequences": self.count,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        self._tar = self._file_ctx = None
        self.count = 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
