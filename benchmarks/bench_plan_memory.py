"""Predicted memory per rank (dist_llm/plan/memory.py) against measured peak memory of real runs.

For each ZeRO stage, 2 CPU ranks train the `small` model for a few steps through the real
DeepSpeed engine; each rank records its resident memory after start-up (Python, torch,
DeepSpeed, the process group: what no model accounts for) and its peak afterwards. The table
prints the planner's prediction next to the measured growth, side by side in one run.

    python benchmarks/bench_plan_memory.py [--dtype fp32] [--stages 1 2 3]
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


def worker(out: str, stage: int, dtype: str) -> None:
    import torch

    from dist_llm.config import load_config
    from dist_llm.distributed import finish_process, gather_objects, init_world
    from dist_llm.model.llama import Llama, lm_loss
    from dist_llm.train.engine import build_engine

    world = init_world()
    cfg = load_config(
        REPO / "configs/model/small.yaml",
        [
            f"parallel.zero_stage={stage}",
            f"train.dtype={dtype}",
            f"train.micro_batch_size={MICRO}",
            f"data.seq_len={SEQ}",
            "optim.warmup_steps=0",
            "train.steps=10",
        ],
    )
    torch.randn(64, 64) @ torch.randn(64, 64)  # load the math libraries before the baseline
    baseline = rss_now()
    engine = build_engine(Llama(cfg.model), cfg, world)
    tokens = torch.randint(0, cfg.model.vocab_size, (MICRO, SEQ + 1))
    for _ in range(STEPS):
        loss = lm_loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = gather_objects({"rank": world.rank, "baseline": baseline, "growth": peak - baseline}, world)
    if world.rank == 0:
        Path(out).write_text(json.dumps(rows))
    finish_process()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    from dist_llm.config import load_config
    from dist_llm.plan.memory import GB, Layout, memory_per_gpu

    model = load_config(REPO / "configs/model/small.yaml").model
    print(f"small model, 2 CPU ranks, micro-batch {MICRO} x {SEQ}, {args.dtype}; GB per rank\n")
    print(f"{'ZeRO':>4} {'predicted':>10} {'measured':>9} {'ratio':>6}   predicted parts")
    for stage in args.stages:
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            out = Path(tmp) / "rows.json"
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "TORCH_EXTENSIONS_DIR": os.environ.get(
                    "TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions")
                ),
            }
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node=2",
                    f"--master_port={port}",
                    __file__,
                    "--worker",
                    str(out),
                    str(stage),
                    args.dtype,
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            rows = json.loads(out.read_text())
        layout = Layout(dp=2, zero=stage, micro_batch=MICRO, seq_len=SEQ, dtype=args.dtype)
        predicted = memory_per_gpu(model, layout)
        measured = max(r["growth"] for r in rows)
        parts = ", ".join(f"{k} {v / GB:.3f}" for k, v in predicted.items() if k != "total")
        print(
            f"{stage:>4} {predicted['total'] / GB:>10.3f} {measured / GB:>9.3f} {measured / predicted['total']:>5.2f}x   {parts}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
