"""The few exceptions finpipe raises on purpose; the CLI turns each into one clear line."""

from __future__ import annotations


class FinpipeError(Exception):
    """Base class: a failure the user can act on, with a message that says how.

    `transient` errors (a server that blinked) are worth retrying; the others fail the same
    way every time, so orchestration should not retry them.
    """

    transient = False


class ConfigError(FinpipeError):
    """A setting, parameter or config file is wrong (unknown domain, bad date range, ...)."""


class InputFileError(FinpipeError):
    """A delivered file cannot be read at all (missing, empty, corrupt, wrong format)."""


class ValidationFailed(FinpipeError):
    """A batch broke data-quality rules; it has been quarantined with a report."""

    def __init__(self, message: str, *, quarantine_path: str | None = None) -> None:
        super().__init__(message)
        self.quarantine_path = quarantine_path


class ModelRejected(FinpipeError):
    """A trained model failed a sanity gate (NaN or constant predictions, bad signature)."""


class ScoringError(FinpipeError):
    """Scoring cannot proceed: no champion model, or features that do not match it."""


class StorageError(FinpipeError):
    """Reading or writing the storage root failed (permissions, disk full); nothing partial."""


class StoreUnavailable(StorageError):
    """The object store holding the storage root did not answer; worth retrying."""

    transient = True


class TrackingUnavailable(FinpipeError):
    """The MLflow tracking server cannot be reached; worth retrying."""

    transient = True


class NothingToTrain(FinpipeError):
    """No row qualifies for training at the date (e.g. no loan's outcome window has passed).

    A nightly goes on without retraining and scores with the champion, with a warning saying
    why; a retrain asked for on its own (the train flow) fails with this message."""
