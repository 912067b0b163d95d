"""Where a run may write: not among its own input, and not into a folder that holds something other than
a batch-detect output, unless the user says so. A typo'd `--output` (the input folder, a photo library)
would otherwise fill it with `_log/`, `images/`, ... and `--overwrite` would delete folders of those names."""

from __future__ import annotations

import posixpath
import re

from .commitlog import LOG_DIR
from .errors import OutputError
from .sink import LEGACY_COMMIT_DIR, LOCK, MANIFEST, OutputStore

FLAG = "--allow-nonempty-output"
_GLOB = re.compile(r"[*?\[]")


def _listed_root(input_url: str) -> str:
    """The folder or prefix an input lists: a glob's fixed part, else the input itself."""
    m = _GLOB.search(input_url)
    return (posixpath.dirname(input_url[:m.start()]) if m else input_url).rstrip("/")


def check_output_location(output: str, input_url: str, store: OutputStore, allowed: bool) -> None:
    if allowed:
        return
    root = _listed_root(input_url)
    out = output.rstrip("/")
    if out == root or out.startswith(root + "/"):
        raise OutputError(
            f"--output {output!r} is {'the input folder' if out == root else 'inside --input'} {input_url!r}: "
            f"results would be written among the images. Choose an --output outside the input, or pass {FLAG} "
            "to write there anyway")
    try:
        entries = store.fs.ls(store.root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return  # a new output
    names = {posixpath.basename(e.rstrip("/")) for e in entries}
    if not names or names & {MANIFEST, LOG_DIR, LEGACY_COMMIT_DIR, LOCK}:
        return  # empty, or a batch-detect output (resumed or refused later, by its manifest)
    example = sorted(names)[0]
    raise OutputError(
        f"--output {output!r} already holds {len(names)} entries (e.g. {example!r}) and is not a batch-detect "
        f"output (no {MANIFEST} or {LOG_DIR}/): choose a new or empty --output, or pass {FLAG} to write beside "
        "them")
