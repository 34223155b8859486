"""A rank that dies or hangs must end the job, not leave the others waiting forever, and the job
must end with one line that says what failed and where to continue from.

A rank that dies (killed, out of memory, a lost node) closes its connections: the others fail in
their next collective at once. A rank that hangs (a stuck filesystem, a frozen GPU, a node that
drops off the network without closing anything) is only noticed by the collective timeout,
`train.collective_timeout_s`. Either way every failing rank prints its traceback and then one
`error:` line: its rank and host, the step it failed in, the last completed step and the
checkpoint to resume from. Under torchrun the same line goes into the worker's error file
(TORCHELASTIC_ERROR_FILE), so torchrun's summary shows it as the root cause and `dist-llm
launch` prints it last (launch/torchrun.py). Each rank also leaves it in the run folder
(`<train.out_dir>/failures/`), where a launcher on any node (the sbatch script through `dist-llm
launch --explain`) finds the rank that failed first across all nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from dist_llm.errors import tell_launcher
from dist_llm.files import write_json_atomic

# Words of the errors a rank gets when another rank died or hangs (gloo, NCCL, c10d).
COLLECTIVE_WORDS = ("gloo", "nccl", "timed out", "timeout", "connection", "peer")
# A rank failing because another one died waits this long before it exits, so that torchrun,
# which takes the first failure it sees as the root cause, sees the rank that died first.
CONSEQUENCE_DELAY_S = 1.0

_run = None  # the training run, once it exists: its step and last good checkpoint


def watch(timeout_s: float) -> None:
    """Before the process group starts: set the collective timeout for every group, and report
    uncaught errors with this rank's number and host."""
    import torch.distributed.distributed_c10d as c10d

    # init_process_group's timeout covers only the default group; DeepSpeed builds its
    # data-parallel and ZeRO groups with new_group(), which takes torch's 30-minute default
    # (10 for NCCL) unless told otherwise. Replacing the default covers them all.
    timeout = datetime.timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    if sys.excepthook is not report:
        sys.excepthook = report


def track(run) -> None:
    """From here on a crash names `run`'s step and its last good checkpoint (train/state.py),
    and is recorded in the run folder; records of an earlier start are removed."""
    global _run
    _run = run
    if run.world.is_main:
        shutil.rmtree(records_dir(run.config.train.out_dir), ignore_errors=True)


def records_dir(out_dir) -> Path:
    return Path(out_dir) / "failures"


def keep(record: dict, out_dir) -> None:
    """The record in the run folder (shared by every node, as the checkpoints are)."""
    with contextlib.suppress(OSError):  # the run folder is what failed (a full disk): still printed
        records_dir(out_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(records_dir(out_dir) / f"rank_{record['rank']:05d}.json", record)


def first_failure(out_dir, since: float = 0.0) -> tuple[dict | None, list[dict]]:
    """(the record of the rank that failed first, not because another did, or None; all records),
    of failures at or after `since` (Unix time)."""
    records = []
    for path in sorted(records_dir(out_dir).glob("rank_*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    records = [r for r in records if r.get("time", 0) >= since]
    causes = [r for r in records if not r.get("consequence")]
    return (min(causes, key=lambda r: r["time"]) if causes else None), records


def inject(run) -> None:
    """Fault injection for tests: DIST_LLM_FAULT=raise:<step>:<rank> raises in that rank's step."""
    point = os.environ.get("DIST_LLM_FAULT", "")
    if point == f"raise:{run.step + 1}:{run.world.rank}":
        raise RuntimeError(f"injected fault (DIST_LLM_FAULT={point})")


def is_consequence(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank died or hangs."""
    return any(word in str(exc).lower() for word in COLLECTIVE_WORDS)


def describe(exc: BaseException, run=None) -> dict:
    """What the last line says, as data: `dist-llm launch` rebuilds the line from it."""
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "error": f"{type(exc).__name__}: {exc}".strip(),
        "consequence": is_consequence(exc),
        "time": time.time(),
    }
    if run is not None:
        record.update(step=run.step + 1, completed=run.step, checkpoint=str(run.last_good or "") or None)
    return record


def last_line(record: dict) -> str:
    """`error: rank 1/2 on host h failed at step 7 (last completed step 6): ...; resume from C ...`"""
    line = f"error: rank {record['rank']}/{record['world_size']} on host {record['host']} failed"
    if "step" in record:
        line += f" at step {record['step']} (last completed step {record['completed']})"
    else:
        line += " before the first step"
    line += f": {first_line(record['error'])}"
    if record["consequence"]:
        line += " (a collective failed: another rank died or hangs, the launcher names the first to fail)"
    return line + "; " + resume_advice(record.get("checkpoint"))


def resume_advice(checkpoint: str | None) -> str:
    if checkpoint:
        return f"resume from {checkpoint} with checkpoint.resume=auto"
    return "no checkpoint was saved yet: running again starts afresh"


def first_line(text: str, limit: int = 300) -> str:
    """One line of an exception's text (gloo's and NCCL's run over several)."""
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 3] + "..."


def report(exc_type, exc, tb) -> None:
    """sys.excepthook while training: the traceback, then the one line that explains it."""
    sys.__excepthook__(exc_type, exc, tb)
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: nothing to explain
        return
    record = describe(exc, _run)
    line = last_line(record)
    tell_launcher(line, record)
    if _run is not None:
        keep(record, _run.config.train.out_dir)
    if record["consequence"] and record["world_size"] > 1:
        time.sleep(CONSEQUENCE_DELAY_S)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
