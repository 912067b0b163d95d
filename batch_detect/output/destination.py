"""Where a run may write: not among its own input, and not into a folder that holds something other than
a batch-detect output, unless the user says so. A typo'd `--output` (the input folder, a photo library)
would otherwise fill it with `_log/`, `images/`, ... and `--overwrite` would delete folders of those names.

And where it can write: not a file or under one, not in a bucket that does not exist (this tool never
creates buckets: a typo would otherwise become a new bucket), and a place where a file can be created,
which only trying tells (permissions, a read-only mount, an immutable folder, a bucket policy: root is
refused by some of them too). The probe file is deleted again, and the folders it needed, so a dry run
and a refused run leave the location as they found it."""

from __future__ import annotations

import posixpath
import re
import uuid

from .commitlog import LOG_DIR
from ..errors import OutputError
from .sink import GUARD, LEGACY_COMMIT_DIR, LOCK, MANIFEST, OutputStore

FLAG = "--allow-nonempty-output"
PROBE = "_probe."  # the probe file's name starts so: a name this tool owns
_GLOB = re.compile(r"[*?\[]")


def _listed_root(input_url: str) -> str:
    """The folder or prefix an input lists: a glob's fixed part, else the input itself."""
    m = _GLOB.search(input_url)
    return (posixpath.dirname(input_url[:m.start()]) if m else input_url).rstrip("/")


def check_output_location(output: str, input_url: str, store: OutputStore, allowed: bool) -> None:
    """Raise OutputError (one sentence: the location, what is wrong, the fix) unless a run may write to
    `output`; `allowed`: --allow-nonempty-output. Leaves the location as it was."""
    if not allowed:
        _not_among_input(output, input_url)
    try:
        found, kind, missing = _nearest(store)
    except OSError as exc:
        raise unwritable(output, store, exc) from None
    if kind == "file":
        raise OutputError(
            f"--output {output!r} is a file, not a folder: choose a folder (new, empty, or a previous run's output) "
            "for --output" if found == store.root else
            f"--output {output!r} is under {found!r}, which is a file, not a folder: choose an --output outside "
            "it")
    if found == store.root and not allowed:
        _not_beside_other_files(output, store)
    _probe(output, store, missing)


def _not_among_input(output: str, input_url: str) -> None:
    root = _listed_root(input_url)
    out = output.rstrip("/")
    if out == root or out.startswith(root + "/"):
        raise OutputError(
            f"--output {output!r} is {'the input folder' if out == root else 'inside --input'} {input_url!r}: "
            f"results would be written among the images. Choose an --output outside the input, or pass {FLAG} "
            "to write there anyway")


def _nearest(store: OutputStore) -> tuple[str, str | None, list[str]]:
    """(the output's root or, where it does not exist, its nearest existing parent; that one's type, None
    when nothing exists; the folders a run would create, deepest first). Object stores have no folders
    to create, and a key under an object is no problem there: only the root is looked at."""
    path, missing = store.root, []
    while True:
        try:
            return path, store.fs.info(path)["type"], missing
        except (FileNotFoundError, NotADirectoryError):
            parent = posixpath.dirname(path)
            if store.bucket is not None or parent == path:
                return path, None, missing
            missing.append(path)
            path = parent


def _not_beside_other_files(output: str, store: OutputStore) -> None:
    try:
        entries = store.fs.ls(store.root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return  # a new output
    # A probe is ours: another run's, checking this output at the same moment, or one a killed run left.
    names = {n for e in entries if not (n := posixpath.basename(e.rstrip("/"))).startswith(PROBE)}
    if not names or names & {MANIFEST, LOG_DIR, LEGACY_COMMIT_DIR, LOCK, GUARD}:
        return  # empty, or a batch-detect output (resumed or refused later, by its manifest)
    example = sorted(names)[0]
    raise OutputError(
        f"--output {output!r} already holds {len(names)} entries (e.g. {example!r}) and is not a batch-detect "
        f"output (no {MANIFEST} or {LOG_DIR}/): choose a new or empty --output, or pass {FLAG} to write beside "
        "them")


def _probe(output: str, store: OutputStore, missing: list[str]) -> None:
    """Create and delete a file in the output, and the folders `missing` that it needed."""
    probe = store.path(f"{PROBE}{uuid.uuid4().hex}.tmp")
    try:
        store.makedirs(store.root)
        store.fs.pipe_file(probe, b"")
        store.fs.rm(probe)
    except OSError as exc:
        raise unwritable(output, store, exc) from None
    finally:
        for folder in missing:
            try:
                store.fs.rmdir(folder)
            except OSError:
                pass  # not empty: someone else's now, or the probe that could not be deleted


def unwritable(output: str, store: OutputStore, exc: OSError) -> OutputError:
    """The sentence for a write the output refused: a missing bucket (an object store's "not found" for a
    write), else what the store said."""
    if store.bucket is not None and isinstance(exc, FileNotFoundError):
        return OutputError(f"--output {output!r}: the bucket {store.bucket!r} does not exist, and batch-detect never "
                           "creates buckets: check its name (and --storage-option endpoint_url), or create it first")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"--output {output!r} cannot be written ({type(exc).__name__}: {reason}): choose an --output "
                       "you can write to, or give this user write access to it")
