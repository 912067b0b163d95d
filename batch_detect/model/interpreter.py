"""The TFLite interpreter: one backend chosen once (LiteRT first, tflite-runtime as the fallback),
model bytes read through fsspec, and a description of the model's tensors taken from the model itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import os
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
from fsspec.core import url_to_fs

from ..errors import ModelError, StoreUnavailable
from ..outage import OUTAGE

# (import path, distribution name). LiteRT is the maintained successor of tflite-runtime.
_BACKENDS = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite_runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
}
BACKEND_ENV = "BATCH_DETECT_TFLITE_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    version: str
    module: object

    def interpreter(self, model_content: bytes, num_threads: int):
        return self.module.Interpreter(model_content=model_content, num_threads=num_threads)


def load_backend(preferred: str | None = None) -> Backend:
    """LiteRT unless `preferred` (or $BATCH_DETECT_TFLITE_BACKEND) names the other one."""
    preferred = preferred or os.environ.get(BACKEND_ENV) or None
    if preferred is not None and preferred not in _BACKENDS:
        raise ModelError(f"{BACKEND_ENV}={preferred!r} is not a backend; use one of {', '.join(_BACKENDS)}")
    order = [preferred] if preferred else list(_BACKENDS)
    problems = []
    for name in order:
        module_path, dist = _BACKENDS[name]
        try:
            module = importlib.import_module(module_path)
        except Exception as exc:  # ImportError, or tflite-runtime's SystemError under numpy 2
            problems.append(f"{dist}: {type(exc).__name__}: {exc}")
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return Backend(name, version, module)
    raise ModelError(
        "no TFLite interpreter could be imported ("
        + "; ".join(problems)
        + "). Install ai-edge-litert (`pip install ai-edge-litert`), or tflite-runtime with numpy<2."
    )


def _read_whole(fs, path: str) -> bytes:
    with fs.open(path, "rb") as fh:
        return fh.read()


def read_model(url: str, storage_options: dict | None = None) -> bytes:
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
        data = OUTAGE.call(_read_whole, fs, path, what="the model", store=url)  # a worker restarting mid-outage
    except StoreUnavailable:
        raise
    except FileNotFoundError:
        raise ModelError(f"model {url!r} not found: check the --model path or URL") from None
    except IsADirectoryError:
        raise ModelError(f"model {url!r} is a folder: give the path of the .tflite file") from None
    except (PermissionError, OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot read model {url!r}: {type(exc).__name__}: {exc}") from None
    # A TFLite flatbuffer carries the file identifier "TFL3" at bytes 4..8.
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(
            f"model {url!r} is not a TFLite file (no 'TFL3' identifier in its header): "
            "give a .tflite flatbuffer, converted with the TFLite converter"
        )
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    index: int
    name: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    dtype: str  # numpy dtype name
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, d: dict) -> "TensorSpec":
        scale, zero_point = d.get("quantization", (0.0, 0))
        return cls(
            index=int(d["index"]),
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),
            shape_signature=tuple(int(x) for x in d.get("shape_signature", d["shape"])),
            dtype=np.dtype(d["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )

    @property
    def quantized(self) -> bool:
        return self.dtype in ("uint8", "int8", "int16", "int32") and self.scale > 0

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        if self.quantized:
            return (values.astype(np.float32) - self.zero_point) * self.scale
        return values.astype(np.float32, copy=False)


_EDGE_TPU_OP = b"edgetpu-custom-op"  # the one custom op edgetpu_compiler puts the compiled graph in
# The runtime's C++ logger prints this once per process on the first allocation, on every command, and
# offers Python no switch (tflite::LoggerOptions is C++ only): it is taken out of what that call prints.
_DELEGATE_NOTICE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
_first_allocation = threading.Lock()
_allocated_once = False


@contextlib.contextmanager
def _without_delegate_notice():
    global _allocated_once
    with _first_allocation:
        if _allocated_once:
            yield
            return
        _allocated_once = True
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # stderr replaced by something without a descriptor
            yield
            return
        sys.stderr.flush()
        saved = os.dup(fd)
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), fd)
            try:
                yield
            finally:
                os.dup2(saved, fd)
                os.close(saved)
                caught.seek(0)
                rest = caught.read().replace(_DELEGATE_NOTICE, b"")
                if rest:  # anything else the runtime said (an error's details) is passed on
                    os.write(fd, rest)


def make_interpreter(backend: Backend, model_content: bytes, num_threads: int, url: str = "model"):
    try:
        interp = backend.interpreter(model_content, num_threads)
        with _without_delegate_notice():
            interp.allocate_tensors()
    except Exception as exc:
        if _EDGE_TPU_OP in model_content:
            raise ModelError(
                f"{url!r} was compiled for the Edge TPU (edgetpu_compiler): its graph is an {_EDGE_TPU_OP.decode()} "
                "that only a Coral accelerator runs, and this tool runs models on the CPU. Use the CPU model it was "
                "compiled from (Coral publishes both; the CPU one has no _edgetpu in its name)") from None
        raise ModelError(
            f"{backend.name} {backend.version} cannot load {url!r}: {type(exc).__name__}: {exc}"
        ) from None
    return interp


def tensor_specs(interp) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [TensorSpec.from_details(d) for d in interp.get_input_details()],
        [TensorSpec.from_details(d) for d in interp.get_output_details()],
    )
