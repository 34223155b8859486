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

from harness import timed_training, torchrun_row

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


def worker(out: str, tp: int, pp: int, cp: int, args) -> None:
    from dist_llm.config import load_config
    from dist_llm.distributed import init_world

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
    timed_training(cfg, world, out, args.steps, GLOBAL_BATCH)


def run_layout(tp: int, pp: int, cp: int, dp: int, args) -> dict:
    options = [f"--dim={args.dim}", f"--layers={args.layers}", f"--seq={args.seq}", f"--steps={args.steps}"]
    return torchrun_row(
        __file__, tp * pp * cp * dp, [str(tp), str(pp), str(cp), *options], name(tp, pp, cp, dp)
    )


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
