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

from harness import timed_training, torchrun_row

GLOBAL_BATCH = 8
# (model, processes, expert-parallel size)
ROWS = [("dense", 1, 1), ("moe", 1, 1), ("dense", 2, 1), ("moe", 2, 1), ("moe", 2, 2)]


def name(kind: str, procs: int, ep: int) -> str:
    return f"{kind} dp{procs}" + (f" (ep{ep})" if ep > 1 else "")


def worker(out: str, kind: str, ep: int, args) -> None:
    from dist_llm.config import load_config
    from dist_llm.distributed import init_world

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
    timed_training(cfg, world, out, args.steps, GLOBAL_BATCH)


def run_row(kind: str, procs: int, ep: int, args) -> dict:
    options = [f"--dim={args.dim}", f"--layers={args.layers}", f"--seq={args.seq}", f"--steps={args.steps}",
               f"--experts={args.experts}", f"--dtype={args.dtype}"]  # fmt: skip
    return torchrun_row(__file__, procs, [kind, str(ep), *options], name(kind, procs, ep))


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
