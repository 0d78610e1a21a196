"""Errors that end a compile with one clear line: what went wrong and how to fix it."""


class LwqcError(Exception):
    """A user-facing error; the CLI prints its message as one line and exits non-zero."""


class ModelLoadError(LwqcError):
    """The model path or id cannot be loaded, or its architecture is not supported."""


class NonFiniteWeightError(LwqcError):
    """A weight holds NaN or Inf values."""


class PlanError(LwqcError):
    """A plan file is missing, corrupt, or does not match the model."""


class BudgetError(LwqcError):
    """The requested budget cannot be met by any plan."""


class PipelineError(LwqcError):
    """The pipeline text is malformed, names an unknown pass, or breaks a pass contract."""
