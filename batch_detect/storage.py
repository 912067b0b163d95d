"""`--storage-option` keys checked against the stores they go to: fsspec passes unknown keys on silently
(most filesystems hand them to a base class that ignores them), so a misspelled `endpont_url` would
otherwise send the job to AWS instead of the user's MinIO."""

from __future__ import annotations

import difflib
import inspect

from .errors import ConfigError

# fsspec's own keys, taken by every filesystem (instance and listings caches).
_FSSPEC_KEYS = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}


def _init_keys(cls) -> set[str]:
    keys = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self":
                keys.add(p.name)
    return keys


def _s3_keys(cls) -> set[str]:
    # s3fs documents its **kwargs as the aiobotocore session's (e.g. `profile`).
    from aiobotocore.session import AioSession

    return _init_keys(cls) | _init_keys(AioSession)


# Filesystems whose leftover **kwargs reach only what is listed here; other stores (http, gcs, ...) use
# theirs in ways a signature does not show, so their keys are not checked.
_KNOWN = {
    ("s3fs.core", "S3FileSystem"): _s3_keys,
    ("fsspec.implementations.local", "LocalFileSystem"): _init_keys,
    ("fsspec.implementations.memory", "MemoryFileSystem"): _init_keys,
}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def accepted_keys(protocol: str) -> tuple[str, set[str]] | None:
    """(the filesystem class's name, the keys it accepts), or None when they cannot be known."""
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return None  # not installed or unknown: the store itself reports that when it is opened
    keys_of = _KNOWN.get((cls.__module__, cls.__name__))
    if keys_of is None:
        return None
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}", keys_of(cls) | _FSSPEC_KEYS


def check_storage_options(options: dict, urls: dict[str, str]) -> None:
    """Refuse a key that no store of this run accepts. `urls`: flag name → URL (e.g. {"--input": ...})."""
    if not options:
        return
    stores = {}
    for flag, url in urls.items():
        if not url:
            continue
        if "::" in url:
            return  # chained URLs (simplecache::s3://…) take options of several stores: not checked
        found = accepted_keys(_protocol(url))
        if found is None:
            return
        stores.setdefault(_protocol(url), (found, flag, url))
    known = set().union(*(keys for (_, keys), _, _ in stores.values()))
    for key in options:
        if key in known:
            continue
        where = " and ".join(f"{cls} (the store of {flag} {url!r})" for (cls, _), flag, url in stores.values())
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
        raise ConfigError(f"--storage-option {key!r} is unknown to {where}: {hint}")
