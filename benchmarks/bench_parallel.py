"""Tokens/s and memory per rank of each (tensor, pipeline, context, data) layout, side by side.

Every layout trains the same model on the same global batch (8 sequences) through the real
DeepSpeed engine and the real parallel modules (bf16, ZeRO-1), started with torchrun on this
machine. Per rank it records the parameters it holds, its growth in resident memory from
before the model was built to the peak, and the wall time of the timed steps.

    python benchmarks/bench_parallel.py [--dim 256] [--layers 8] [--seq 256] [--steps 6] [--only "tp1 pp1 cp2 dp1" ...]

On a 2-core CPU machine, more than 2 processes share 2 cores: tokens/s then measures the
overhead of each layout's communication and scheduling, not a speed-up. The memory columns
are what the layouts are for, and they carry over to GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
# (tp, pp, cp, dp)
LAYOUTS = [
    (1, 1, 1, 1),
    (1, 1, 1, 2),
    (2, 1, 1, 1),
    (1, 2, 1, 1),
    (1, 1, 2, 1),
    (2, 1, 1, 2),
    (1, 2, 1, 2),
    (2, 2, 1, 1),
    (1, 1, 2, 2),
    (2, 1, 2, 1),
    (2, 2, 1, 2),
]


def name(tp: int, pp: int, cp: int, dp: int) -> str:
    return f"tp{tp} pp{pp} cp{cp} dp{dp}"


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(out: str, tp: int, pp: int, cp: int, args) -> None:
    import time

    import torch

    from dist_llm.config import load_config
    from dist_llm.distributed import finish_process, gather_objects, init_world
    from dist_llm.parallel import loss_function
    from dist_llm.train.loop import train_step
    from dist_llm.train.start import build_training

    world = init_world()
    dp = world.size // (tp * pp * cp)
    accum = 2 * pp if pp > 1 else 1  # micro-batches keep every stage busy in 1F1B
    cfg = load_config(
        None,
        [
            "model.vocab_size=8192",
            f"model.dim={args.dim}",
            f"model.n_layers={args.layers}",
            "model.n_heads=8",
            "model.n_kv_heads=4",
            f"model.ffn_hidden={args.dim * 8 // 3 // 64 * 64}",
            f"model.max_seq_len={args.seq}",
            f"data.seq_len={args.seq}",
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"parallel.context={cp}",
            "parallel.zero_stage=1",
            "train.dtype=bf16",
            f"train.grad_accum={accum}",
            f"train.micro_batch_size={GLOBAL_BATCH // dp // accum}",
            "optim.warmup_steps=0",
            "train.steps=100",
        ],
    )
    torch.randn(64, 64) @ torch.randn(64, 64)  # load the math libraries before the baseline
    baseline = rss_now()
    layout, engine = build_training(cfg, world, None)
    loss = loss_function(layout)
    g = torch.Generator().manual_seed(layout.dp_rank)

    def batches():
        while True:
            tokens = torch.randint(
                0, cfg.model.vocab_size, (cfg.train.micro_batch_size, args.seq + 1), generator=g
            )
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    stream = batches()

    def objective(logits, batch):
        return loss(logits, batch["labels"])

    for _ in range(2):  # warm-up: allocator, first pipeline shapes
        train_step(engine, layout, stream, objective, accum, world)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(engine, layout, stream, objective, accum, world)
    torch.distributed.barrier()
    elapsed = time.perf_counter() - start
    held = sum(p.numel() for p in {id(p): p for p in engine.module.parameters()}.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = gather_objects({"params": held, "growth": peak - baseline, "elapsed": elapsed}, world)
    if world.is_main:
        tokens = args.steps * GLOBAL_BATCH * args.seq
        Path(out).write_text(json.dumps({"rows": rows, "tokens_per_s": tokens / elapsed}))
    finish_process()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(tp: int, pp: int, cp: int, dp: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={tp * pp * cp * dp}",
            f"--master_port={free_port()}",
            __file__,
            "--worker",
            str(out),
            str(tp),
            str(pp),
            str(cp),
            f"--dim={args.dim}",
            f"--layers={args.layers}",
            f"--seq={args.seq}",
            f"--steps={args.steps}",
        ]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name(tp, pp, cp, dp)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=4, metavar=("OUT", "TP", "PP", "CP"))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="+", help='layouts by name, e.g. "tp1 pp1 cp2 dp1"')
    args = parser.parse_args()
    if args.worker:
        out, tp, pp, cp = args.worker
        worker(out, int(tp), int(pp), int(cp), args)
        return
    print(
        f"model dim {args.dim}, {args.layers} layers, seq {args.seq}, global batch {GLOBAL_BATCH}, bf16, ZeRO-1"
    )
    print(
        f"{'layout':<18}{'procs':>6}{'tokens/s':>11}{'vs 1 proc':>10}{'params/rank (M)':>17}{'mem growth/rank (MB)':>22}"
    )
    base = None
    for tp, pp, cp, dp in LAYOUTS:
        if args.only and name(tp, pp, cp, dp) not in args.only:
            continue
        result = run_layout(tp, pp, cp, dp, args)
        rows = result["rows"]
        base = base or result["tokens_per_s"]
        params = max(r["params"] for r in rows) / 1e6
        growth = max(r["growth"] for r in rows) / 2**20
        print(
            f"{name(tp, pp, cp, dp):<18}{tp * pp * cp * dp:>6}{result['tokens_per_s']:>11,.0f}"
            f"{result['tokens_per_s'] / base:>9.2f}x{params:>17.2f}{growth:>22.0f}"
        )


if __name__ == "__main__":
    main()
