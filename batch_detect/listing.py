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
