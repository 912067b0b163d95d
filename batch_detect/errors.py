"""Error types. Per-image errors carry the pipeline stage, so a failure record is built from the
exception itself, never by matching message text. Job-level errors stop the run before any actor starts.
"""

from __future__ import annotations

STAGES = ("read", "decode", "validate", "infer", "postprocess")


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 node', '2 nodes': messages word their numbers as a person would."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


class BatchDetectError(Exception):
    """Base for everything this tool raises on purpose."""


# --- job-level: reported once, before the job starts, exit code 2 -------------------------------


class ConfigError(BatchDetectError):
    """A setting is invalid or inconsistent; the message names the setting and the fix."""


class StoreAccessError(ConfigError):
    """An object store cannot be signed for or reached (credentials, endpoint): a setting to fix."""


class InputError(BatchDetectError):
    """The input URL cannot be listed or holds no images."""


class OutputError(BatchDetectError):
    """The output location is unusable (exists without --overwrite, not writable, ...)."""


class LeaseLost(OutputError):
    """Another run took this output's lease: this run must write nothing more there, not even its manifest."""


class ClusterError(BatchDetectError):
    """The Ray cluster cannot be joined or cannot host the actors."""


class HeadUnreachable(ClusterError):
    """Mid-run, the head node's GCS stopped answering (a partition, or the head died): the run stops with
    what is committed kept, and the process exits without waiting on Ray's shutdown, which would wait for
    the head."""


class ModelError(BatchDetectError):
    """The model cannot be used: missing, not a TFLite file, or not a detector we can decode."""


class MissingExtra(BatchDetectError):
    """An optional dependency is not installed; the message names the extra that provides it."""


# --- run-level: the run stopped itself; what it committed stays, exit code 1 ---------------------


class FailureRateExceeded(BatchDetectError):
    """More than --max-failure-rate of the images failed once enough had been processed to judge."""


class StoreUnavailable(BatchDetectError):
    """An object store kept failing with transient errors (throttling, unreachable) for longer than
    --store-timeout: the run stops, what it committed stays, and the same command resumes."""


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


# The general type of each stage, for exceptions nobody anticipated (a Pillow plugin's NotImplementedError,
# a KeyError in a decoder): `error_type` keeps to the documented values, so that queries grouping by it
# need not know every library's exception classes; the class name goes into the message.
STAGE_ERROR_TYPES = {cls.stage: cls.error_type for cls in (ReadError, DecodeError, ImageError, InferenceError,
                                                           PostprocessError)}


def failure_fields(exc: BaseException, default_stage: str) -> tuple[str, str, str]:
    """(stage, error_type, message) for a failure record."""
    if isinstance(exc, ImageError):
        return exc.stage, exc.error_type, str(exc)
    detail = str(exc)
    return default_stage, STAGE_ERROR_TYPES[default_stage], type(exc).__name__ + (f": {detail}" if detail else "")
