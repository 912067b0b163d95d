"""Reading image bytes from any fsspec store; one filesystem object per protocol, reused per actor."""

from __future__ import annotations

import inspect

from fsspec.core import url_to_fs

from ..errors import ReadError, StoreUnavailable
from ..outage import RetryingFS


def one_request(fs) -> dict:
    """Keyword arguments that make `fs.cat_file` of a whole object one request: s3fs asks the object's size
    first (a HEAD: one more request and round trip per image) to split objects over 50 MiB into ranges."""
    return {"max_concurrency": 1} if "max_concurrency" in inspect.signature(fs.cat_file).parameters else {}


class Reader:
    def __init__(self, storage_options: dict | None = None):
        self._options = storage_options or {}
        self._fs = {}  # protocol -> (filesystem, keyword arguments of a whole-object read)

    def _open(self, uri: str):
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        if protocol not in self._fs:
            fs = url_to_fs(uri, **self._options)[0]
            # A throttled or unreachable store is waited out (outage.py), never a failure record.
            name = "the file system" if protocol == "file" else f"{protocol}://{uri.split('://', 1)[1].split('/', 1)[0]}"
            self._fs[protocol] = RetryingFS(fs, name), one_request(fs)
        return self._fs[protocol]

    def filesystem(self, uri: str):
        return self._open(uri)[0]

    def read(self, uri: str) -> bytes:
        try:
            fs, whole = self._open(uri)
            return fs.cat_file(fs._strip_protocol(uri), **whole)
        except FileNotFoundError:
            raise ReadError("file not found (deleted after listing?)", error_type="not_found") from None
        except PermissionError:
            raise ReadError("permission denied", error_type="permission_denied") from None
        except StoreUnavailable:
            raise  # not this image's fault: the run stops, and the image is read again when it resumes
        except Exception as exc:
            raise ReadError(f"{type(exc).__name__}: {exc}") from None
