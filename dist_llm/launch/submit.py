"""`dist-llm submit`: run any stage as a submitit job on SLURM, locally, or in this process.

    dist-llm submit --nodes 2 --gpus-per-node 8 --partition gpu train --config F train.steps=1000
    dist-llm submit --config F --nodes 2 --gpus-per-node 8 train.steps=1000      (train is implied)
    dist-llm submit --cluster local --tasks-per-node 2 --wait train --config F
    dist-llm submit --partition cpu prune --checkpoint C --out D --method wanda --data S

submitit's model is one task per GPU (`--ntasks-per-node` = GPUs per node): every task is one
rank, and `StageJob` turns submitit's JobEnvironment into the RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT that dist_llm/distributed.py reads, exactly as torchrun would, then
runs the stage's run function from the registry (dist_llm/stages.py), as `dist-llm <stage>` does.
Stages the registry marks `distributed` (train, distill, dpo) run on every task; the others (prune,
quantize, eval, ...) get one task.

Preemption and time limits: SLURM sends submitit's signal (USR2, `--signal-delay-s` before the
end) to every task. The trainer's handler (dist_llm/train/preemption.py) records it, all ranks
agree at the next step boundary and save a checkpoint, and only then is submitit's own handler
called: it asks `StageJob.checkpoint()` for the job to run next (the same stage with
`checkpoint.resume=auto`), requeues the job and exits. The requeued job resumes exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dist_llm import stages


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


def stage_argv(args: argparse.Namespace) -> tuple[list[str], stages.Stage]:
    """The stage's own command line and its registry entry, checked before anything is submitted."""
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
    stage, parsed = stages.parse(command)  # argument errors now, not in the queue
    if stage.distributed:  # the training stages: --config F and overrides
        load_config(parsed.config, parsed.overrides)  # config errors now, not in the queue
    return command, stage


def layout(args: argparse.Namespace, stage: stages.Stage) -> tuple[int, int]:
    """(nodes, tasks per node): one task per rank for a distributed stage, else a single task."""
    if not stage.distributed:
        return 1, 1
    return args.nodes, args.tasks_per_node or args.gpus_per_node or 1


def make_executor(args: argparse.Namespace, stage: stages.Stage):
    import submitit

    from dist_llm.config import ConfigError

    cluster = args.cluster or submitit.AutoExecutor.which()
    if cluster != "slurm" and args.nodes > 1:
        raise ConfigError(f"--nodes {args.nodes} needs --cluster slurm; the {cluster} cluster has one")
    nodes, tasks = layout(args, stage)
    if cluster == "debug" and tasks * nodes > 1:
        raise ConfigError("--cluster debug runs one task in this process; use --cluster local for several")
    executor = submitit.AutoExecutor(folder=Path(args.folder), cluster=cluster)
    params: dict = {
        "name": args.name,
        "nodes": nodes,
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
    from dist_llm.launch.job import StageJob  # imports submitit: not for `dist-llm --help`

    command, stage = stage_argv(args)
    executor = make_executor(args, stage)
    job = executor.submit(StageJob(command))
    print(f"submitted job {job.job_id} ({executor.cluster}): dist-llm {' '.join(command)}", file=sys.stderr)
    print(f"logs: {job.paths.stdout}", file=sys.stderr)
    if args.wait:
        print(json.dumps(job.results()[0], indent=2))  # rank 0's
    else:
        print(job.job_id)


SUBMIT = stages.Stage(
    "submit", "run any stage as a submitit job: SLURM, local processes, in process", add_arguments, cmd_submit
)
