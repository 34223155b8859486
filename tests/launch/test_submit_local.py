"""`dist-llm submit` without SLURM: submitit's local executor (two processes) and debug (in process)."""

from __future__ import annotations

import json
import subprocess
import sys

from ..launch_util import REPO, job_env


def submit(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dist_llm", "submit", *args]
    return subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)


def last_json(stdout: str) -> dict:
    """The result `--wait` prints last (a debug job's own console lines come before it)."""
    return json.loads(stdout[stdout.rindex("\n{") if "\n{" in stdout else 0 :])


def train(data, out) -> list[str]:
    return [
        f"data.sources=[{{path: '{data}'}}]",
        f"train.out_dir={out}",
        "train.steps=4",
        "logging.val_every=0",
        "parallel.zero_stage=2",
    ]


def test_local_cluster_runs_two_ranks(comedy_shards, tmp_path):
    out = tmp_path / "run"
    proc = submit(
        "--cluster", "local", "--tasks-per-node", "2", "--folder", f"{tmp_path}/submitit/%j", "--wait",
        "--config", "configs/tiny.yaml", *train(comedy_shards, out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["step"] == 4 and result["checkpoint"].endswith("step_000000004")
    assert (
        json.loads((out / "checkpoints" / "step_000000004" / "dist_llm.json").read_text())["world_size"] == 2
    )


def test_debug_cluster_runs_in_process_and_any_stage(comedy_shards, tmp_path):
    out = tmp_path / "run"
    proc = submit(
        "--cluster", "debug", "--folder", f"{tmp_path}/submitit/%j", "--wait",
        "train", "--config", "configs/tiny.yaml", *train(comedy_shards, out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc.stdout)["step"] == 4
    proc = submit(
        "--cluster", "debug", "--folder", f"{tmp_path}/submitit/%j", "--wait",
        "eval", "--checkpoint", str(out / "checkpoints" / "step_000000004"), "--data", str(comedy_shards),
        "--max-batches", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"perplexity"' in proc.stdout


def test_bad_arguments_fail_before_submitting(tmp_path):
    proc = submit(
        "--cluster",
        "local",
        "--folder",
        str(tmp_path / "s"),
        "--config",
        "configs/tiny.yaml",
        "train.stepz=3",
    )
    assert proc.returncode == 2 and "train.stepz: unknown key" in proc.stderr
    proc = submit(
        "--cluster", "local", "--nodes", "2", "--folder", str(tmp_path / "s"), "--config", "configs/tiny.yaml"
    )
    assert proc.returncode == 2 and "--nodes 2 needs --cluster slurm" in proc.stderr
    assert not (tmp_path / "s").exists()
