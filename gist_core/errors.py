"""Errors the CLI turns into one clear line and a non-zero exit code."""


class GistError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, unknown model)."""


class ConfigError(GistError):
    """params.yaml or an override is malformed; the message names the file and key."""


class DataError(GistError):
    """Input data is missing or unusable as a whole; the message names the file (and row)."""


class ModelError(GistError):
    """A model cannot be resolved, provisioned or loaded."""


class EvaluationError(GistError):
    """An evaluation task cannot be built or run."""


class RegistryError(GistError):
    """The MLflow tracking store or registry refused an operation."""


class VersioningError(GistError):
    """DVC or git failed while versioning data."""
