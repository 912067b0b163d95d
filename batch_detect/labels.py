"""Labels files: one label per line (line number = class id), or `id label` lines; or the labels file a
TFLite model with metadata carries in the zip appended to its flatbuffer."""

from __future__ import annotations

import io
import posixpath
import re
import zipfile

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


def embedded_labels(model_content: bytes) -> tuple[list[str | None], str] | None:
    """(labels, file name) from the zip a TFLite model with metadata carries after its flatbuffer
    (the metadata writers put the associated labels file there), or None when it has none. The file
    whose name says "label" wins (labelmap.txt, labels.txt, ...); else a lone .txt file."""
    try:
        with zipfile.ZipFile(io.BytesIO(model_content)) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            texts = [n for n in names if n.lower().endswith(".txt")]
            chosen = [n for n in texts if "label" in posixpath.basename(n).lower()] or (
                texts if len(texts) == 1 else [])
            if not chosen:
                return None
            name = sorted(chosen)[0]
            text = zf.read(name).decode("utf-8")
    except (zipfile.BadZipFile, UnicodeDecodeError, KeyError, OSError, ValueError):
        return None  # no zip, or no readable labels in it: the model is used without labels
    labels = parse_labels(text)
    return (labels, name) if labels else None


def label_warnings(labels: list | None, labels_source: str | None, layout) -> list[str]:
    """What a run says about its labels before anyone reads a null `label` column: none at all, or more
    than the model has classes (known only where the output's shape tells the class count: YOLO heads).
    Too few is counted from the detections themselves (the run's unlabelled class ids)."""
    if labels is None:
        return ["no labels: every detection's label is null (class_id is written). Labels come from --labels "
                "FILE (one per line, line number = class id) or from a labels file embedded in the model's "
                "metadata zip; this model has none"]
    classes = getattr(layout, "num_classes", None)
    if classes is not None and len(labels) > classes:
        return [f"{len(labels)} labels ({labels_source}) but the model has {classes} classes (output "
                f"{layout.output.name!r} {list(layout.output.shape)}); labels beyond class id {classes - 1} are "
                "never used. Check that the labels belong to this model"]
    return []
