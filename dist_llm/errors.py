"""Errors that stages raise for the person running them; the CLI prints them without a traceback."""

import json
import os
import time


class InputError(ValueError):
    """Bad input data; the message names the file and says what to do."""


class OutputExists(InputError):
    """`--out` names something the stage will not replace (not its own kind of output, or its
    own kind without --overwrite); the message names the path and the rule."""


class CheckpointError(RuntimeError):
    """A missing, partial, foreign or mismatched checkpoint; the message says what differs."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run again to continue


class Preempted(RuntimeError):
    """Stopped at a step boundary on a signal (preemption, time limit, cancel) after saving a
    checkpoint; the message names the signal, the checkpoint and whether the job was requeued."""

    def __init__(self, message: str, signals: list[str], checkpoint, requeued: bool):
        super().__init__(message)
        self.signals, self.checkpoint, self.requeued = signals, checkpoint, requeued


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def tell_launcher(message: str, details: dict | None = None) -> None:
    """Leave `message` where torchrun's agent reads why a worker failed: the file named by
    TORCHELASTIC_ERROR_FILE, which torchrun (and accelerate launch, through it) gives every
    worker. torchrun's summary then shows this line instead of a link to its docs, and `dist-llm
    launch` prints it (with `details`, dist-llm's own fields) as the job's last line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # torchrun's own layout (its ErrorHandler.record_exception); the summary shows py_callstack.
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    data = {"message": {"message": message, "extraInfo": info}, "dist_llm": details or {}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the launcher's folder is gone: the line is still printed
        pass
