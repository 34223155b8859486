"""Errors that stages raise for the person running them; the CLI prints them without a traceback."""


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
