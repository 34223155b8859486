"""`dist-llm submit` (submitit) on the two-node SLURM cluster: the same training as sbatch, and
preemption through submitit's signal and checkpoint() hook with an exact resume."""

from __future__ import annotations

import subprocess
import sys

import submitit

from ..launch_util import REPO
from .cluster import STEPS, losses, train_args, wait_for_step


def submit(cluster, folder, data, out) -> str:
    cmd = [sys.executable, "-m", "dist_llm", "submit", "--nodes", "2", *cluster.one_rank_per_node("submitit")]
    cmd += ["--folder", f"{folder}/%j", "--signal-delay-s", "30", "train", *train_args(data, out)]
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def results(folder, job_id: str) -> list:
    """Each task's return value, from the result files submitit wrote for this test's own job."""
    return submitit.SlurmJob(folder=f"{folder}/%j", job_id=job_id, tasks=(0, 1)).results()


def test_submitit_job_trains_across_two_nodes_like_sbatch(slurm_cluster, reference, data, tmp_path):
    folder, out = tmp_path / "submitit", tmp_path / "run"
    job_id = submit(slurm_cluster, folder, data, out)
    job = slurm_cluster.wait(job_id)
    log = (folder / job_id / f"{job_id}_0_log.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "node[1-2]", log[-3000:]
    rank0, rank1 = results(folder, job_id)
    assert rank0["step"] == STEPS and rank0["checkpoint"].endswith(f"step_{STEPS:09d}")
    assert rank1["step"] == STEPS
    assert "world 2 = tp1 x pp1 x dp2 | ZeRO-2" in log
    # Two submitit tasks give the same ranks and the same run as torchrun under sbatch.
    assert losses(out) == losses(reference[0])


def test_submitit_preemption_requeues_through_its_checkpoint_hook_and_resumes_exactly(
    slurm_cluster, reference, data, tmp_path
):
    folder, out = tmp_path / "submitit", tmp_path / "run"
    job_id = submit(slurm_cluster, folder, data, out)
    wait_for_step(out, 10)
    # What submitit's --signal=USR2@<delay> does before the time limit or a preemption.
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    slurm_cluster.wait(job_id, 120, until=lambda j: int(j["Restarts"]) >= 1 and j["JobState"] == "PENDING")
    slurm_cluster.release(job_id)
    job = slurm_cluster.wait(job_id)
    log = (folder / job_id / f"{job_id}_0_log.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-3000:]
    stopped = [line for line in log.splitlines() if line.startswith("stopped: SIGUSR2 at step ")]
    assert stopped and "run again to continue" in stopped[0], log[-3000:]  # submitit requeues, not us
    step = int(stopped[0].split(" at step ")[1].split(":")[0])
    assert f"Requeued job {job_id}" in log  # by submitit's handler, after our checkpoint
    assert f"resumed from {out / 'checkpoints' / f'step_{step:09d}'} at step {step}" in log
    assert results(folder, job_id)[0]["step"] == STEPS
    want, got = losses(reference[0]), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in got), {s: (got[s], want[s]) for s in got if got[s] != want[s]}
