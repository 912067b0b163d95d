"""Reading image bytes from any fsspec store; one filesystem object per protocol, reused per actor."""

from __future__ import annotations

from fsspec.core import url_to_fs

from .errors import ReadError


class Reader:
    def __init__(self, storage_options: dict | None = None):
        self._options = storage_options or {}
        self._fs = {}

    def filesystem(self, uri: str):
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        if protocol not in self._fs:
            self._fs[protocol] = url_to_fs(uri, **self._options)[0]
        return self._fs[protocol]

    def read(self, uri: str) -> bytes:
        try:
            fs = self.filesystem(uri)
            return fs.cat_file(fs._strip_protocol(uri))
        except FileNotFoundError:
            raise ReadError("file not found (deleted after listing?)", error_type="not_found") from None
        except PermissionError:
            raise ReadError("permission denied", error_type="permission_denied") from None
        except Exception as exc:
            raise ReadError(f"{type(exc).__name__}: {exc}") from None
