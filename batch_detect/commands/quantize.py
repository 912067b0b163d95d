"""`batch-detect quantize`: post-training int8 quantization of a SavedModel (or Keras) detector, calibrated
on a sample of the user's own images read and preprocessed exactly as a run would, then `compare`d with
the float model converted from the same source, so the accuracy cost is on screen before the model is used.

TensorFlow is an optional extra (`pip install 'batch-detect[quantize]'`) and is imported here only.
Supported sources: a SavedModel (or `.keras` file) with one image input [1,H,W,1|3] float32 whose serving
signature already returns outputs a family in `decoding.py` understands: a raw YOLOv8 [1,4+C,N] or YOLOv5
[1,N,5+C] tensor, or SSD outputs from a function annotated
`experimental_implements="TFLite_Detection_PostProcess ..."` (as the TF2 Object Detection API's
`export_tflite_graph_tf2.py` and `tools/make_fixture_models.py` export it)."""

from __future__ import annotations

import os
import time


from .compare import compare, render, write
from ..config import IMAGE_EXTENSIONS
from ..model.detector import inspect_interpreter
from ..errors import BatchDetectError, ConfigError, InputError, MissingExtra, ModelError
from ..model.interpreter import load_backend, make_interpreter, tensor_specs
from ..inputs.listing import list_input
from ..model.preprocess import build_input, decode_image
from ..inputs.reading import Reader

IO_TYPES = ("int8", "uint8", "float32")
MAX_PIXELS = 89_478_485


def import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise MissingExtra(
            f"`batch-detect quantize` needs TensorFlow, which is not installed here ({exc}). Install the "
            "optional extra: pip install 'batch-detect[quantize]' (tensorflow-cpu); runs never need it"
        ) from None
    return tf


def _converter_factory(tf, source: str):
    """A function returning a fresh TFLiteConverter for `source` (a converter converts once)."""
    if not os.path.exists(source):
        raise ConfigError(f"--saved-model {source!r} not found: give a SavedModel folder or a .keras file")
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "saved_model.pb")):
            raise ConfigError(f"--saved-model {source!r} is a folder without saved_model.pb: not a SavedModel")
        return lambda: tf.lite.TFLiteConverter.from_saved_model(source)
    if source.endswith((".keras", ".h5")):
        try:
            model = tf.keras.models.load_model(source, compile=False)
        except Exception as exc:
            raise ModelError(f"cannot load Keras model {source!r}: {type(exc).__name__}: {exc}") from None
        return lambda: tf.lite.TFLiteConverter.from_keras_model(model)
    raise ConfigError(f"--saved-model {source!r} is a file but not .keras/.h5: give a SavedModel folder")


def _convert(make, what: str) -> bytes:
    try:
        return make()
    except BatchDetectError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        detail = " | ".join(text[-3:]) if text else type(exc).__name__
        raise ModelError(f"TensorFlow could not convert the model to {what}: {type(exc).__name__}: {detail}") from None


def calibration_tensors(info, input_url: str, samples: int, resize: str, storage_options: dict | None):
    """Up to `samples` input tensors from images spread over the input, read, decoded and mapped to the
    float model's input exactly as a run would (same decoder, resize and normalization)."""
    uris = list_input(input_url, IMAGE_EXTENSIONS, storage_options).uris
    if not uris:
        raise InputError(f"no images found at {input_url!r} to calibrate with; accepted: {', '.join(IMAGE_EXTENSIONS)}")
    chosen = uris[:: max(1, len(uris) // samples)][:samples]
    reader = Reader(storage_options)
    fit_to = (info.input.width, info.input.height, resize)
    tensors, skipped = [], []
    for uri in chosen:
        try:
            decoded = decode_image(reader.read(uri), MAX_PIXELS, fit_to)
            tensors.append(build_input(decoded, info.input, info.mapping, resize)[0])
        except BatchDetectError as exc:
            skipped.append(f"{uri}: {exc}")
    if not tensors:
        raise InputError(f"none of the {len(chosen)} images sampled from {input_url!r} could be decoded "
                         f"(first: {skipped[0]})")
    return tensors, skipped, len(uris)


def quantize(source: str, input_url: str, output: str, *, samples: int = 100, io: str = "int8",
             normalization: str = "auto", resize: str = "auto", output_format: str = "auto",
             compare_sample: int = 200, score_threshold: float = 0.25, labels: list | None = None,
             storage_options: dict | None = None, log=print) -> dict:
    tf = import_tensorflow()  # first: without it nothing else matters
    _check_arguments(io, samples, output)
    make = _converter_factory(tf, source)
    stem = os.path.abspath(output)[: -len(".tflite")]
    float_path, report_dir = stem + ".float32.tflite", stem + ".compare"

    t0 = time.perf_counter()
    float_bytes = _convert(lambda: make().convert(), "float32 TFLite")
    backend = load_backend()
    info = _float_detector(backend, float_bytes, source, normalization, output_format)
    with open(float_path, "wb") as fh:
        fh.write(float_bytes)
    log(f"float reference: {float_path} ({info.layout.family}, input {list(info.input.tensor.shape)}, "
        f"normalization {info.mapping.normalization}; {time.perf_counter() - t0:.1f}s)")

    resize = info.default_resize if resize == "auto" else resize  # calibrate on the pixels a run will feed
    tensors, skipped, listed = calibration_tensors(info, input_url, samples, resize, storage_options)
    log(f"calibration: {len(tensors)} images of {listed} at {input_url}"
        + (f" ({len(skipped)} could not be decoded and were left out)" if skipped else ""))

    t1 = time.perf_counter()
    int8_bytes = _convert(lambda: _int8_converter(tf, make, tensors, io, info.layout.family).convert(),
                          f"int8 with {io} I/O")
    quant_family = _write_int8(backend, int8_bytes, io, output, output_format)
    log(f"quantized: {output} ({len(int8_bytes)} bytes, {len(float_bytes)} float; {quant_family}, "
        f"{io} I/O; {time.perf_counter() - t1:.1f}s)")

    result = compare(output, float_path, input_url, sample=compare_sample, score_threshold=score_threshold,
                     resize=resize, normalization=normalization, output_format=output_format, labels=labels,
                     storage_options=storage_options)
    write(result, report_dir)
    log(render(result))
    log(f"compare report: {report_dir}/compare.json, {report_dir}/compare.parquet")
    return {"output": output, "reference": float_path, "report": report_dir, "family": info.layout.family,
            "io": io, "calibration_images": len(tensors), "calibration_skipped": skipped,
            "size_bytes": len(int8_bytes), "float_size_bytes": len(float_bytes),
            "compare": {k: result[k] for k in ("images", "matched_boxes", "recall", "precision", "mean_abs_dscore")}}


def _check_arguments(io: str, samples: int, output: str) -> None:
    # before any conversion: those take seconds to minutes
    if io not in IO_TYPES:
        raise ConfigError(f"--io must be one of {', '.join(IO_TYPES)}, got {io!r}")
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if not output.endswith(".tflite"):
        raise ConfigError(f"--output {output!r} must end in .tflite")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--output folder {out_dir!r} does not exist")


def _float_detector(backend, float_bytes: bytes, source: str, normalization: str, output_format: str):
    """The float model as this tool's detector sees it: it must be one it can run, taking float32 input."""
    try:
        info = inspect_interpreter(make_interpreter(backend, float_bytes, 1, source), normalization, output_format)
    except ModelError as exc:
        raise ModelError(f"{source!r} converts, but not to a detector this tool can run: {exc}") from None
    if info.input.tensor.dtype != "float32":
        raise ModelError(f"{source!r} takes {info.input.tensor.dtype} input; quantize needs a float32 model")
    return info


def _int8_converter(tf, make, tensors: list, io: str, family: str):
    """A converter set to quantize to int8, calibrated on `tensors`, with `io` as its input (and output) type."""
    converter = make()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([t] for t in tensors)
    if io != "float32":
        converter.inference_input_type = getattr(tf, io)
        if family != "ssd_postprocess":  # the SSD op's outputs are float by definition
            converter.inference_output_type = getattr(tf, io)
    return converter


def _write_int8(backend, int8_bytes: bytes, io: str, output: str, output_format: str) -> str:
    """Check the quantized model (a detector, with the input type asked for), then write it whole; its family."""
    quant_info = inspect_interpreter(make_interpreter(backend, int8_bytes, 1, output), "auto", output_format)
    inputs, _ = tensor_specs(make_interpreter(backend, int8_bytes, 1, output))
    if inputs[0].dtype != io:
        raise ModelError(f"the converter produced a {inputs[0].dtype} input, not the {io} asked for")
    tmp = output + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(int8_bytes)
    os.replace(tmp, output)
    return quant_info.layout.family
