"""Preemption without SLURM: a signal to one rank stops every rank at the same step boundary with a
checkpoint and exit status 75; running the same command again resumes bitwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ..launch_util import REPO, free_port, job_env, tiny_train_args, torchrun
from ..reference import train_losses

STEPS = 40


def args(data, out) -> list[str]:
    return tiny_train_args(
        data,
        out,
        f"train.steps={STEPS}",
        "checkpoint.every=0",
        "logging.every=1",
        "logging.val_every=0",
        "parallel.zero_stage=2",
    )


losses = train_losses


def rank_pid(tag: str, rank: int) -> int:
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process")


def test_signal_to_one_rank_stops_all_at_one_step_and_resume_is_exact(comedy_shards, tmp_path):
    reference = tmp_path / "ref"
    torchrun(2, args(comedy_shards, reference))
    out, tag = tmp_path / "run", uuid.uuid4().hex
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    proc = subprocess.Popen(
        [*cmd, *args(comedy_shards, out)],
        cwd=REPO,
        env=job_env(TEST_TAG=tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(rank_pid(tag, 1), signal.SIGUSR1)  # rank 0 gets nothing: it learns in the all-reduce
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exitcode  : 75" in stderr, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: SIGUSR1 at step ")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]  # both ranks, same step
    step = int(stopped[0].split(" at step ")[1].split(":")[0])
    assert step < STEPS and "run again to continue" in stopped[0]  # not under SLURM: no requeue
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step:09d}"

    resumed = torchrun(2, args(comedy_shards, out))
    assert f"resumed from {out / 'checkpoints' / f'step_{step:09d}'} at step {step}" in resumed.stdout
    want, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in got), {s: (got[s], want[s]) for s in got if got[s] != want[s]}
