"""Errors that are the user's to fix: the CLI prints their message alone, without a traceback."""


class DataError(ValueError):
    """Bad user data. The message names the file (or dataset), the row (1-based) and the field."""


class ModelLoadError(RuntimeError):
    """The base model or tokenizer cannot be loaded (offline and not cached, bad path, bad LoRA targets, ...)."""


class ConfigError(ValueError):
    """A setting out of its range, or settings that contradict each other; the message names the flag."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked: in use, holding another run, a damaged or missing checkpoint,
    a full disk. The message names the directory or file and what to do."""


class TrainingDiverged(RuntimeError):
    """The loss or a gradient stopped being a finite number. The message names the step, the value and what to
    try; the run's checkpoint and adapter stay at the last step saved before it."""


class RunFinished(Exception):
    """`--ckpt_path last` on a run that already reached the end of its schedule: nothing to train, not an error."""


USER_ERRORS = (DataError, ModelLoadError, ConfigError, RunDirError, TrainingDiverged)
