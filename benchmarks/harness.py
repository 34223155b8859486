"""What the benchmarks that train under torchrun share: one row is a torchrun launch of the
benchmark's own file in worker mode, which trains through the real engine and writes its
measurements to a JSON file the parent reads back."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_row(script: str, procs: int, worker_args: list[str], label: str) -> dict:
    """Run `script --worker OUT *worker_args` on `procs` processes (one thread each); its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               f"--master_port={free_port()}", script, "--worker", str(out), *worker_args]  # fmt: skip
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def timed_training(cfg, world, out: str, steps: int, global_batch: int) -> None:
    """Train `cfg` on random tokens (2 warm-up steps, then `steps` timed); every rank's held
    parameters, peak memory growth from before the model was built, and the wall time, written
    by rank 0 with the tokens/s of the whole run."""
    import time

    import torch

    from dist_llm.distributed import finish_process, gather_objects
    from dist_llm.parallel import loss_function
    from dist_llm.train.loop import train_step
    from dist_llm.train.start import build_training

    torch.randn(64, 64) @ torch.randn(64, 64)  # load the math libraries before the baseline
    baseline = rss_now()
    layout, engine = build_training(cfg, world, None)
    loss = loss_function(layout)
    g = torch.Generator().manual_seed(layout.dp_rank)
    micro, seq, accum = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.grad_accum

    def batches():
        while True:
            tokens = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), generator=g)
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    stream = batches()

    def objective(logits, batch):
        return loss(logits, batch["labels"])

    for _ in range(2):  # warm-up: allocator, first (pipeline) shapes
        train_step(engine, layout, stream, objective, accum, world)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(engine, layout, stream, objective, accum, world)
    torch.distributed.barrier()
    elapsed = time.perf_counter() - start
    held = sum(p.numel() for p in {id(p): p for p in engine.module.parameters()}.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = gather_objects({"params": held, "growth": peak - baseline, "elapsed": elapsed}, world)
    if world.is_main:
        tokens = steps * global_batch * seq
        Path(out).write_text(json.dumps({"rows": rows, "tokens_per_s": tokens / elapsed}))
    finish_process()
