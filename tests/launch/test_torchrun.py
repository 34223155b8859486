"""`dist-llm launch` and plain torchrun: a config error is printed once and first; a rank that
fails mid-run ends the job with one line naming the rank, host, step and checkpoint to resume."""

from __future__ import annotations

import socket
import subprocess
import sys
import types

from dist_llm.config import load_config
from dist_llm.launch.torchrun import explain, root_cause

from ..launch_util import REPO, job_env, tiny_train_args, torchrun


def failure(rank: int, exitcode: int, message="", **ours):
    """A torchrun ProcessFailure as the agent builds it from a worker's error file."""
    data = {"message": {"message": message}, "dist_llm": ours} if message else {}
    return rank, types.SimpleNamespace(
        exitcode=exitcode, pid=100 + rank, timestamp=7, message=data.get("message", ""), error_file_data=data
    )


def test_under_plain_torchrun_a_config_error_is_printed_once_and_first(comedy_shards, tmp_path):
    proc = torchrun(2, tiny_train_args(comedy_shards, tmp_path / "run", "parallel.tensor=3"), check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert lines[0] == "error: invalid configuration:", lines[:5]
    assert sum(line.startswith("error:") for line in lines) == 1, lines
    # torchrun's own summary (it exits 1, whatever its workers' status) shows our line as the cause
    assert proc.returncode == 1 and "traceback : error: invalid configuration:" in proc.stderr


def test_a_rank_failing_mid_run_ends_the_launch_with_one_line(comedy_shards, tmp_path):
    out = tmp_path / "run"
    argv = tiny_train_args(comedy_shards, out, "train.steps=4", "checkpoint.every=2", "logging.val_every=0")
    cmd = [sys.executable, "-m", "dist_llm", "launch", "--standalone", "--nproc-per-node", "2", *argv[2:]]
    proc = subprocess.run(
        cmd, cwd=REPO, env=job_env(DIST_LLM_FAULT="raise:3:1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: rank 1/2 on host {socket.gethostname()} failed at step 3 (last completed step 2): "
        "RuntimeError: injected fault (DIST_LLM_FAULT=raise:3:1); "
        f"resume from {out / 'checkpoints' / 'step_000000002'} with checkpoint.resume=auto"
    )
    assert "ChildFailedError" not in proc.stderr and "Root Cause" not in proc.stderr


def test_the_root_cause_is_the_rank_that_failed_first_not_one_it_took_down(tmp_path):
    config = load_config(REPO / "configs" / "tiny.yaml", [f"train.out_dir={tmp_path}"])
    failures = dict(
        [
            failure(0, 1, "error: rank 0/2 ... Connection closed by peer", consequence=True, time=1.0),
            failure(1, 1, "error: rank 1/2 ... injected", consequence=False, time=2.0),
        ]
    )
    rank, cause = root_cause(failures)
    assert rank == 1 and explain(rank, cause, config) == "error: rank 1/2 ... injected"
    killed = dict([failure(0, 1, "error: rank 0/2 ... peer", consequence=True, time=1.0), failure(1, -9)])
    rank, cause = root_cause(killed)  # a rank killed outright writes no error file
    assert explain(rank, cause, config) == (
        f"error: rank 1 on host {socket.gethostname()} (pid 101) was killed by signal 9 (SIGKILL); "
        "no checkpoint was saved yet: running again starts afresh"
    )
