"""Stop signals (preemption, time limits, cancellation), recorded from the first moment of a
distributed stage.

A scheduler's signal can arrive while a rank is still importing torch and DeepSpeed, seconds
before the training loop exists. Its default action would end the process without a checkpoint,
so the CLI starts recording before the slow imports (`record_early`), and the trainer's own
record (train/preemption.py) takes over what was received. The handler only records: the
ranks act on it together at a step boundary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


class SignalRecord:
    """Records SIGUSR1/SIGUSR2/SIGTERM from `install()` until `restore()`."""

    def __init__(self) -> None:
        self.received: set[str] = set()
        self._previous: dict[int, object] = {}

    def install(self) -> SignalRecord:
        """Only the main thread may install signal handlers; elsewhere (a thread that calls
        run_train) the run simply cannot be stopped by a signal."""
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

    def take_over(self, earlier: SignalRecord) -> None:
        """Continue `earlier` (installed before this one): its signals, and the handlers it
        replaced, which `restore()` puts back."""
        self.received |= earlier.received
        self._previous = earlier._previous

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


_early: SignalRecord | None = None


def record_early() -> None:
    """Start recording now (the CLI, for a distributed stage, before its slow imports)."""
    global _early
    if _early is None:
        _early = SignalRecord().install()


def take_early() -> SignalRecord | None:
    """The record `record_early` started, handed over once (None if it was not started)."""
    global _early
    early, _early = _early, None
    return early


class Terminated(BaseException):
    """SIGTERM or SIGHUP in a stage that is not a training run: raised in the main thread so that
    the stage unwinds (its staging folder removed, nothing half-written left beside its output).
    A BaseException, so that no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def unwind_on_terminate():
    """Within: SIGTERM and SIGHUP raise `Terminated` (their default would end the process at
    once, leaving a hidden `.<out>.staging-*` folder of partial output behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
