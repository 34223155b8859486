"""Drive the local SLURM cluster (slurm/local-cluster) from tests: submit, watch, signal."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from ..launch_util import REPO, job_env
from ..reference import train_losses

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


class Cluster:
    def __init__(self, state: Path, mode: str, gpus: bool):
        self.state, self.mode, self.gpus = state, mode, gpus

    def one_rank_per_node(self, launcher: str = "sbatch") -> list[str]:
        """Options for one rank on each node: one fake GPU each where the cluster has them."""
        if self.gpus:
            return ["--gpus-per-node", "1"]
        return ["--nproc-per-node", "1"] if launcher == "sbatch" else ["--tasks-per-node", "1"]

    def env(self, **extra: str) -> dict:
        env = job_env(**extra)
        env["SLURM_CONF"] = str(self.state / "etc" / "slurm.conf")
        env["PATH"] = f"{REPO / 'slurm' / 'local-cluster' / 'bin'}:{env['PATH']}"
        return env

    def run(self, *cmd: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, env=self.env(**extra), cwd=REPO, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def submit(self, log_dir: Path, *args: str, **env: str) -> str:
        """slurm/submit.sh on two nodes with one (fake) GPU each; returns the job id."""
        script = str(REPO / "slurm" / "submit.sh")
        return self.run(script, "--log-dir", str(log_dir), *args, **env).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: str, timeout: float = 300, until=lambda job: job["JobState"] in FINAL) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")

    def release(self, job_id: str) -> None:
        """SLURM holds a requeued job for about two minutes (Reason=BeginTime); start it sooner.

        Not at once: slurmd revokes the old run's credential with one-second resolution, and a
        relaunch within the same second is refused ("Job credential revoked": the job FAILS)."""
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def host_of(self, node: str) -> str:
        """The host torchrun names for a process on `node`: the node's own name in netns mode,
        else this machine's (as torchrun resolves it: socket.getfqdn())."""
        return node if self.mode == "netns" else socket.getfqdn()


def rank_process(job_id: str, rank: int, timeout: float = 60) -> tuple[int, str]:
    """(pid, node) of the training process with this RANK in this job (all nodes share /proc here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                raw = (proc / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
            if (
                env.get("SLURM_JOB_ID") == job_id
                and env.get("RANK") == str(rank)
                and "TORCHELASTIC_RUN_ID" in env
            ):
                return int(proc.name), env["SLURMD_NODENAME"]
        time.sleep(0.2)
    raise AssertionError(f"no process with RANK={rank} in job {job_id}")


losses = train_losses  # step -> train loss of a run folder


def wait_for_step(out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(losses(out), default=0) < step:
        if time.monotonic() > deadline:
            raise AssertionError(f"{out} did not reach step {step} in {timeout} s")
        time.sleep(0.05)


STEPS = 100
TIMEOUT_S = 20  # train.collective_timeout_s in these jobs
HANG_S = 8  # and in the job whose rank hangs


def train_args(data, out, *extra: str) -> list[str]:
    """`dist-llm train` arguments shared by every SLURM test run: ZeRO-2, fp32, 100 short steps."""
    return [
        "--config",
        "configs/tiny.yaml",
        f"data.sources=[{{path: '{data}'}}]",
        f"train.out_dir={out}",
        f"train.steps={STEPS}",
        "checkpoint.every=20",
        "logging.every=1",
        "logging.val_every=0",
        "parallel.zero_stage=2",
        "optim.lr=0.003",
        f"train.collective_timeout_s={TIMEOUT_S}",
        *extra,
    ]
