"""The library's entry point where it has always been: `from batch_detect.pipeline import run` (with
`batch_detect.config.RunConfig`). The run itself lives in the run wing, `batch_detect/run/`."""

from .run.pipeline import RunSummary, prepare, run

__all__ = ["RunSummary", "prepare", "run"]
