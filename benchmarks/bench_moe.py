"""Dense against mixture-of-experts training at equal active parameters, side by side.

The dense model's feed-forward is a SwiGLU of width F; the MoE model's is `--experts` SwiGLU
experts of width F / top_k with top-2 routing, so a token runs through the same number of
feed-forward weights (the router adds experts x dim), while the model holds experts / top_k
times as many. Each row trains through the real DeepSpeed engine and the real parallel modules
(ZeRO-1, the global batch of 8 sequences, random tokens), started with torchrun on this
machine: one process; two data-parallel processes; and two expert-parallel ones. Per rank it
records the parameters it holds, its growth in resident memory from before the model was built
to the peak, and the wall time of the timed steps.

    python benchmarks/bench_moe.py [--dim 256] [--layers 4] [--seq 256] [--experts 8] [--steps 6] [--dtype bf16]

On a 2-core CPU machine two processes share the two cores, and a CPU runs an expert's matmul
on its few rows at a fraction of a dense matmul's speed: tokens/s measures the routing and
dispatch overhead here, not what a GPU would gain. The memory columns carry over.
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
# (model, processes, expert-parallel size)
ROWS = [("dense", 1, 1), ("moe", 1, 1), ("dense", 2, 1), ("moe", 2, 1), ("moe", 2, 2)]


def name(kind: str, procs: int, ep: int) -> str:
    return f"{kind} dp{procs}" + (f" (ep{ep})" if ep > 1 else "")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(out: str, kind: str, ep: int, args) -> None:
    import time

    import torch

    from dist_llm.config import load_config
    from dist_llm.distributed import finish_process, gather_objects, init_world
    from dist_llm.parallel import loss_function
    from dist_llm.train.loop import train_step
    from dist_llm.train.start import build_training

    world = init_world()
    dp, accum = world.size, 1
    ffn = args.dim * 8 // 3 // 64 * 64
    moe = [
        f"model.moe.num_experts={args.experts}",
        "model.moe.top_k=2",
        f"model.moe.expert_hidden={ffn // 2}",
    ]
    cfg = load_config(
        None,
        [
            "model.vocab_size=8192",
            f"model.dim={args.dim}",
            f"model.n_layers={args.layers}",
            "model.n_heads=8",
            "model.n_kv_heads=4",
            f"model.ffn_hidden={ffn}",
            *(moe if kind == "moe" else []),
            f"model.max_seq_len={args.seq}",
            f"data.seq_len={args.seq}",
            f"parallel.expert={ep}",
            "parallel.zero_stage=1",
            f"train.dtype={args.dtype}",
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

    for _ in range(2):  # warm-up: allocator, first shapes
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


def run_row(kind: str, procs: int, ep: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            f"--master_port={free_port()}",
            __file__,
            "--worker",
            str(out),
            kind,
            str(ep),
            f"--dim={args.dim}",
            f"--layers={args.layers}",
            f"--seq={args.seq}",
            f"--steps={args.steps}",
            f"--experts={args.experts}",
            f"--dtype={args.dtype}",
        ]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name(kind, procs, ep)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=3, metavar=("OUT", "KIND", "EP"))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    if args.worker:
        out, kind, ep = args.worker
        worker(out, kind, int(ep), args)
        return
    import torch

    print(
        f"model dim {args.dim}, {args.layers} layers, seq {args.seq}, global batch {GLOBAL_BATCH}, "
        f"{args.dtype}, ZeRO-1; MoE: {args.experts} experts, top-2; CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"{'run':<16}{'procs':>6}{'tokens/s':>11}{'vs dense':>10}{'params/rank (M)':>17}{'mem growth/rank (MB)':>22}"
    )
    dense = {}
    for kind, procs, ep in ROWS:
        result = run_row(kind, procs, ep, args)
        rows = result["rows"]
        dense.setdefault(procs, result["tokens_per_s"])
        params = max(r["params"] for r in rows) / 1e6
        growth = max(r["growth"] for r in rows) / 2**20
        print(
            f"{name(kind, procs, ep):<16}{procs:>6}{result['tokens_per_s']:>11,.0f}"
            f"{result['tokens_per_s'] / dense[procs]:>9.2f}x{params:>17.2f}{growth:>22.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
