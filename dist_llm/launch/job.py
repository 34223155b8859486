"""What runs on every task of a `dist-llm submit` job (see submit.py): the distributed
environment from submitit's JobEnvironment, the stage's run function from the registry (the same
one `dist-llm <stage>` calls), and submitit's checkpoint() hook."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import submitit

from dist_llm import stages
from dist_llm.train.preemption import TIME_LIMIT


class StageJob(submitit.helpers.Checkpointable):
    """The callable submitit pickles and runs on every task; `checkpoint()` is submitit's hook."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> dict | None:
        from dist_llm.errors import Preempted

        stage, args = stages.parse(self.argv)
        env = submitit.JobEnvironment()
        if stage.distributed and env.cluster != "debug":
            os.environ.update(world_environment(env))
        elif env.global_rank != 0:
            return None
        # submitit requeues (below, through its own handler), so the trainer must not.
        os.environ["DIST_LLM_REQUEUE"] = "never"
        their_signal = getattr(signal, "SIG" + env.USR_SIG)
        their_handler = signal.getsignal(their_signal)  # submitit's checkpoint-and-requeue
        try:
            return stage.run(args)  # as `dist-llm <stage>` runs it: accelerate settings, checks, output
        except Preempted as exc:
            # Their signal, or the job's end time near (train.slurm_margin_minutes, which may
            # come before their signal): the checkpoint is complete on every rank, so let
            # submitit call checkpoint() and requeue (rank 0), which ends this process.
            wants_requeue = their_signal.name in exc.signals or TIME_LIMIT in exc.signals
            if wants_requeue and callable(their_handler):
                their_handler(their_signal, None)
            raise

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or timeout, after the trainer saved: run the same
        stage again, continuing from the newest checkpoint whatever the first start said."""
        stage, _ = stages.parse(self.argv)
        argv = self.argv + (["checkpoint.resume=auto"] if stage.distributed else [])
        return submitit.helpers.DelayedSubmission(StageJob(argv))

    def __repr__(self) -> str:
        return f"StageJob({self.argv!r})"


def world_environment(env) -> dict[str, str]:
    """torchrun's variables from submitit's JobEnvironment (one task = one rank)."""
    per_node = env.num_tasks // env.num_nodes
    master = "127.0.0.1" if env.cluster == "local" else node_address(env.hostnames[0])
    job = "".join(ch for ch in str(env.job_id) if ch.isdigit()) or "0"
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(per_node),
        "NODE_RANK": str(env.node),
        "MASTER_ADDR": master,
        # The same on every task without talking to each other; a requeued job keeps its id.
        "MASTER_PORT": os.environ.get("MASTER_PORT", str(20000 + int(job) % 20000)),
    }


def node_address(host: str) -> str:
    """An address for a SLURM node name: DNS if it resolves, else SLURM's own NodeAddr."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        pass
    out = subprocess.run(
        ["scontrol", "show", "node", host], capture_output=True, text=True, timeout=60
    ).stdout
    for item in out.split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1]
    raise RuntimeError(f"cannot resolve the first node {host!r} of the job, and scontrol knows no NodeAddr")
