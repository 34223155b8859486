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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dist_llm.distributed import World, all_reduce_sum, barrier
from dist_llm.errors import Preempted

SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")
REQUEUE_ON = "SIGUSR1"


class StopSignals:
    """Records stop signals in a handler; `agreed()` turns them into one decision for all ranks."""

    def __init__(self) -> None:
        self.received: set[str] = set()
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> StopSignals:
        """Catch SIGUSR1/SIGUSR2/SIGTERM from now on, until `restore()`.

        Only the main thread may install signal handlers; elsewhere (a thread that calls
        run_train) the run simply cannot be stopped by a signal."""
        self = cls()
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if name not in self.received:
            self.received.add(name)
            message = (
                f"dist-llm rank {os.environ.get('RANK', '0')}: {name}: stopping at the next step boundary\n"
            )
            os.write(2, message.encode())  # no logging/print locks inside a signal handler

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def agreed(self, world: World) -> list[str]:
        """A collective (every rank calls it at the same step): the signals any rank received."""
        votes = all_reduce_sum([float(name in self.received) for name in SIGNALS], world)
        return [name for name, count in zip(SIGNALS, votes, strict=True) if count > 0]

    def stop(self, signals: list[str], engine, config, world: World, layout, step: int, tokens: int,
             loader, tokenizer_dir, last_good: Path | None, metrics) -> None:  # fmt: skip
        """Save (unless this step was just saved), requeue if asked to, and raise Preempted."""
        from dist_llm.train import checkpoint

        if last_good is None or Path(last_good).name != f"step_{step:09d}":
            last_good = checkpoint.save(
                engine, config, world, layout, step, tokens, loader.state_dict(), tokenizer_dir
            )
        requeued = _requeue(signals, world)
        # Nobody exits before the requeue was asked for: a launcher that sees one rank end
        # (torchrun, srun --kill-on-bad-exit) may kill the others at once.
        barrier()
        what = f"requeued job {os.environ.get('SLURM_JOB_ID')}" if requeued else "run again to continue"
        message = f"{'/'.join(signals)} at step {step}: saved {last_good}; {what}"
        metrics.console(f"stopped: {message}")
        metrics.close()
        self.restore()
        raise Preempted(message, signals, Path(last_good), requeued)


def _requeue(signals: list[str], world: World) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if REQUEUE_ON not in signals or not job or os.environ.get("DIST_LLM_REQUEUE", "auto") == "never":
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
