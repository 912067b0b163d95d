"""Error types. Per-image errors carry the pipeline stage, so a failure record is built from the
exception itself, never by matching message text. Job-level errors stop the run before any actor starts.
"""

from __future__ import annotations

STAGES = ("read", "decode", "validate", "infer", "postprocess")


class BatchDetectError(Exception):
    """Base for everything this tool raises on purpose."""


# --- job-level: reported once, before the job starts, exit code 2 -------------------------------


class ConfigError(BatchDetectError):
    """A setting is invalid or inconsistent; the message names the setting and the fix."""


class InputError(BatchDetectError):
    """The input URL cannot be listed or holds no images."""


class OutputError(BatchDetectError):
    """The output location is unusable (exists without --overwrite, not writable, ...)."""


class ClusterError(BatchDetectError):
    """The Ray cluster cannot be joined or cannot host the actors."""


class ModelError(BatchDetectError):
    """The model cannot be used: missing, not a TFLite file, or not a detector we can decode."""


class MissingExtra(BatchDetectError):
    """An optional dependency is not installed; the message names the extra that provides it."""


# --- run-level: the run stopped itself; what it committed stays, exit code 1 ---------------------


class FailureRateExceeded(BatchDetectError):
    """More than --max-failure-rate of the images failed once enough had been processed to judge."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, `ray job stop`): stops the run as Ctrl-C does."""


# --- per-image: each becomes one failure record ----------------------------------------------------


class ImageError(BatchDetectError):
    stage: str = "validate"
    error_type: str = "image_error"

    def __init__(self, message: str, *, error_type: str | None = None):
        super().__init__(message)
        if error_type is not None:
            self.error_type = error_type


class ReadError(ImageError):
    stage = "read"
    error_type = "read_error"


class DecodeError(ImageError):
    stage = "decode"
    error_type = "decode_error"


class ImageTooLarge(ImageError):
    stage = "validate"
    error_type = "image_too_large"


class ShapeMismatch(ImageError):
    stage = "validate"
    error_type = "shape_mismatch"


class DtypeMismatch(ImageError):
    stage = "validate"
    error_type = "dtype_mismatch"


class InferenceError(ImageError):
    stage = "infer"
    error_type = "inference_error"


class PostprocessError(ImageError):
    stage = "postprocess"
    error_type = "postprocess_error"


def failure_fields(exc: BaseException, default_stage: str) -> tuple[str, str, str]:
    """(stage, error_type, message) for a failure record; unexpected exceptions keep their class name."""
    if isinstance(exc, ImageError):
        return exc.stage, exc.error_type, str(exc)
    return default_stage, type(exc).__name__, str(exc) or type(exc).__name__
