"""A rank that dies or hangs must end the job, not leave the others waiting forever.

A rank that dies (killed, out of memory, a lost node) closes its connections: the others fail in
their next collective at once, and torchrun's "Root Cause" block names the rank and host that
failed first. A rank that hangs (a stuck filesystem, a frozen GPU, a node that drops off the
network without closing anything) is only noticed by the collective timeout,
`train.collective_timeout_s`. Either way every surviving rank prints one line naming itself and
its host before its traceback, the launcher ends the job with a non-zero status, and running the
job again resumes from the last complete checkpoint (`checkpoint.resume: auto`).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys


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


def report(exc_type, exc, tb) -> None:
    """sys.excepthook while training: a line naming this rank and host, then the traceback."""
    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    line = (
        f"dist-llm: rank {rank}/{size} failed on host {socket.gethostname()} (pid {os.getpid()}): "
        f"{exc_type.__name__}: {exc}"
    )
    text = str(exc).lower()
    if any(word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection", "peer")):
        line += (
            "\n  a collective failed: another rank died or hangs (the launcher's first failure names it);"
            " run the job again to resume from the last checkpoint"
        )
    sys.stderr.write(line + "\n")
    sys.__excepthook__(exc_type, exc, tb)
