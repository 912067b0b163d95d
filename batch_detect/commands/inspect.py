"""`batch-detect inspect MODEL`: explain a model before any job runs: its tensors (with quantization),
its ops, the detector family the job would decode it as, and warnings for what will break."""

from __future__ import annotations

from collections import Counter

from ..model.detector import inspect_interpreter
from ..errors import ModelError
from ..model.interpreter import load_backend, make_interpreter, read_model, sha256, tensor_specs
from ..model.labels import label_warnings, model_classes, model_labels
from ..model.modelfile import postprocess_settings

# Ops that mean the graph still holds resource variables: their values may never be initialised in
# TFLite, so outputs are garbage (freeze variables before converting).
_VARIABLE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}


def _ops(interp) -> list[str]:
    try:
        return [d["op_name"] for d in interp._get_ops_details()]
    except Exception:  # a private API: an interpreter without it still gets inspected
        return []


def inspect_model(url: str, normalization: str = "auto", storage_options: dict | None = None,
                  output_format: str = "auto", anchors: str | None = None, nms: str = "auto") -> dict:
    backend = load_backend()
    content = read_model(url, storage_options)
    # XNNPACK replaces what it can with DELEGATE nodes; a plain resolver shows the model's own ops.
    interp = make_interpreter(backend, content, 1, url)
    inputs, outputs = tensor_specs(interp)
    ops = _ops(_undelegated(backend, content) or interp)
    report = {
        "model": url,
        "sha256": sha256(content),
        "size_bytes": len(content),
        "backend": f"{backend.name} {backend.version}",
        "inputs": [_tensor(t) for t in inputs],
        "outputs": [_tensor(t) for t in outputs],
        "ops": dict(sorted(Counter(ops).items())),
        "custom_ops": sorted({o for o in ops if not o.isupper() or o.startswith("TFLite")}),
        "labels": None,
        "classes": None,
        "batch": ("dynamic" if len(inputs) == 1 and inputs[0].shape_signature[:1] == (-1,) else "fixed"),
        "family": None,
        "why_not": None,
        "warnings": [],
    }
    found = model_labels(content)
    if found.labels is not None:
        report["labels"] = {"file": found.file, "origin": found.origin, "count": len(found.labels),
                            "labels": found.labels}
    report["labels_passed_over"] = list(found.passed_over)
    warn = report["warnings"]
    if _VARIABLE_OPS & set(ops):
        warn.append("the model holds resource variables (" + ", ".join(sorted(_VARIABLE_OPS & set(ops)))
                    + "): outputs may come from uninitialised memory. Freeze the variables into constants "
                      "before converting (e.g. convert_variables_to_constants_v2, or export weights as constants)")
    dtypes = {t.dtype for t in inputs} | {t.dtype for t in outputs}
    if any(t.dtype in ("uint8", "int8") and t.scale == 0 for t in inputs + outputs):
        warn.append("an integer tensor has no quantization parameters: pixel/score scaling is unknown")
    if len(inputs) == 1 and inputs[0].dtype == "float32" and "DEQUANTIZE" in ops and "QUANTIZE" in ops:
        warn.append("float input over an integer network: quantize/dequantize at the edges cost time; "
                    "a uint8/int8-input export avoids them")
    if {"float32"} < dtypes and any(t.dtype in ("uint8", "int8") for t in outputs):
        warn.append("quantized outputs: they are dequantized with each tensor's scale and zero point")
    try:
        info = inspect_interpreter(interp, normalization, output_format, anchors, content, nms)
        report["family"] = info.layout.family
        report["decoding"] = info.describe()
        if info.layout.family == "ssd_postprocess":  # the op decodes inside the model: its own settings rule
            report["decoding"]["postprocess"] = postprocess_settings(content)
        classes = model_classes(content, info.layout)
        report["classes"] = {"count": classes.count, "from": classes.where} if classes else None
        if found.labels is not None:  # a model without labels is only a problem for a run without --labels
            warn += label_warnings(found.labels, found.source, classes)
    except ModelError as exc:
        report["why_not"] = str(exc)
    return report


def _undelegated(backend, content: bytes):
    try:
        from_module = backend.module
        resolver = from_module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interp = from_module.Interpreter(model_content=content, experimental_op_resolver_type=resolver)
        interp.allocate_tensors()
        return interp
    except Exception:
        return None


def _tensor(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "shape_signature": list(t.shape_signature),
            "quantization": {"scale": t.scale, "zero_point": t.zero_point} if t.scale else None}


def _postprocess_line(op: dict) -> str:
    """The TFLite_Detection_PostProcess op's own settings: it decodes, thresholds and suppresses inside the
    model, so the job's --score-threshold only filters what it keeps."""
    default = set(op["defaulted"])

    def val(k):
        v = op[k]
        shown = "?" if v is None else f"{v:g}" if isinstance(v, float) else str(v).lower()
        return f"{shown} (the op's default)" if k in default and v is not None else shown

    nms = "regular: NMS per class" if op["use_regular_nms"] else "fast: one class-agnostic NMS"
    return (f"post-processing (TFLite_Detection_PostProcess options): num_classes {val('num_classes')}, "
            f"max_detections {val('max_detections')}, max_classes_per_detection {val('max_classes_per_detection')}, "
            f"detections_per_class {val('detections_per_class')}, use_regular_nms {val('use_regular_nms')} ({nms}), "
            f"score threshold {val('nms_score_threshold')}, IoU threshold {val('nms_iou_threshold')}, box scales "
            f"y {val('y_scale')} x {val('x_scale')} h {val('h_scale')} w {val('w_scale')}; --score-threshold only "
            f"filters the boxes it keeps")


def render(report: dict) -> str:
    lines = [f"model: {report['model']} ({report['size_bytes']} bytes, sha256 {report['sha256'][:16]}…)",
             f"backend: {report['backend']}"]
    for kind in ("inputs", "outputs"):
        for t in report[kind]:
            q = t["quantization"]
            qs = f" scale={q['scale']:g} zero_point={q['zero_point']}" if q else ""
            dyn = f" signature={t['shape_signature']}" if t["shape_signature"] != t["shape"] else ""
            lines.append(f"{kind[:-1]:>6}: {t['name']} {t['dtype']} {t['shape']}{dyn}{qs}")
    lines.append("ops: " + ", ".join(f"{k}×{v}" for k, v in report["ops"].items()))
    if report["custom_ops"]:
        lines.append("custom ops: " + ", ".join(report["custom_ops"]))
    if report["labels"]:
        lab = report["labels"]
        shown = ", ".join(str(x) for x in lab["labels"][:20]) + (", …" if lab["count"] > 20 else "")
        how = f", {lab['origin']}" if lab["origin"] else ""
        lines.append(f"labels: {lab['count']} embedded in the model ({lab['file']}{how}; used when --labels is not "
                     f"given): {shown}")
    else:
        lines.append("labels: none in the model (a run without --labels FILE writes null labels)")
    lines += [f"  not taken as labels: {why}" for why in report["labels_passed_over"]]
    lines.append("batch: dynamic: --batch-size N runs N images per invoke" if report["batch"] == "dynamic"
                 else "batch: fixed: one image per invoke")
    if report["family"]:
        dec = report["decoding"]
        roles = ", ".join(f"{o['role']}={o['name']}" for o in dec["outputs"])
        lines.append(f"family: {report['family']} ({roles}); input normalization {dec['input']['normalization']} "
                     f"(from {dec['input']['normalization_from']})")
        if dec.get("postprocess"):
            lines.append(_postprocess_line(dec["postprocess"]))
        if dec.get("anchors"):
            extra = "".join(f"; {k} {dec[k]}" for k in ("score", "box_scales", "nms", "keypoints") if k in dec)
            lines.append(f"anchors: {dec['anchors']}{extra}")
    else:
        lines.append(f"family: none: {report['why_not']}")
    if report["classes"]:
        lines.append(f"classes: {report['classes']['count']} ({report['classes']['from']})")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
