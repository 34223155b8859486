"""Stop cleanly when the cluster says so: preemption, time limits, cancellation, dead ranks.

A scheduler warns a job before it takes the nodes away: `--signal=B:USR1@120` in
slurm/dist-llm.sbatch, USR2 under submitit; preempting or cancelling sends SIGTERM and kills
KillWait seconds later. The signal reaches each rank at a different moment, often in the middle
of a collective, so the handler only records it. At every step boundary all ranks all-reduce
their flags and so see the request at the same step (nobody is left waiting in a collective that
the others skipped); then every rank takes part in `checkpoint.save` (which resumes bit-exactly)
and the run ends with `Preempted`, which the CLI turns into exit status 75 (EX_TEMPFAIL).

Requeue: after USR1 under SLURM, rank 0 runs `scontrol requeue $SLURM_JOB_ID` once the
checkpoint is complete, and the requeued job continues from it (`checkpoint.resume: auto`).
SIGTERM saves but never requeues: it is also what `scancel` sends, and a scheduler that preempts
with requeue requeues by itself. Launchers that requeue themselves (submitit, through its
`checkpoint()` hook) set DIST_LLM_REQUEUE=never.

Deadlines (`Deadline`) are votes in the same agreement. `train.max_minutes` is the user's budget:
the run saves and ends as finished (exit 0). Under SLURM the job's end time minus
`train.slurm_margin_minutes` is the scheduler's limit: handled as its time-limit warning (save,
requeue, exit 75), because the work is not done; it also covers jobs submitted without `--signal`
and steps or saves too long for the signal's lead time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from dist_llm.distributed import World, all_reduce_sum, barrier
from dist_llm.errors import Preempted
from dist_llm.signals import SIGNALS, SignalRecord, take_early

BUDGET = "max_minutes"  # the user's wall-clock budget: stop as finished
TIME_LIMIT = "slurm_time_limit"  # the job's end time is near: stop, save and requeue
REQUEUE_ON = ("SIGUSR1", TIME_LIMIT)


class StopSignals(SignalRecord):
    """Records stop signals in a handler; `agreed()` turns them into one decision for all ranks."""

    @classmethod
    def install(cls) -> StopSignals:
        """Catch SIGUSR1/SIGUSR2/SIGTERM from now on, until `restore()`, keeping any that
        arrived since the CLI started recording (dist_llm/signals.py)."""
        self = cls()
        SignalRecord.install(self)  # first, so that no signal falls between the two records
        early = take_early()
        if early is not None:
            self.take_over(early)
        return self

    def agreed(self, world: World, deadline: Deadline | None = None) -> list[str]:
        """A collective (every rank calls it at the same step): the signals any rank received,
        and the deadlines any rank's clock has passed."""
        passed = deadline.passed() if deadline is not None else ()
        names = (*SIGNALS, BUDGET, TIME_LIMIT)
        votes = all_reduce_sum([float(name in self.received or name in passed) for name in names], world)
        return [name for name, count in zip(names, votes, strict=True) if count > 0]

    def stop(self, signals: list[str], run) -> None:
        """Save `run` (a train.state.Run; unless this step was just saved), requeue if asked to,
        and raise Preempted."""
        last_good = run.save(wait=True)
        requeued = _requeue(signals, run.world)
        # Nobody exits before the requeue was asked for: a launcher that sees one rank end
        # (torchrun, srun --kill-on-bad-exit) may kill the others at once.
        barrier()
        what = f"requeued job {os.environ.get('SLURM_JOB_ID')}" if requeued else "run again to continue"
        message = f"{'/'.join(signals)} at step {run.step}: saved {last_good}; {what}"
        run.metrics.console(f"stopped: {message}")
        run.metrics.close()
        self.restore()
        raise Preempted(message, signals, Path(last_good), requeued)


def _requeue(signals: list[str], world: World) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if not set(REQUEUE_ON) & set(signals) or not job or os.environ.get("DIST_LLM_REQUEUE", "auto") == "never":
        return False
    if not world.is_main:
        return True
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(
            f"dist-llm: scontrol requeue {job} failed: {exc}; resubmit the job to continue", file=sys.stderr
        )
        return False
    if proc.returncode != 0:
        print(
            f"dist-llm: scontrol requeue {job} failed ({proc.stderr.strip()}); resubmit the job to continue",
            file=sys.stderr,
        )
        return False
    return True


class Deadline:
    """Wall-clock limits of this run, as `time.monotonic()` instants (None: no such limit)."""

    def __init__(self, budget_at: float | None, time_limit_at: float | None, describe: str):
        self.budget_at, self.time_limit_at, self.description = budget_at, time_limit_at, describe

    @classmethod
    def for_run(cls, train, world: World, started: float) -> Deadline:
        """`train.max_minutes` from `started`, and the SLURM job's end time (asked of SLURM by
        rank 0 only, so that a large job does not send every rank to the controller)."""
        parts = []
        budget_at = None
        if train.max_minutes > 0:
            budget_at = started + 60 * train.max_minutes
            parts.append(f"budget train.max_minutes={train.max_minutes:g}")
        (end,) = all_reduce_sum([(slurm_end_time() or 0.0) if world.is_main else 0.0], world)
        time_limit_at = None
        if end and train.slurm_margin_minutes > 0:
            time_limit_at = time.monotonic() + (end - time.time()) - 60 * train.slurm_margin_minutes
            parts.append(
                f"SLURM job ends {datetime.fromtimestamp(end):%Y-%m-%d %H:%M:%S}: save and requeue "
                f"{train.slurm_margin_minutes:g} min before (train.slurm_margin_minutes)"
            )
        return cls(budget_at, time_limit_at, "; ".join(parts))

    def passed(self) -> tuple[str, ...]:
        now = time.monotonic()
        limits = ((BUDGET, self.budget_at), (TIME_LIMIT, self.time_limit_at))
        return tuple(name for name, at in limits if at is not None and now >= at)


def slurm_end_time() -> float | None:
    """The SLURM job's end time (seconds since the epoch), or None outside SLURM or without a
    time limit. Newer SLURM exports it; older ones (22.05) answer through squeue."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(os.environ["SLURM_JOB_END_TIME"])
    try:
        proc = subprocess.run(
            ["squeue", "--noheader", "--jobs", job, "--format", "%e"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_slurm_time(proc.stdout.strip()) if proc.returncode == 0 else None


def parse_slurm_time(text: str) -> float | None:
    """squeue's `%e`: local time as 2026-12-01T23:00:00, or N/A / Unknown / NONE without a limit."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
