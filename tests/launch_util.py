"""Start real multi-process jobs from tests (torchrun on this machine, gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict:
    env = dict(os.environ)
    # DeepSpeed JIT-compiles its CPU shared-memory allreduce once; keep the build between runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"))
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 600, check: bool = True, **env: str):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]
    if nproc == 1:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=job_env(**env), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def tiny_train_args(data, out, *overrides: str) -> list[str]:
    """`python -m dist_llm train` arguments for the tiny test model on `data`, writing to `out`."""
    return [
        "-m",
        "dist_llm",
        "train",
        "--config",
        "configs/tiny.yaml",
        f"data.sources=[{{path: '{data}'}}]",
        f"train.out_dir={out}",
        *overrides,
    ]
