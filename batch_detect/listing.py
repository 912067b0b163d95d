"""Listing the input and planning shards: deterministic, so a plan can be recorded and re-derived."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

from .errors import InputError

_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class Shard:
    shard_id: str
    uris: tuple[str, ...]


@dataclass(frozen=True)
class Listing:
    uris: list[str]  # sorted, full URIs (protocol included for remote stores)
    skipped: list[str]  # files whose extension is not an image extension
    duplicates: int = 0  # URIs a manifest listed more than once (each is planned once)


MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")


def read_manifest(url: str, storage_options: dict | None = None) -> Listing:
    """A manifest file: text with one URI per line, or CSV/Parquet with a `uri` column. Relative
    local paths are taken relative to the manifest's folder."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    suffix = posixpath.splitext(path)[1].lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh)
            if "uri" not in table.column_names:
                raise InputError(f"manifest {url!r} has no 'uri' column (columns: {', '.join(table.column_names)})")
            raw = [u for u in table.column("uri").to_pylist() if u]
        elif suffix == ".csv":
            import csv
            import io

            reader = csv.DictReader(io.StringIO(fs.cat_file(path).decode("utf-8")))
            if "uri" not in (reader.fieldnames or []):
                raise InputError(f"manifest {url!r} has no 'uri' column in its header ({reader.fieldnames})")
            raw = [row["uri"].strip() for row in reader if row.get("uri", "").strip()]
        else:
            raw = [ln.strip() for ln in fs.cat_file(path).decode("utf-8").splitlines()
                   if ln.strip() and not ln.lstrip().startswith("#")]
    except FileNotFoundError:
        raise InputError(f"manifest {url!r} not found") from None
    except UnicodeDecodeError:
        raise InputError(f"manifest {url!r} is not UTF-8 text") from None
    base = posixpath.dirname(_full_uri(fs, path))
    uris = []
    for u in raw:
        if "://" not in u and not u.startswith("/"):
            u = posixpath.join(base, u)
        uris.append(u)
    unique = sorted(set(uris))
    return Listing(uris=unique, skipped=[], duplicates=len(uris) - len(unique))


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def list_input(url: str, extensions: tuple[str, ...], storage_options: dict | None = None) -> Listing:
    """List a folder/prefix (recursively) or a glob. Hidden files and `_`-prefixed files are ignored."""
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot open input {url!r}: {exc}") from None
    if posixpath.splitext(path)[1].lower() in MANIFEST_SUFFIXES and not any(ch in path for ch in _GLOB_CHARS):
        try:
            is_file = fs.isfile(path)
        except OSError:
            is_file = False
        if is_file:
            return read_manifest(url, storage_options)
    try:
        if any(ch in path for ch in _GLOB_CHARS):
            found = fs.glob(path, detail=True)
            paths = [p for p, info in found.items() if info.get("type") == "file"]
        elif fs.isdir(path):
            paths = fs.find(path)
        elif fs.isfile(path):
            paths = [path]
        else:
            raise InputError(f"input {url!r} does not exist: give a folder, prefix, glob or file")
    except InputError:
        raise
    except (PermissionError, OSError) as exc:
        raise InputError(f"cannot list input {url!r}: {type(exc).__name__}: {exc}") from None
    uris: list[str] = []
    skipped: list[str] = []
    for p in sorted(paths):
        name = posixpath.basename(p)
        if name.startswith(".") or name.startswith("_"):
            continue
        if extensions and posixpath.splitext(name)[1].lower() not in extensions:
            skipped.append(_full_uri(fs, p))
            continue
        uris.append(_full_uri(fs, p))
    return Listing(uris=uris, skipped=skipped)


def plan_shards(uris: list[str], shard_size: int) -> list[Shard]:
    """Fixed-size shards of the sorted URIs; shard ids are stable for the same listing and size."""
    ordered = sorted(uris)
    return [
        Shard(f"shard-{i // shard_size:06d}", tuple(ordered[i : i + shard_size]))
        for i in range(0, len(ordered), shard_size)
    ]


def plan_fingerprint(shards: list[Shard]) -> str:
    """sha256 over shard ids and their URIs: equal fingerprints mean the same plan."""
    h = hashlib.sha256()
    for shard in shards:
        h.update(shard.shard_id.encode())
        for uri in shard.uris:
            h.update(b"\0" + uri.encode())
        h.update(b"\n")
    return h.hexdigest()
