"""Labels: a labels file (one label per line, line number = class id; or `id label` lines; or Ultralytics
metadata with `names`), or the labels a TFLite model carries itself in the zip appended to its flatbuffer
(found through its TFLite metadata, Ultralytics `names`, or a labels file's name). A file that is not a
label list is never taken as one. And whether the labels fit the model's class count, where that is known
before any image is read."""

from __future__ import annotations

import ast
import io
import json
import posixpath
import re
import zipfile
import zlib
from dataclasses import dataclass

from fsspec.core import url_to_fs

from ..errors import ConfigError
from .modelfile import custom_op_options, metadata_label_files

_ID_LINE = re.compile(r"^\s*(\d+)[\s:,]+(.+?)\s*$")
# A bare-word key and a colon: a YAML (or similar) mapping's line, never a label list's.
_KEY_LINE = re.compile(r"^[A-Za-z_][\w.-]*:(\s|$)")
_BLOCK_KEY = re.compile(r"^[A-Za-z_][\w.-]*:\s*$")
_YAML_NAMES = re.compile(r"^names:[ \t]*(.*?)[ \t\r]*$", re.M)
_YAML_ITEM = re.compile(r"^(?:[ \t]+(\d+)[ \t]*:|[ \t]*-)[ \t]*(.*?)\s*$")
# No class name is this long: a longer line is a blob (a metadata dict on one line), not a label.
_MAX_LABEL_CHARS = 200
# Class ids beyond this are not a detector's: a file claiming one would make a list of that size.
_MAX_CLASSES = 100_000
# Metadata and label files are small; a larger zip member is not read (a zip bomb stays packed).
_MAX_FILE_BYTES = 4 << 20
_METADATA_EXTS = (".txt", ".json", ".yaml", ".yml")
ULTRALYTICS = "Ultralytics metadata names"
POSTPROCESS_OP = "TFLite_Detection_PostProcess"
# First lines of SSD label maps that stand for the background class, which the post-process op drops.
_BACKGROUND = {"???", "background", "__background__", "bg", "unlabeled", "unlabelled", "n/a", "none"}


class NotALabelList(ValueError):
    """A text that is neither a label list nor metadata holding `names`; the message says why."""


def _by_id(pairs: dict[int, str]) -> list[str | None]:
    if max(pairs) >= _MAX_CLASSES:
        raise NotALabelList(f"class id {max(pairs)} is beyond any detector's ({_MAX_CLASSES} classes at most)")
    out: list[str | None] = [None] * (max(pairs) + 1)
    for cid, label in pairs.items():
        out[cid] = label
    return out


def parse_labels(text: str) -> list[str | None]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all(_ID_LINE.match(ln) for ln in lines):
        return _by_id({int(m.group(1)): m.group(2) for m in map(_ID_LINE.match, lines)})
    return [ln.strip() for ln in lines]


def _literal(text: str):
    """A JSON or Python literal, parsed without running anything (ast.literal_eval refuses calls, names,
    attributes): metadata is data from whoever made the model. None when it is neither."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace("''", "'") if value[0] == "'" else value[1:-1]
    return value


def _names_list(names) -> list[str | None] | None:
    """Ultralytics `names`: {0: 'person', ...} (keys may be strings of digits, as in JSON) or ['person', ...]."""
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    if isinstance(names, dict) and names and all(isinstance(v, str) for v in names.values()):
        try:
            pairs = {int(k): v for k, v in names.items() if not isinstance(k, (bool, float))}
        except (TypeError, ValueError):
            return None
        if len(pairs) == len(names) and min(pairs) >= 0:
            return _by_id(pairs)
    return None


def _yaml_names(text: str) -> list[str | None] | None:
    """`names` of YAML metadata (Ultralytics' metadata.yaml): a block mapping or list under a top-level
    `names:` key, or one written inline. Read line by line: a YAML parser is not a dependency."""
    match = _YAML_NAMES.search(text)
    if match is None:
        return None
    inline = match.group(1)
    if inline:
        parsed = _literal(inline)
        if parsed is None and inline[:1] in "{[" and inline[-1:] in "}]":  # YAML flow style, unquoted
            items = [i.strip() for i in inline[1:-1].split(",") if i.strip()]
            parsed = ({k.strip(): _unquote(v.strip()) for k, _, v in (i.partition(":") for i in items)}
                      if inline[0] == "{" else [_unquote(i) for i in items])
        return _names_list(parsed)
    by_id: dict[int, str] = {}
    listed: list[str] = []
    for line in text[match.end():].splitlines()[1:]:
        if not line.strip():
            continue
        item = _YAML_ITEM.match(line)
        if item is None:
            break  # the next top-level key
        value = _unquote(item.group(2))
        if item.group(1) is not None:
            by_id[int(item.group(1))] = value
        else:
            listed.append(value)
    if by_id and not listed:
        return _by_id(by_id)
    return listed if listed and not by_id else None


def ultralytics_names(text: str) -> list[str | None] | None:
    """The class names of Ultralytics export metadata (the dict literal it embeds as temp_meta.txt, the
    JSON of metadata.json, or metadata.yaml), by class id; None when the text holds no `names`."""
    head = text.lstrip()[:1]
    if head == "{":
        meta = _literal(text.strip())
        return _names_list(meta.get("names")) if isinstance(meta, dict) else None
    return _yaml_names(text) if head not in ("", "[") else None


def _why_not_labels(text: str) -> str | None:
    """Why a text is not a label list (one name per line, or `id label` lines), None when it is one."""
    body = text.strip()
    if not body:
        return "it is empty"
    if "\x00" in body:
        return "it holds NUL bytes"
    if body[0] in "{[":
        return "it is a dict or list literal, not one label per line"
    numbered = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    for i, line in numbered:
        if len(line.strip()) > _MAX_LABEL_CHARS:
            return f"line {i} is {len(line.strip())} characters long, longer than any label"
    keyed = [ln for _, ln in numbered if _KEY_LINE.match(ln) and not _ID_LINE.match(ln)]
    if any(_BLOCK_KEY.match(ln) for ln in keyed) or 2 * len(keyed) > len(numbered):
        return "it is a `key: value` mapping (YAML or similar metadata), not one label per line"
    return None


def read_labels_text(text: str) -> tuple[list[str | None], str | None]:
    """(labels, origin) from a file's text: Ultralytics metadata's `names` (origin ULTRALYTICS), else the
    lines of a label list (origin None). Raises NotALabelList when it is neither."""
    names = ultralytics_names(text)
    if names is not None:
        return names, ULTRALYTICS
    why = _why_not_labels(text)
    if why is not None:
        raise NotALabelList(why)
    return parse_labels(text), None


def load_labels(url: str, storage_options: dict | None = None) -> list[str | None]:
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
        text = fs.cat_file(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"labels file {url!r} not found: check --labels") from None
    except UnicodeDecodeError:
        raise ConfigError(f"labels file {url!r} is not UTF-8 text: one label per line expected") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read labels file {url!r}: {type(exc).__name__}: {exc}") from None
    if not text.strip():
        raise ConfigError(f"labels file {url!r} is empty")
    try:
        return read_labels_text(text)[0]
    except NotALabelList as exc:
        raise ConfigError(f"labels file {url!r} is not a label list ({exc}): --labels takes one label per "
                          "line, `id label` lines, or Ultralytics metadata with `names`") from None


@dataclass(frozen=True)
class ModelLabels:
    """What a model carries as labels: the labels (None: none), the zip member they came from, how it was
    found (None: by its name), and the files looked at but not taken, each with why."""

    labels: list[str | None] | None = None
    file: str | None = None
    origin: str | None = None
    passed_over: tuple[str, ...] = ()

    @property
    def source(self) -> str | None:
        if self.labels is None:
            return None
        return f"embedded in the model ({self.file}{f', {self.origin}' if self.origin else ''})"


def _member_text(zf: zipfile.ZipFile, name: str) -> str:
    if zf.getinfo(name).file_size > _MAX_FILE_BYTES:
        raise NotALabelList(f"it is over {_MAX_FILE_BYTES >> 20} MiB")
    return zf.read(name).decode("utf-8-sig")


def model_labels(content: bytes) -> ModelLabels:
    """The labels in a model's metadata zip (the metadata writers append the associated files to the
    flatbuffer), tried in this order: the files its TFLite metadata declares as labels (TENSOR_AXIS_LABELS,
    TENSOR_VALUE_LABELS); Ultralytics `names` in any metadata file; the file whose name says "label"
    (labelmap.txt, labels.txt, ...), else a lone .txt file. Each is taken only if it is a label list."""
    declared = metadata_label_files(content)
    origins = {f.name: f"TFLite metadata {f.type}" + (f" of output {f.tensor!r}" if f.tensor else "") for f in declared}
    try:
        zf = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, OSError, ValueError):
        return ModelLabels(passed_over=tuple(f"{n}: {origins[n]} names it, but the model carries no metadata zip"
                                             for n in origins))
    passed_over: dict[str, str] = {}
    with zf:
        members = sorted(n for n in zf.namelist() if not n.endswith("/"))
        texts = [n for n in members if n.lower().endswith(".txt")]
        by_name = [n for n in texts if "label" in posixpath.basename(n).lower()] or (texts if len(texts) == 1 else [])
        metadata = [n for n in members if n.lower().endswith(_METADATA_EXTS)]
        # (member, how it was found, whether only Ultralytics names are taken from it)
        tries = ([(n, origins[n], False) for n in origins] + [(n, None, True) for n in metadata]
                 + [(n, None, False) for n in by_name])
        for name, origin, names_only in tries:
            if name not in members:
                passed_over.setdefault(name, f"{name}: {origin} names it, but the metadata zip lacks it")
                continue
            try:
                labels, parsed_as = read_labels_text(_member_text(zf, name))
            except NotALabelList as exc:
                if not names_only:
                    passed_over.setdefault(name, f"{name}: not a label list ({exc})")
                continue
            except (KeyError, OSError, EOFError, RuntimeError, NotImplementedError, UnicodeDecodeError,
                    zipfile.BadZipFile, zlib.error) as exc:
                passed_over.setdefault(name, f"{name}: unreadable ({type(exc).__name__})")
                continue
            if names_only and parsed_as != ULTRALYTICS:
                continue
            if labels:
                return ModelLabels(labels, name, parsed_as or origin,
                                   tuple(v for k, v in passed_over.items() if k != name))
    return ModelLabels(passed_over=tuple(passed_over.values()))


def embedded_labels(model_content: bytes) -> tuple[list[str | None], str] | None:
    """(labels, file name) of `model_labels`, or None when the model carries none."""
    found = model_labels(model_content)
    return (found.labels, found.file) if found.labels is not None else None


@dataclass(frozen=True)
class ClassCount:
    """How many classes a model predicts and what says so; `without_background`: its class ids skip the
    background class (the post-process op's do), so an SSD label map's background line does not count."""

    count: int
    where: str
    without_background: bool = False


def model_classes(content: bytes, layout) -> ClassCount | None:
    """The class count where it is known before any image: a YOLO head's shape, or the
    TFLite_Detection_PostProcess op's own num_classes (read from its custom options)."""
    if getattr(layout, "num_classes", None) is not None:
        return ClassCount(layout.num_classes, f"output {layout.output.name!r} {list(layout.output.shape)}")
    if getattr(layout, "family", None) == "ssd_postprocess":
        counts = {o.get("num_classes") for o in custom_op_options(content, POSTPROCESS_OP)}
        if len(counts) == 1 and isinstance(n := counts.pop(), int) and not isinstance(n, bool) and n > 0:
            return ClassCount(n, f"the {POSTPROCESS_OP} op's num_classes", without_background=True)
    return None


def label_warnings(labels: list | None, labels_source: str | None, classes: ClassCount | None,
                   passed_over: tuple[str, ...] = ()) -> list[str]:
    """What a run says about its labels before it starts, so nobody first meets a null or shifted `label`
    column: none at all, or a count that does not fit the model's classes (where the count is known).
    Class ids the labels miss are counted from the detections too, after the run."""
    if labels is None:
        why = f" ({'; '.join(passed_over)})" if passed_over else ""
        return ["no labels: every detection's label is null (class_id is written). Labels come from --labels "
                "FILE (one per line, line number = class id) or from the model's own metadata (a labels file "
                "embedded in the model's metadata zip, or Ultralytics names); this model has none" + why]
    if classes is None or len(labels) == classes.count:
        return []
    n, c = len(labels), classes.count
    head = f"{n} labels ({labels_source}) but the model has {c} classes ({classes.where})"
    first = labels[0]
    if classes.without_background and n == c + 1 and (first is None or first.strip().lower() in _BACKGROUND):
        return [f"{head}, and the first label, {first!r}, stands for the background, which the op leaves out of "
                "its class ids (class id 0 is its first real class). Labels are taken as they are, so every "
                "detection is labelled one class off: remove the first line"]
    if n > c:
        return [f"{head}; labels beyond class id {c - 1} are never used. Check that the labels belong to this model"]
    missing = f"class id {n} gets" if n == c - 1 else f"class ids {n} to {c - 1} get"
    return [f"{head}; {missing} a null label. Check that the labels belong to this model"]
