"""Typed errors of archnet_fx.

Every error a user can cause is one of these, and its message says what was wrong and how to fix
it. They subclass the builtin exception a caller would naturally catch (``ValueError``,
``TypeError``, ``RuntimeError``) so generic handlers keep working.
"""


class ArchnetError(Exception):
    """Base class of every archnet_fx error."""


class TargetError(ArchnetError, ValueError):
    """Unknown target name or malformed target description file."""


class BitWidthError(TargetError):
    """Requested weight/activation bit width that the target cannot do."""


class CaptureError(ArchnetError, RuntimeError):
    """The model could be captured neither by torch.fx nor by torch.export."""


class InputError(ArchnetError, ValueError):
    """Example inputs or runtime inputs of the wrong kind or shape."""


class ChoiceError(ArchnetError, ValueError):
    """A surrogate choice (``choices={kind or node: candidate or style}``) that names nothing."""


class CalibrationError(ArchnetError, ValueError):
    """Calibration data that is empty, mis-shaped or non-finite."""


class UnsupportedOpError(ArchnetError, RuntimeError):
    """A node the target cannot run and for which no legal replacement exists."""


class PipelineError(ArchnetError, RuntimeError):
    """A pass of a pipeline failed; the message names the passes that ran."""


class VerificationError(PipelineError):
    """A pass produced a graph that fails lint or differs numerically from its input."""


class ExportError(ArchnetError, RuntimeError):
    """ONNX export failed: an op the target cannot run, a checker or onnxruntime failure, or a
    mismatch between the exported model and the torch module. No file is left behind."""
