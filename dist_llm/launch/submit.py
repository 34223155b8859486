"""`dist-llm submit`: run any stage as a submitit job on SLURM, locally, or in this process.

    dist-llm submit --nodes 2 --gpus-per-node 8 --partition gpu train --config F train.steps=1000
    dist-llm submit --config F --nodes 2 --gpus-per-node 8 train.steps=1000      (train is implied)
    dist-llm submit --cluster local --tasks-per-node 2 --wait train --config F
    dist-llm submit --partition cpu prune --checkpoint C --out D --method wanda --data S

submitit's model is one task per GPU (`--ntasks-per-node` = GPUs per node): every task is one
rank, and `StageJob` turns submitit's JobEnvironment into the RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT that dist_llm/distributed.py reads, exactly as torchrun would. Stages
that do not train (prune, quantize, eval, ...) get one task.

Preemption and time limits: SLURM sends submitit's signal (USR2, `--signal-delay-s` before the
end) to every task. The trainer's handler (dist_llm/train/preemption.py) records it, all ranks
agree at the next step boundary and save a checkpoint, and only then is submitit's own handler
called: it asks `StageJob.checkpoint()` for the job to run next (the same stage with
`checkpoint.resume=auto`), requeues the job and exits. The requeued job resumes exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

TRAINING = ("train", "distill")  # stages that run on every rank; the others run on one task


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], help="default: slurm if srun exists")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU nodes")
    p.add_argument(
        "--tasks-per-node", type=int, default=0, help="ranks per node (default: --gpus-per-node, or 1)"
    )
    p.add_argument("--cpus-per-task", type=int, default=0, help="0 = the cluster's default")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--time", type=int, default=240, help="time limit in minutes")
    p.add_argument(
        "--signal-delay-s", type=int, default=120, help="warning before the time limit: one step + one save"
    )
    p.add_argument("--name", default="dist-llm")
    p.add_argument("--folder", default="runs/submitit/%j", help="submitit's logs and pickles (%%j = job id)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's result")
    p.add_argument("--config", help="shorthand for `train --config F`: the rest are its overrides")
    p.add_argument("command", nargs=argparse.REMAINDER, help="STAGE [its arguments] (default stage: train)")


def stage_argv(args: argparse.Namespace) -> list[str]:
    """The stage's own command line, checked before anything is submitted."""
    from dist_llm.cli import build_parser
    from dist_llm.config import ConfigError, load_config

    command = list(args.command)
    if command and "=" not in command[0] and not command[0].startswith("-"):  # a stage name
        if args.config:
            command[1:1] = ["--config", args.config]
    elif args.config:
        command = ["train", "--config", args.config, *command]
    else:
        raise ConfigError("dist-llm submit: name a stage (e.g. `train --config F`) or give --config F")
    if command[0] in ("submit", "config", "plan"):
        raise ConfigError(f"dist-llm submit: `{command[0]}` runs where you are; there is nothing to submit")
    parsed = build_parser().parse_args(command)  # argument errors now, not in the queue
    if command[0] in TRAINING:
        load_config(parsed.config, parsed.overrides)  # config errors now, not in the queue
    return command


def make_executor(args: argparse.Namespace, stage: str):
    import submitit

    from dist_llm.config import ConfigError

    cluster = args.cluster or submitit.AutoExecutor.which()
    if cluster != "slurm" and args.nodes > 1:
        raise ConfigError(f"--nodes {args.nodes} needs --cluster slurm; the {cluster} cluster has one")
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    if stage not in TRAINING:
        args.nodes, tasks = 1, 1
    if cluster == "debug" and tasks * args.nodes > 1:
        raise ConfigError("--cluster debug runs one task in this process; use --cluster local for several")
    executor = submitit.AutoExecutor(folder=Path(args.folder), cluster=cluster)
    params: dict = {
        "name": args.name,
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "timeout_min": args.time,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if executor.cluster == "slurm":
        params.update(slurm_signal_delay_s=args.signal_delay_s, slurm_additional_parameters={"requeue": True})
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
    executor.update_parameters(**params)
    return executor


def cmd_submit(args: argparse.Namespace) -> None:
    command = stage_argv(args)
    executor = make_executor(args, command[0])
    job = executor.submit(StageJob(command))
    print(f"submitted job {job.job_id} ({executor.cluster}): dist-llm {' '.join(command)}", file=sys.stderr)
    print(f"logs: {job.paths.stdout}", file=sys.stderr)
    if args.wait:
        print(json.dumps(job.results()[0], indent=2))  # rank 0's
    else:
        print(job.job_id)


class StageJob:
    """The callable submitit pickles and runs on every task; `checkpoint()` is submitit's hook."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> dict | None:
        import submitit

        from dist_llm.errors import Preempted

        env = submitit.JobEnvironment()
        stage = self.argv[0]
        if stage in TRAINING and env.cluster != "debug":
            os.environ.update(world_environment(env))
        elif env.global_rank != 0:
            return None
        # submitit requeues (below, through its own handler), so the trainer must not.
        os.environ["DIST_LLM_REQUEUE"] = "never"
        their_signal = getattr(signal, "SIG" + env.USR_SIG)
        their_handler = signal.getsignal(their_signal)  # submitit's checkpoint-and-requeue
        try:
            return run_stage(self.argv)
        except Preempted as exc:
            if their_signal.name in exc.signals and callable(their_handler):
                # The checkpoint is complete on every rank: now let submitit call checkpoint()
                # and requeue (rank 0), which ends this process.
                their_handler(their_signal, None)
            raise

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or timeout, after the trainer saved: run the same
        stage again, continuing from the newest checkpoint whatever the first start said."""
        import submitit

        argv = self.argv + (["checkpoint.resume=auto"] if self.argv[0] in TRAINING else [])
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


def run_stage(argv: list[str]) -> dict | None:
    """Run one stage in this process; training stages return their result dict."""
    from dist_llm.cli import build_parser
    from dist_llm.config import load_config

    args = build_parser().parse_args(argv)
    if args.stage == "train":
        from dist_llm.train.loop import run_train

        return run_train(load_config(args.config, args.overrides))
    if args.stage == "distill":
        from dist_llm.compress.distill import prepare, run_distill

        config = load_config(args.config, args.overrides)
        prepare(config)
        return run_distill(config)
    args.func(args)
    return None
