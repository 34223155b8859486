"""Training-step cost against sequence length: one process against context parallelism over two,
causal attention against document masking.

The `small` model (fp32), rows packed with documents of the given mean length (boundaries at
random, as the loader produces them). For each sequence length, in one run side by side:
forward + backward tokens/s and the peak resident memory per rank, for

- cp1: one process (all threads), batch = max(1, 8,192 tokens / seq);
- cp2: two processes under `torchrun` (gloo), each holding half of every row's positions and one
  thread, the attention running through `parallel/context.py`'s Ulysses all-to-alls, the same
  batch;

each with causal attention and with the document mask (on CPU the sdpa kernel's dense B x T x T
mask, kept as a boolean and an fp32 additive tensor shared by all layers: their size is in the
table). Rows run in order of length in one process per
column, so each row's peak memory is its own or an earlier, shorter row's: read the peak of the
longest rows, which grow. Both columns use the machine's two cores, so cp2's tokens/s is the
same hardware split differently: its point is the memory per rank at long sequences.

    python benchmarks/bench_context.py [--lengths 1024,4096,16384] [--doc-len 512] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
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


def measure(model, ids, documents, reps: int, cp) -> float:
    from dist_llm.parallel.context import context_chunk, model_inputs

    batch = context_chunk({"input_ids": ids, "labels": ids, "document_ids": documents}, cp)
    if documents is None:
        batch.pop("document_ids")
    inputs = model_inputs(batch)

    def step():
        lm_loss(model(batch["input_ids"], **inputs), batch["labels"]).backward()

    step()  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps


def run_column(lengths: list[int], doc_len: int, reps: int) -> list[dict]:
    """This process's rows of one column (cp from the launcher's environment)."""
    from dist_llm.parallel.context import ContextParallel, apply_context_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = ContextParallel()
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        cp = ContextParallel(rank=dist.get_rank(), size=world)
    rows = []
    for seq in lengths:
        g = torch.Generator().manual_seed(seq)  # every rank draws the same rows
        batch = max(1, TOKENS_PER_STEP // seq)
        overrides = [f"model.max_seq_len={seq}", "model.attention=document"]
        model = apply_context_parallel(Llama(load_config("configs/model/small.yaml", overrides).model), cp)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        documents = packed_documents(batch, seq, doc_len, g)
        causal = measure(model, ids, None, reps, cp)  # no document ids: causal
        masked = measure(model, ids, documents, reps, cp)
        rows.append(
            {
                "seq": seq,
                "batch": batch,
                "docs": (documents[:, -1] + 1).float().mean().item(),
                "causal": batch * seq / causal,
                "document": batch * seq / masked,
                "peak_gb": peak_rss_gb(),
            }
        )
        del model
    return rows


def cp2_rows(args) -> list[dict]:
    """The cp2 column: this script again under torchrun, one thread per rank; the peak is the
    larger of the two ranks'."""
    with open(os.devnull, "w") as quiet:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node=2",
                "--master-port=29517",
                __file__,
                "--worker",
                "--lengths",
                args.lengths,
                "--doc-len",
                str(args.doc_len),
                "--reps",
                str(args.reps),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=True,
            stdout=subprocess.PIPE,
            stderr=quiet,
            text=True,
        ).stdout
    ranks = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    return [{**row, "peak_gb": max(r[i]["peak_gb"] for r in ranks)} for i, row in enumerate(ranks[0])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--doc-len", type=int, default=512, help="mean document length in tokens")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-cp2", action="store_true", help="only the one-process column")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        print(json.dumps(run_column(lengths, args.doc_len, args.reps)), flush=True)
        return
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, fp32")
    one = run_column(lengths, args.doc_len, args.reps)
    print("cp1:", json.dumps(one), flush=True)  # kept if the cp2 column fails
    two = [None] * len(one)
    if not args.no_cp2:
        try:
            two = cp2_rows(args)
        except subprocess.CalledProcessError as e:  # e.g. a rank killed for memory: say so, keep cp1
            print(f"cp2 column failed (torchrun exit {e.returncode}; an OOM kill shows in dmesg)")
    print(
        "| seq | batch | docs/row | mask MB (bool + fp32) | cp1 causal tok/s | cp1 document tok/s | cp1 peak GB "
        "| cp2 causal tok/s | cp2 document tok/s | cp2 peak GB/rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for a, b in zip(one, two, strict=True):
        cp2 = (
            "| - | - | - |"
            if b is None
            else f"| {b['causal']:,.0f} | {b['document']:,.0f} | {b['peak_gb']:.2f} |"
        )
        print(
            f"| {a['seq']} | {a['batch']} | {a['docs']:.1f} | {5 * a['batch'] * a['seq'] ** 2 / 1e6:.0f} "
            f"| {a['causal']:,.0f} | {a['document']:,.0f} | {a['peak_gb']:.2f} {cp2}",
            flush=True,
        )


if __name__ == "__main__":
    main()
