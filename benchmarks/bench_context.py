"""Training-step cost against sequence length: causal attention against document masking.

One process, the `small` model (fp32), a constant number of tokens per step (8,192 = batch x
sequence), rows packed with documents of the given mean length (boundaries at random, as the
loader produces them). For each sequence length and mask, in one run side by side: forward +
backward tokens/s, the dense mask's size (the sdpa kernel's B x T x T booleans) and the process's
peak resident memory so far (rows run in order of length, so each row's peak is its own or less). Context parallelism
(`parallel.context`) is not implemented yet: this is its cp1 column.

    python benchmarks/bench_context.py [--lengths 256,1024,4096] [--doc-len 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from dist_llm.config import load_config
from dist_llm.model.llama import Llama, lm_loss

TOKENS_PER_STEP = 8192


def packed_documents(batch: int, seq: int, mean_len: int, generator) -> torch.Tensor:
    starts = torch.rand(batch, seq, generator=generator) < 1.0 / mean_len
    starts[:, 0] = False
    return starts.int().cumsum(dim=1)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model, ids, documents, reps: int) -> float:
    def step():
        lm_loss(model(ids, document_ids=documents), ids).backward()

    step()  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--doc-len", type=int, default=512, help="mean document length in tokens")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    g = torch.Generator().manual_seed(0)
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, fp32")
    print(
        "| seq | batch | docs/row | causal tok/s | document tok/s | document / causal | mask MB | peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for seq in lengths:
        batch = max(1, TOKENS_PER_STEP // seq)
        overrides = [f"model.max_seq_len={seq}", "model.attention=document"]
        model = Llama(load_config("configs/model/small.yaml", overrides).model)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        documents = packed_documents(batch, seq, args.doc_len, g)
        causal = measure(model, ids, None, args.reps)  # no document ids: causal
        masked = measure(model, ids, documents, args.reps)
        per_row = (documents[:, -1] + 1).float().mean().item()
        print(
            f"| {seq} | {batch} | {per_row:.1f} | {batch * seq / causal:,.0f} | {batch * seq / masked:,.0f} "
            f"| {causal / masked:.2f}x | {batch * seq * seq / 1e6:.0f} | {peak_rss_gb():.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
