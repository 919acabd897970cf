"""Errors of the training code. Each message names the problem and the fix."""


class TrainingError(RuntimeError):
    """A run that cannot start or continue; nothing was written that is half-done."""


class ConfigMismatchError(TrainingError):
    """The settings of a resumed run differ from the ones its checkpoint was trained with."""


class CheckpointWriteError(TrainingError):
    """Writing a checkpoint failed (e.g. a full disk); the previous checkpoint is intact."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN/inf; the run stopped without saving the bad state."""


class TrainingStopped(TrainingError):
    """The run was interrupted (Ctrl-C) and saved a checkpoint to resume from."""

    exit_code = 130
