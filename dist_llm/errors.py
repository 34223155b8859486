"""Errors that stages raise for the person running them; the CLI prints them without a traceback."""


class CheckpointError(RuntimeError):
    """A missing, partial, foreign or mismatched checkpoint; the message says what differs."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""
