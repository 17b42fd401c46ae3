"""The project's one exception type for errors a user can cause, and its specialisations.

The message always says what to do. The UI shows it as is; the CLI prints it without a traceback.
"""


class LoraStudioError(Exception):
    """An error the user can fix: the message says how."""


class ConfigError(LoraStudioError, ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


class ModelLoadError(LoraStudioError):
    """A base model could not be found or loaded; the message names it and what was tried."""


class DatasetError(LoraStudioError):
    """The dataset cannot be used for training (no images, unreadable folder, ...).

    `report` is the intake report (lora_trainer.intake.IntakeReport) when intake raised it.
    """

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


class TrainingFailed(LoraStudioError):
    """Training could not go on (the loss became NaN, an image vanished, ...); `hint` says what to change."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class DiskFullError(LoraStudioError):
    """The disk a run writes to has no room for what it must write; the message says where and how much."""

    def __init__(self, message: str, hint: str = "free space on that disk (or set output.keep_checkpoints), then start again"):
        super().__init__(message)
        self.hint = hint
