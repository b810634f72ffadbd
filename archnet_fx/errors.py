"""Typed errors of archnet_fx.

Every error a user can cause is one of these, and its message says what was wrong and how to fix
it. They subclass the builtin exception a caller would naturally catch (``ValueError``,
``TypeError``, ``RuntimeError``) so generic handlers keep working.
"""


class ArchnetError(Exception):
    """Base class of every archnet_fx error."""


class OptionError(ArchnetError, ValueError, TypeError):
    """An option (keyword argument or command-line flag) of the wrong type or value, or one that
    does not exist; the message names it and what it accepts."""


class TargetError(ArchnetError, ValueError, TypeError):
    """Unknown target name, a target argument that is neither a name, a path nor a Target, or a
    malformed target description file."""


class BitWidthError(TargetError):
    """Requested weight/activation bit width that the target cannot do."""


class CaptureError(ArchnetError, RuntimeError):
    """The model could be captured neither by torch.fx nor by torch.export."""


class InputError(ArchnetError, ValueError, TypeError):
    """Example inputs or runtime inputs of the wrong kind, shape or dtype."""


class ChoiceError(OptionError):
    """A surrogate choice (``choices={kind or node: candidate or style}``) that names nothing."""


class CalibrationError(ArchnetError, ValueError):
    """Calibration data that is empty, mis-shaped or non-finite."""


class UnsupportedOpError(ArchnetError, RuntimeError):
    """A node the target cannot run and for which no legal replacement exists."""


class PipelineError(ArchnetError, RuntimeError):
    """A pass of a pipeline failed; the message names the passes that ran."""


class VerificationError(PipelineError):
    """A pass produced a graph that fails lint or differs numerically from its input."""


class DeviceError(ArchnetError, RuntimeError):
    """A device (``device="cuda:1"``) this machine does not have."""


class CheckpointError(ArchnetError, ValueError):
    """A checkpoint directory that is a file, unreadable, or holds a checkpoint of other
    settings."""


class ExportError(ArchnetError, RuntimeError):
    """ONNX export failed: an op the target cannot run, a checker or onnxruntime failure, or a
    mismatch between the exported model and the torch module. No file is left behind."""


def first_line(e: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, for quoting another library's complaint inside
    one of ours; ``empty`` (default: the exception's type name) when it has no message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else (empty or type(e).__name__)
