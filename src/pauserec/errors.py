"""One error family for the whole toolkit.

Every message says what was wrong and what to do next. CLIs catch ``PauserecError``,
print its message and exit with code 2; anything else is a bug.
"""


class PauserecError(Exception):
    """Base class of every error pauserec raises on purpose."""


class DataError(PauserecError):
    """A dataset, catalog, SID index or input file is missing or malformed."""


class CheckpointError(PauserecError):
    """A model checkpoint cannot be used (architecture, tokenizer, training card)."""


class TrainError(PauserecError):
    """Training went wrong (the loss, gradients or weights became non-finite); no checkpoint was written."""


class ExportError(PauserecError):
    """Exporting or validating an engine failed."""


class EngineError(PauserecError):
    """An engine directory is missing, corrupt or of an unknown format version."""


class BackendUnavailable(PauserecError):
    """An explicitly requested implementation or backend is not installed or has no device."""


class JobError(PauserecError):
    """A batch job itself failed (engine, memory, disk); rows finished before are kept for --resume."""
