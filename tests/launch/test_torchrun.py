"""`dist-llm launch` and plain torchrun: a config error is printed once and first; a rank that
fails mid-run ends the job with one line naming the rank, host, step and checkpoint to resume."""

from __future__ import annotations

import socket
import subprocess
import sys
import types

from dist_llm.config import load_config
from dist_llm.launch.torchrun import explain, explain_run, root_cause
from dist_llm.train.failures import keep, last_line

from ..launch_util import REPO, job_env, tiny_train_args, torchrun


def failure(rank: int, exitcode: int, **ours):
    """A torchrun ProcessFailure as the agent builds it from a worker's error file (none: `ours` empty)."""
    record = {"rank": rank, "world_size": 2, "host": "h", "pid": 100 + rank, "error": "E", **ours}
    data = {"message": {"message": last_line(record)}, "dist_llm": record} if ours else {}
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
    failures = dict([failure(0, 1, consequence=True, time=1.0), failure(1, 1, consequence=False, time=2.0)])
    rank, cause = root_cause(failures)  # torchrun would take rank 0: the same second, the lower rank
    assert rank == 1 and explain(
        rank, cause, config, 0.0
    ) == "error: rank 1/2 on host h failed before the first step: E; " + (
        "no checkpoint was saved yet: running again starts afresh"
    )
    _, diverged = failure(0, 2)  # a user error: its message, no dist-llm record
    diverged.message = {"message": "error: loss nan, gradient norm nan at step 3; ..."}
    assert explain(0, diverged, config, 0.0) == "error: loss nan, gradient norm nan at step 3; ..."
    killed = dict([failure(0, 1, consequence=True, time=1.0), failure(1, -9)])
    rank, cause = root_cause(killed)  # a rank killed outright writes no error file
    assert explain(rank, cause, config, 0.0) == (
        f"error: rank 1 on host {socket.gethostname()} (pid 101) was killed by signal 9 (SIGKILL); "
        "no checkpoint was saved yet: running again starts afresh"
    )


def test_the_run_folder_names_a_rank_that_failed_on_another_node(tmp_path):
    """What the sbatch script prints last (`dist-llm launch --explain`): each rank's record in
    train.out_dir/failures, read on any node; records older than the launch do not count."""
    config = load_config(REPO / "configs" / "tiny.yaml", [f"train.out_dir={tmp_path}"])
    base = {"world_size": 4, "host": "node2", "pid": 1, "step": 7, "completed": 6, "checkpoint": "C"}
    keep({**base, "rank": 0, "error": "gloo: peer", "consequence": True, "time": 101.0}, tmp_path)
    assert explain_run(config, since=100.0).startswith(
        "error: a rank died or hung without an error of its own"
    )
    assert explain_run(config, since=100.0).endswith(
        "stopped at step 7 (last completed step 6); "
        + ("no checkpoint was saved yet: running again starts afresh")
    )
    cause = {**base, "rank": 3, "error": "ValueError: x", "consequence": False, "time": 102.0}
    keep(cause, tmp_path)
    assert (
        explain_run(config, since=100.0)
        == last_line(cause)
        == (
            "error: rank 3/4 on host node2 failed at step 7 (last completed step 6): ValueError: x; "
            "resume from C with checkpoint.resume=auto"
        )
    )
    assert explain_run(config, since=200.0) is None  # an earlier job's records
