"""slurm/dist-llm.sbatch on a real two-node SLURM cluster: ZeRO-2 across nodes, preemption with
requeue and exact resume, a killed rank, a hung rank, a single-process stage."""

from __future__ import annotations

import json
import os
import signal
import time

from .cluster import HANG_S, STEPS, TIMEOUT_S, losses, rank_process, train_args, wait_for_step


def log_of(logs, job_id: str) -> str:
    return (logs / f"dist-llm-{job_id}.out").read_text()


def sbatch_train(cluster, data, out, *extra: str) -> list[str]:
    return ["--nodes", "2", *cluster.one_rank_per_node(), "train", *train_args(data, out, *extra)]


def test_two_node_zero2_job_trains_and_checkpoints(reference):
    out, logs, job_id, job = reference
    text = log_of(logs, job_id)
    assert job["JobState"] == "COMPLETED", text[-3000:]
    assert job["NodeList"] == "node[1-2]" and job["NumNodes"] == "2"
    assert "2 nodes x 1 processes" in text and "world 2 = tp1 x pp1 x dp2 | ZeRO-2" in text
    # The job's end time (its --time) read from SLURM, as the deadline to save and requeue by.
    assert "deadlines: SLURM job ends" in text and "(train.slurm_margin_minutes)" in text
    loss = losses(out)
    assert sorted(loss) == list(range(1, STEPS + 1)) and loss[STEPS] < loss[1] - 1.0
    meta = json.loads((out / "checkpoints" / f"step_{STEPS:09d}" / "dist_llm.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["parallel"]["zero_stage"] == 2


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, reference, data, tmp_path):
    ref_out = reference[0]
    out, logs = tmp_path / "run", tmp_path / "logs"
    job_id = slurm_cluster.submit(logs, *sbatch_train(slurm_cluster, data, out))
    wait_for_step(out, 10)
    # What --signal=B:USR1@<grace> does when the time limit or a preemption approaches.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    slurm_cluster.wait(job_id, 120, until=lambda j: int(j["Restarts"]) >= 1 and j["JobState"] == "PENDING")
    slurm_cluster.release(job_id)
    job = slurm_cluster.wait(job_id)
    text = log_of(logs, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-3000:]
    stopped = [line for line in text.splitlines() if line.startswith("stopped: SIGUSR1 at step ")]
    assert stopped and f"requeued job {job_id}" in stopped[0], text[-3000:]
    step = int(stopped[0].split(" at step ")[1].split(":")[0])
    assert 10 <= step < STEPS
    assert f"resumed from {out / 'checkpoints' / f'step_{step:09d}'} at step {step}" in text
    want, got = losses(ref_out), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in got), {s: (got[s], want[s]) for s in got if got[s] != want[s]}
    final = json.loads((out / "checkpoints" / f"step_{STEPS:09d}" / "dist_llm.json").read_text())
    assert (
        final["tokens"]
        == json.loads((ref_out / "checkpoints" / f"step_{STEPS:09d}" / "dist_llm.json").read_text())["tokens"]
    )


def test_killed_rank_ends_the_job_within_the_timeout_and_a_restart_resumes(
    slurm_cluster, reference, data, tmp_path
):
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = sbatch_train(slurm_cluster, data, out)
    job_id = slurm_cluster.submit(logs, *args)
    wait_for_step(out, 25)  # past the checkpoint at step 20
    pid, node = rank_process(job_id, 1)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    job = slurm_cluster.wait(job_id, 120)
    elapsed = time.monotonic() - killed
    text = log_of(logs, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", text[-3000:]
    assert elapsed < TIMEOUT_S, elapsed
    print(f"job ended {elapsed:.1f} s after SIGKILL of rank 1 (timeout {TIMEOUT_S} s)")
    root_cause = text.split("Root Cause (first observed failure):")[1][:600]
    assert f"host      : {slurm_cluster.host_of(node)}" in root_cause, root_cause
    assert "rank      : 1 (local_rank: 0)" in root_cause and "SIGKILL" in root_cause, root_cause
    last = text.strip().splitlines()[-1]  # the job's last line: the step and what to resume from
    assert last.startswith("error: a rank died or hung without an error of its own"), last
    assert last.endswith(
        f"resume from {out / 'checkpoints' / 'step_000000020'} with checkpoint.resume=auto"
    ), last

    again = slurm_cluster.submit(logs, *args)  # the same command: resumes from the last checkpoint
    job = slurm_cluster.wait(again)
    text = log_of(logs, again)
    assert job["JobState"] == "COMPLETED", text[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000000020'} at step 20" in text
    want, got = losses(reference[0]), losses(out)
    assert all(got[s] == want[s] for s in range(1, STEPS + 1))


def test_hung_rank_fails_the_job_after_the_collective_timeout(slurm_cluster, data, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    job_id = slurm_cluster.submit(
        logs, *sbatch_train(slurm_cluster, data, out, f"train.collective_timeout_s={HANG_S}")
    )
    wait_for_step(out, 5)
    pid, _ = rank_process(job_id, 1)
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the timeout can notice
    job = slurm_cluster.wait(job_id, 120)
    elapsed = time.monotonic() - stopped
    text = log_of(logs, job_id)
    assert job["JobState"] == "FAILED", text[-3000:]
    assert HANG_S - 1 < elapsed < HANG_S + 20, elapsed
    print(f"job ended {elapsed:.1f} s after SIGSTOP of rank 1 (timeout {HANG_S} s)")
    assert f"Timed out waiting {HANG_S * 1000}ms" in text
    assert "error: rank 0/2 on host " in text and "a collective failed" in text
    assert text.strip().splitlines()[-1].startswith("error: a rank died or hung"), text[-2000:]


def test_single_process_stage_runs_on_one_node(slurm_cluster, reference, data, tmp_path):
    checkpoint = reference[0] / "checkpoints" / f"step_{STEPS:09d}"
    logs = tmp_path / "logs"
    job_id = slurm_cluster.submit(
        logs, "eval", "--checkpoint", str(checkpoint), "--data", str(data), "--max-batches", "2"
    )
    job = slurm_cluster.wait(job_id)
    text = log_of(logs, job_id)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "1", text[-3000:]
    assert '"perplexity"' in text
