"""`dist-llm launch`: torchrun for a dist-llm stage, with the checks before any worker starts and
one explaining line at the end.

    dist-llm launch --nproc-per-node 8 train --config F train.steps=1000
    dist-llm launch --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        --rdzv-id JOB train --config F

What it adds to `torchrun -m dist_llm`:
- the stage's command line and its configuration, data and checkpoint checks (the ones that need
  no process group, train/start.py's `preflight`) run here, once, before a worker exists: a
  mistake is one `error:` line and exit status 2, as from `dist-llm train` in one process
  (torchrun would print it once per rank, then a traceback of its own, and exit 1);
- when a worker fails, torchrun's summary (its own traceback and a block per failed rank) is
  replaced by one line, the last of the job: the failed rank and host, the step it failed in,
  the last completed step and the checkpoint to resume from, read from the worker's torchrun
  error file (train/failures.py writes it) or, for a rank killed without one, from the run folder.
  The exit status is the failed worker's (2 for a user error, 1 for a crash).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time

from dist_llm import stages


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX (torchrun's --nnodes)")
    p.add_argument("--nproc-per-node", default="1", help="processes per node (a number, gpu, cpu or auto)")
    p.add_argument("--standalone", action="store_true", help="one node, a rendezvous of its own")
    p.add_argument("--rdzv-backend", default="static")
    p.add_argument("--rdzv-endpoint", default="")
    p.add_argument("--rdzv-id", default="none")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int)
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--check-only", action="store_true", help="run the checks, start nothing")
    p.add_argument(
        "--explain",
        action="store_true",
        help="start nothing: print the line of the run's first failed rank since --since (the sbatch script)",
    )
    p.add_argument("--since", type=float, default=0.0, help="with --explain: the launch's start (Unix time)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="STAGE [its arguments]: a distributed stage")


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The same options for torchrun, then `-m dist_llm STAGE ...`."""
    argv = [f"--nnodes={args.nnodes}", f"--nproc-per-node={args.nproc_per_node}"]
    if args.standalone:
        argv.append("--standalone")
    argv += [f"--rdzv-backend={args.rdzv_backend}", f"--rdzv-id={args.rdzv_id}"]
    if args.rdzv_endpoint:
        argv.append(f"--rdzv-endpoint={args.rdzv_endpoint}")
    argv += [f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}"]
    if args.master_port is not None:
        argv.append(f"--master-port={args.master_port}")
    return [*argv, f"--max-restarts={args.max_restarts}", "-m", "dist_llm", *args.command]


def world_size(targs) -> int:
    """Ranks in the job: the most nodes torchrun will wait for, times processes per node."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    return parse_min_max_nnodes(targs.nnodes)[1] * determine_local_world_size(targs.nproc_per_node)


@contextlib.contextmanager
def world_of(size: int):
    """WORLD_SIZE as the workers will see it, for the checks that depend on it."""
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(size)
    try:
        yield
    finally:
        if before is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = before


def cmd_launch(args: argparse.Namespace) -> None:
    from dist_llm.config import ConfigError, load_config

    started = time.time()
    if not args.command:
        raise ConfigError(
            "dist-llm launch: name a stage, e.g. `dist-llm launch --nproc-per-node 2 train --config F`"
        )
    stage, parsed = stages.parse(args.command)  # argument errors now, not once per rank
    if not stage.distributed:
        raise ConfigError(f"dist-llm launch: `{stage.name}` runs as one process; run `dist-llm {stage.name}`")
    if args.explain:
        line = explain_run(load_config(parsed.config, parsed.overrides), args.since)
        if line:
            print(line, file=sys.stderr)
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    targs = parse_args(torchrun_argv(args))
    with world_of(world_size(targs)):
        config = stage.check(parsed)
    if args.check_only:
        return
    try:
        run(targs)
    except ChildFailedError as exc:
        rank, failure = root_cause(exc.failures)
        print(explain(rank, failure, config, started), file=sys.stderr)
        raise SystemExit(failure.exitcode if failure.exitcode > 0 else 1) from None


def root_cause(failures: dict) -> tuple[int, object]:
    """The failure to name: torchrun takes the earliest by whole seconds and breaks ties by rank,
    so a rank that failed because another died can win; dist-llm's records say which did."""

    def order(item):
        rank, failure = item
        ours = dist_llm_record(failure)
        return (bool(ours.get("consequence")), ours.get("time", failure.timestamp), rank)

    return min(failures.items(), key=order)


def dist_llm_record(failure) -> dict:
    data = failure.error_file_data
    return data.get("dist_llm") or {} if isinstance(data, dict) else {}


def explain(rank: int, failure, config, since: float) -> str:
    """The job's last line: the worker's own when it failed first, else the run folder's record
    of the rank that did (on another node), else built here for a rank that died silently."""
    from dist_llm.train import failures

    ours = dist_llm_record(failure)
    if ours and not ours.get("consequence"):
        return failures.last_line(ours)
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else ""
    if message.startswith("error:") and not ours:  # a user error (cli.user_error), e.g. a diverged loss
        return message
    line = explain_run(config, since, silent=False)
    if line:
        return line
    if failure.exitcode < 0:
        what = f"was killed by signal {-failure.exitcode} ({signal_name(-failure.exitcode)})"
    else:
        what = f"exited with status {failure.exitcode}"
    return f"error: rank {rank} on host {socket.gethostname()} (pid {failure.pid}) {what}" + progress(
        config, since
    )


def explain_run(config, since: float, silent: bool = True) -> str | None:
    """From the run folder's failure records since `since`: the first failed rank's line; or,
    when every record is of a rank that failed because another died (`silent`), a line saying so."""
    from dist_llm.train import failures

    first, records = failures.first_failure(config.train.out_dir, since)
    if first is not None:
        return failures.last_line(first)
    if silent and records:
        return (
            "error: a rank died or hung without an error of its own (killed, out of memory, stuck, or its "
            "node was lost: torchrun's summary above names the first to end)" + progress(config, since)
        )
    return None


def progress(config, since: float) -> str:
    """`; the others stopped at step S (last completed step S-1); resume from C ...`"""
    from dist_llm.train import failures

    _, records = failures.first_failure(config.train.out_dir, since)
    steps = [r for r in records if "step" in r]
    text = ""
    if steps:
        first = min(steps, key=lambda r: r["step"])
        text = f"; the other ranks stopped at step {first['step']} (last completed step {first['completed']})"
    return text + "; " + failures.resume_advice(newest_checkpoint(config))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def newest_checkpoint(config) -> str | None:
    """The checkpoint `checkpoint.resume=auto` would take, from the run folder."""
    from dist_llm import checkpoint
    from dist_llm.errors import CheckpointError

    try:
        path, _ = checkpoint.newest_intact(checkpoint.checkpoint_root(config))
    except CheckpointError:
        return None
    return str(path) if path else None


LAUNCH = stages.Stage(
    "launch",
    "torchrun for train or distill: checks before the workers start, one line when one fails",
    add_arguments,
    cmd_launch,
)
