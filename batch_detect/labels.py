"""Labels files: one label per line (line number = class id), or `id label` lines."""

from __future__ import annotations

import re

from fsspec.core import url_to_fs

from .errors import ConfigError

_ID_LINE = re.compile(r"^\s*(\d+)[\s:,]+(.+?)\s*$")


def parse_labels(text: str) -> list[str | None]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all(_ID_LINE.match(ln) for ln in lines):
        pairs = {int(m.group(1)): m.group(2) for m in map(_ID_LINE.match, lines)}
        out: list[str | None] = [None] * (max(pairs) + 1)
        for cid, label in pairs.items():
            out[cid] = label
        return out
    return [ln.strip() for ln in lines]


def load_labels(url: str, storage_options: dict | None = None) -> list[str | None]:
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"labels file {url!r} not found: check --labels") from None
    except UnicodeDecodeError:
        raise ConfigError(f"labels file {url!r} is not UTF-8 text: one label per line expected") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read labels file {url!r}: {type(exc).__name__}: {exc}") from None
    labels = parse_labels(text)
    if not labels:
        raise ConfigError(f"labels file {url!r} is empty")
    return labels
