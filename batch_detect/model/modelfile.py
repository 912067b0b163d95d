"""What a TFLite file says that the interpreter does not report, read from its flatbuffer: the label files
its TFLite Support metadata names, and a custom op's options. A few fields of a few tables are read
directly (TFLite's schema.fbs and metadata_schema.fbs give their slots): tflite-support is not installable
everywhere, and LiteRT's generated schema is a private module tflite-runtime lacks."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from flatbuffers import flexbuffers

# Vtable slots (4 + 2 × field id) of the fields read here; a union field takes two ids (type, value).
_MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS, _MODEL_BUFFERS, _MODEL_METADATA = 6, 8, 12, 16
_OPCODE_CUSTOM_CODE = 6
_SUBGRAPH_OPERATORS = 10
_OPERATOR_OPCODE_INDEX, _OPERATOR_CUSTOM_OPTIONS = 4, 14
_OPERATOR_LARGE_OPTIONS_OFFSET, _OPERATOR_LARGE_OPTIONS_SIZE = 22, 24
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 4, 6, 8
_METADATA_NAME, _METADATA_BUFFER = 4, 6
# metadata_schema.fbs (file identifier M001)
_MM_SUBGRAPHS, _MM_FILES = 10, 16
_SGM_INPUTS, _SGM_OUTPUTS, _SGM_FILES = 8, 10, 12
_TM_NAME, _TM_PROCESS_UNITS, _TM_FILES = 4, 12, 16
_PU_OPTIONS_TYPE, _PU_OPTIONS = 4, 6
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union tag
_NO_MEAN, _NO_STD = 4, 6
_FILE_NAME, _FILE_TYPE, _FILE_LOCALE = 4, 8, 10
LABEL_FILE_TYPES = {2: "TENSOR_AXIS_LABELS", 3: "TENSOR_VALUE_LABELS"}

# What a damaged or truncated flatbuffer raises here; the callers treat it as "the file says nothing".
_BAD = (struct.error, IndexError, ValueError, UnicodeDecodeError, TypeError, KeyError, RecursionError)


class _Table:
    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos

    def _field(self, slot: int) -> int:
        vtable = self.pos - struct.unpack_from("<i", self.buf, self.pos)[0]
        if slot >= struct.unpack_from("<H", self.buf, vtable)[0]:
            return 0  # written by an older schema: the field is absent
        return struct.unpack_from("<H", self.buf, vtable + slot)[0]

    def _indirect(self, at: int) -> int:
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def scalar(self, slot: int, fmt: str, default: int = 0) -> int:
        off = self._field(slot)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _vector(self, slot: int) -> tuple[int, int] | None:
        off = self._field(slot)
        if not off:
            return None
        start = self._indirect(self.pos + off)
        return start + 4, struct.unpack_from("<I", self.buf, start)[0]

    def bytes(self, slot: int) -> bytes | None:
        vec = self._vector(slot)
        if vec is None:
            return None
        if vec[0] + vec[1] > len(self.buf):
            raise IndexError("vector past the end of the buffer")
        return self.buf[vec[0]:vec[0] + vec[1]]

    def string(self, slot: int) -> str | None:
        raw = self.bytes(slot)
        return None if raw is None else raw.decode("utf-8")

    def floats(self, slot: int) -> list[float] | None:
        vec = self._vector(slot)
        return None if vec is None else list(struct.unpack_from(f"<{vec[1]}f", self.buf, vec[0]))

    def table(self, slot: int) -> "_Table | None":
        off = self._field(slot)
        return _Table(self.buf, self._indirect(self.pos + off)) if off else None

    def tables(self, slot: int) -> list["_Table"]:
        vec = self._vector(slot)
        return [] if vec is None else [_Table(self.buf, self._indirect(vec[0] + 4 * i)) for i in range(vec[1])]


def _root(buf: bytes) -> _Table:
    return _Table(buf, struct.unpack_from("<I", buf, 0)[0])


def _outside(content: bytes, offset: int, size: int) -> bytes | None:
    # Models over 2 GB keep buffers (and large custom options) after the flatbuffer, at absolute offsets;
    # offset 1 is the converter's placeholder for "empty".
    return content[offset:offset + size] if offset > 1 and size else None


def _metadata_buffer(content: bytes, name: str) -> bytes | None:
    model = _root(content)
    buffers = model.tables(_MODEL_BUFFERS)
    for entry in model.tables(_MODEL_METADATA):
        if entry.string(_METADATA_NAME) == name:
            buf = buffers[entry.scalar(_METADATA_BUFFER, "I")]
            return buf.bytes(_BUFFER_DATA) or _outside(content, buf.scalar(_BUFFER_OFFSET, "Q"),
                                                       buf.scalar(_BUFFER_SIZE, "Q"))
    return None


@dataclass(frozen=True)
class LabelFile:
    """An associated file the TFLite Support metadata declares as labels."""

    name: str
    type: str  # TENSOR_AXIS_LABELS or TENSOR_VALUE_LABELS
    tensor: str | None  # the output tensor it labels (None: declared for the subgraph or the model)
    locale: str | None


def metadata_label_files(content: bytes) -> list[LabelFile]:
    """The label files of the model's TFLITE_METADATA, outputs' first, then the subgraph's and the model's;
    files without a locale (or English ones) before other locales. Empty when it has none."""
    try:
        data = _metadata_buffer(content, "TFLITE_METADATA")
        if not data or data[4:8] != b"M001":
            return []
        meta = _root(data)
        found: list[LabelFile] = []

        def add(files: list[_Table], tensor: str | None) -> None:
            for f in files:
                kind = LABEL_FILE_TYPES.get(f.scalar(_FILE_TYPE, "b"))
                name = f.string(_FILE_NAME)
                if kind and name:
                    found.append(LabelFile(name, kind, tensor, f.string(_FILE_LOCALE)))

        for sub in meta.tables(_MM_SUBGRAPHS):
            for tensor in sub.tables(_SGM_OUTPUTS):
                add(tensor.tables(_TM_FILES), tensor.string(_TM_NAME) or "")
            add(sub.tables(_SGM_FILES), None)
        add(meta.tables(_MM_FILES), None)
    except _BAD:
        return []
    return sorted(found, key=lambda f: bool(f.locale) and not f.locale.lower().startswith("en"))


def custom_op_options(content: bytes, op_name: str) -> list[dict]:
    """The flexbuffer options map of every `op_name` custom op in the model (empty: no such op, or none
    readable)."""
    try:
        model = _root(content)
        codes = [c.string(_OPCODE_CUSTOM_CODE) for c in model.tables(_MODEL_OPERATOR_CODES)]
        out = []
        for sub in model.tables(_MODEL_SUBGRAPHS):
            for op in sub.tables(_SUBGRAPH_OPERATORS):
                if codes[op.scalar(_OPERATOR_OPCODE_INDEX, "I")] != op_name:
                    continue
                large = (op.scalar(_OPERATOR_LARGE_OPTIONS_OFFSET, "Q"), op.scalar(_OPERATOR_LARGE_OPTIONS_SIZE, "Q"))
                raw = op.bytes(_OPERATOR_CUSTOM_OPTIONS) or _outside(content, *large)
                options = flexbuffers.Loads(raw) if raw else None
                if isinstance(options, dict):
                    out.append(options)
        return out
    except _BAD:
        return []


def metadata_normalization(content: bytes) -> tuple[list[float], list[float]] | None:
    """(mean, std) of the first input's NormalizationOptions in the model's TFLite metadata, in the units the
    metadata gives (pixels 0..255 for image inputs); None when it says nothing."""
    try:
        data = _metadata_buffer(content, "TFLITE_METADATA")
        if not data or data[4:8] != b"M001":
            return None
        for sub in _root(data).tables(_MM_SUBGRAPHS):
            for tensor in sub.tables(_SGM_INPUTS)[:1]:
                for unit in tensor.tables(_TM_PROCESS_UNITS):
                    options = unit.table(_PU_OPTIONS)
                    if unit.scalar(_PU_OPTIONS_TYPE, "B") == _NORMALIZATION_OPTIONS and options is not None:
                        mean, std = options.floats(_NO_MEAN), options.floats(_NO_STD)
                        if mean and std and all(s > 0 for s in std):
                            return mean, std
    except _BAD:
        return None
    return None


# TFLite_Detection_PostProcess's options as its kernel (detection_postprocess.cc) reads them, with the
# kernel's defaults for those an exporter may leave out.
POSTPROCESS_OPTION_DEFAULTS = {"num_classes": None, "max_detections": None, "max_classes_per_detection": 1,
                               "detections_per_class": 100, "use_regular_nms": False, "nms_score_threshold": None,
                               "nms_iou_threshold": None, "y_scale": None, "x_scale": None, "h_scale": None,
                               "w_scale": None}


def postprocess_settings(content: bytes, op_name: str = "TFLite_Detection_PostProcess") -> dict | None:
    """The first `op_name` op's settings: {option: value}, and `defaulted`, the options the model leaves to
    the kernel's default; None when the model has no such op (or its options cannot be read)."""
    found = custom_op_options(content, op_name)
    if not found:
        return None
    given = found[0]
    settings = {k: given.get(k, default) for k, default in POSTPROCESS_OPTION_DEFAULTS.items()}
    settings["use_regular_nms"] = bool(settings["use_regular_nms"])
    settings["defaulted"] = sorted(k for k in POSTPROCESS_OPTION_DEFAULTS if k not in given)
    return settings
