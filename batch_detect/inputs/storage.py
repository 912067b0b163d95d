"""The stores a run uses, checked before it starts: `--storage-option` keys against what each store accepts
(fsspec passes unknown keys on silently, so a misspelled `endpont_url` would send the job to AWS instead of
the user's MinIO), and object stores reached once with those options (credentials, endpoint)."""

from __future__ import annotations

import difflib
import inspect
import os
import re

from ..errors import ConfigError, StoreAccessError

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


_S3 = ("s3", "s3a")


def _without_userinfo(url: str) -> str:
    """An endpoint as it may be shown: `http://user:pass@host` loses its `user:pass@`."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return scheme + sep + host.rpartition("@")[2] + slash + path


def _access_problem(exc: BaseException, url: str, options: dict) -> str | None:
    """One sentence for a credentials or connection failure (the store, what failed, the fix); None for
    anything else, which the run's own reads report in their place (a missing key, a denied prefix)."""
    from botocore.exceptions import (ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError)

    while exc is not None:
        if isinstance(exc, PartialCredentialsError):
            missing = {"aws_access_key_id": "key", "aws_secret_access_key": "secret"}.get(
                exc.kwargs.get("cred_var"), exc.kwargs.get("cred_var"))
            return (f"the S3 credentials for {url} are incomplete ({missing} is missing): give both "
                    "--storage-option key=… and secret=… (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, NoCredentialsError):
            return (f"no S3 credentials were found to sign requests to {url}: pass --storage-option key=… and "
                    "secret=…, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile), or pass "
                    "--storage-option anon=true for a public bucket")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            endpoint = options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
            return (f"cannot connect to the S3 endpoint {_without_userinfo(str(endpoint))} to reach {url}: check "
                    "--storage-option endpoint_url (or AWS_ENDPOINT_URL), that the server is up, and the network")
        exc = exc.__cause__ or exc.__context__
    return None


def check_store_access(urls: list[str], options: dict) -> None:
    """One request to each object store the run uses, before anything is read or written, so that missing
    credentials or an unreachable endpoint are a sentence (exit 2) instead of a traceback from deep in a
    read. The probe retries little, so a dead endpoint is reported in seconds, not minutes."""
    from fsspec.core import url_to_fs

    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"max_attempts": 2})
    config.setdefault("connect_timeout", 5)
    probe = {**options, "config_kwargs": config, "skip_instance_cache": True}
    for url in dict.fromkeys(u for u in urls if u and u.split("://", 1)[0] in _S3):
        fixed = url[:m.start()] if (m := re.search(r"[*?\[]", url)) else url
        try:
            fs, path = url_to_fs(fixed, **probe)
            fs.info(path)
        except Exception as exc:
            problem = _access_problem(exc, url, options)
            if problem is not None:
                raise StoreAccessError(problem) from None
