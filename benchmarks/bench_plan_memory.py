"""Predicted memory per rank (dist_llm/plan/memory.py) against measured peak memory of real runs.

For each layout (ZeRO stages 1-3 with data parallelism; tensor, pipeline and both with ZeRO-1),
CPU ranks train the `small` model for a few steps through the real DeepSpeed engine and the real
parallel modules; each rank records its resident memory after start-up (Python, torch,
DeepSpeed, the process group: what no model accounts for) and its peak afterwards. The table
prints the planner's prediction for the busiest rank next to the largest measured growth, side
by side in one run.

    python benchmarks/bench_plan_memory.py [--dtype fp32]
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
STEPS, MICRO, SEQ = 3, 4, 256


def rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(out: str, tp: int, pp: int, stage: int, dtype: str) -> None:
    import torch

    from dist_llm.config import load_config
    from dist_llm.distributed import finish_process, gather_objects, init_world
    from dist_llm.parallel import loss_function
    from dist_llm.train.loop import train_step
    from dist_llm.train.start import build_training

    world = init_world()
    cfg = load_config(REPO / "configs/model/small.yaml", overrides(tp, pp, stage, dtype))
    torch.randn(64, 64) @ torch.randn(64, 64)  # load the math libraries before the baseline
    baseline = rss_now()
    layout, engine = build_training(cfg, world, None)
    loss = loss_function(layout)

    def batches():
        tokens = torch.randint(0, cfg.model.vocab_size, (MICRO, SEQ + 1))
        while True:
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    stream = batches()
    for _ in range(STEPS):
        train_step(engine, layout, stream, lambda x, b: loss(x, b["labels"]), cfg.train.grad_accum, world)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = gather_objects({"rank": world.rank, "baseline": baseline, "growth": peak - baseline}, world)
    if world.rank == 0:
        Path(out).write_text(json.dumps(rows))
    finish_process()


def overrides(tp: int, pp: int, stage: int, dtype: str) -> list[str]:
    return [
        f"parallel.tensor={tp}",
        f"parallel.pipeline={pp}",
        f"parallel.zero_stage={stage}",
        f"train.dtype={dtype}",
        f"train.micro_batch_size={MICRO}",
        f"train.grad_accum={2 * pp if pp > 1 else 1}",
        f"data.seq_len={SEQ}",
        "optim.warmup_steps=0",
        "train.steps=10",
    ]


# (tp, pp, dp, ZeRO stage)
LAYOUTS = [(1, 1, 2, 1), (1, 1, 2, 2), (1, 1, 2, 3), (2, 1, 1, 1), (1, 2, 1, 1), (2, 2, 1, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    from dist_llm.config import load_config
    from dist_llm.plan.memory import GB, Layout, memory_per_gpu

    model = load_config(REPO / "configs/model/small.yaml").model
    print(f"small model, micro-batch {MICRO} x {SEQ}, {args.dtype}; GB per rank (the busiest)\n")
    print(f"{'layout':<18} {'predicted':>10} {'measured':>9} {'ratio':>6}   predicted parts")
    for tp, pp, dp, stage in LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            out = Path(tmp) / "rows.json"
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "DS_ACCELERATOR": "cpu",
                "TORCH_EXTENSIONS_DIR": os.environ.get(
                    "TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions")
                ),
            }
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp * pp * dp}"]
            command += [
                f"--master_port={port}",
                __file__,
                "--worker",
                str(out),
                str(tp),
                str(pp),
                str(stage),
                args.dtype,
            ]
            subprocess.run(command, env=env, check=True, capture_output=True)
            rows = json.loads(out.read_text())
        layout = Layout(tp=tp, pp=pp, dp=dp, zero=stage, micro_batch=MICRO, seq_len=SEQ, dtype=args.dtype)
        predicted = memory_per_gpu(model, layout)
        measured = max(r["growth"] for r in rows)
        parts = ", ".join(f"{k} {v / GB:.3f}" for k, v in predicted.items() if k != "total")
        name = f"tp{tp} pp{pp} dp{dp} ZeRO-{stage}"
        print(
            f"{name:<18} {predicted['total'] / GB:>10.3f} {measured / GB:>9.3f} "
            f"{measured / predicted['total']:>5.2f}x   {parts}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
