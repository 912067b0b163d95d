"""Bytes → validated input tensor: decode (EXIF orientation, any mode → RGB), refuse oversized images,
resize to the model input, and map pixels to the input's dtype with its own quantization.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DecodeError, DtypeMismatch, ImageTooLarge, ModelError, ShapeMismatch
from . import fastjpeg
from .geometry import Placement, fitted_size, resize_array_to_input, resize_to_input
from .interpreter import TensorSpec

try:  # HEIC/HEIF, phones' default format, through libheif; Pillow reads AVIF itself (since 11.3)
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_PLUGIN = True
except ImportError:  # a cluster image without it: HEIC files become failures that name the package
    HEIF_PLUGIN = False

# ISOBMFF brands of HEIF and AVIF images (bytes 8-12, after the `ftyp` box header).
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}

_NORMALIZATION_AFFINE = {"-1,1": (1 / 127.5, -1.0), "0,1": (1 / 255.0, 0.0), "0,255": (1.0, 0.0)}
_INT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass(frozen=True)
class InputSpec:
    """What the model's image input needs: NHWC with 1 or 3 channels, and how to fill it."""

    tensor: TensorSpec
    height: int
    width: int
    channels: int

    @classmethod
    def from_tensor(cls, spec: TensorSpec) -> "InputSpec":
        shape = spec.shape
        if len(shape) != 4 or shape[0] != 1 or shape[3] not in (1, 3):
            raise ModelError(
                f"model input {spec.name!r} has shape {list(shape)}; an image input must be NHWC "
                "[1, height, width, 1 or 3]. NCHW models must be converted with a NHWC input."
            )
        if spec.dtype not in ("uint8", "int8", "float32"):
            raise ModelError(
                f"model input {spec.name!r} is {spec.dtype}; supported image inputs are uint8, int8 and float32"
            )
        return cls(tensor=spec, height=shape[1], width=shape[2], channels=shape[3])


@dataclass(frozen=True)
class PixelMapping:
    """tensor = pixel * a + b, then rounded and clipped for integer inputs. For float inputs with a
    per-channel mean/std, a and b are tuples (one value per channel)."""

    dtype: str
    a: float | tuple[float, ...]
    b: float | tuple[float, ...]
    normalization: str  # "-1,1", "0,1", "0,255", or "mean=...;std=..." (pixel units)

    @property
    def is_integer_shift(self) -> bool:
        return self.dtype != "float32" and abs(self.a - 1.0) < 1e-3 and abs(self.b - round(self.b)) < 1e-3

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        if self.dtype == "float32":
            # one float array written in place: a 640x640 input is 4.9 MB, and each temporary costs a pass
            out = np.multiply(pixels, np.asarray(self.a, np.float32), dtype=np.float32)
            b = np.asarray(self.b, np.float32)
            if b.any():
                out += b
            return out
        lo, hi = _INT_RANGE[self.dtype]
        if self.is_integer_shift:
            shift = int(round(self.b))
            if shift == 0 and self.dtype == "uint8":
                return pixels  # the common uint8 case: raw pixels, no copy
            return np.clip(pixels.astype(np.int16) + shift, lo, hi).astype(self.dtype)
        return np.clip(np.rint(pixels.astype(np.float32) * self.a + self.b), lo, hi).astype(self.dtype)


def mean_std_spec(mean, std) -> str:
    """The normalization string for `(pixel - mean) / std`, mean and std in pixel units (0..255)."""
    return "mean=" + ",".join(f"{float(v):g}" for v in mean) + ";std=" + ",".join(f"{float(v):g}" for v in std)


def parse_mean_std(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from a "mean=a[,b,c];std=x[,y,z]" normalization, None for the named ranges."""
    if not normalization.startswith("mean="):
        return None
    try:
        mean_part, std_part = normalization.split(";")
        mean = tuple(float(v) for v in mean_part[len("mean="):].split(","))
        if not std_part.startswith("std="):
            raise ValueError("std missing")
        std = tuple(float(v) for v in std_part[len("std="):].split(","))
    except ValueError:
        raise ModelError(f"normalization {normalization!r} is not 'mean=M[,M,M];std=S[,S,S]'") from None
    return mean, std


def _mean_std_mapping(spec: InputSpec, normalization: str, mean, std) -> PixelMapping:
    t = spec.tensor
    if t.dtype != "float32":
        raise ModelError(
            f"--input-mean/--input-std apply to float inputs; model input {t.name!r} is {t.dtype} and its "
            f"scale {t.scale:g} / zero point {t.zero_point} decide how pixels map to it. Drop them"
        )
    for name, values in (("--input-mean", mean), ("--input-std", std)):
        if len(values) not in (1, spec.channels):
            raise ModelError(f"{name} has {len(values)} values; model input {t.name!r} has {spec.channels} "
                             f"channel(s): give 1 or {spec.channels}")
    if any(s <= 0 for s in std):
        raise ModelError(f"--input-std values must be positive, got {','.join(f'{s:g}' for s in std)}")
    mean_b = np.broadcast_to(np.asarray(mean, np.float64), (max(len(mean), len(std)),))
    std_b = np.broadcast_to(np.asarray(std, np.float64), mean_b.shape)
    a = tuple(float(1.0 / s) for s in std_b)
    b = tuple(float(-m / s) for m, s in zip(mean_b, std_b))
    return PixelMapping("float32", a if len(a) > 1 else a[0], b if len(b) > 1 else b[0], normalization)


def pixel_mapping(spec: InputSpec, normalization: str, default_normalization: str = "-1,1") -> PixelMapping:
    """How 0..255 pixels become this input. For integer inputs the model's scale and zero point
    decide; a normalisation that contradicts them is a quantization mistake, reported here."""
    t = spec.tensor
    mean_std = parse_mean_std(normalization)
    if mean_std is not None:
        return _mean_std_mapping(spec, normalization, *mean_std)
    if t.dtype == "float32":
        norm = default_normalization if normalization == "auto" else normalization
        a, b = _NORMALIZATION_AFFINE[norm]
        return PixelMapping("float32", a, b, norm)
    lo, hi = _INT_RANGE[t.dtype]
    if t.scale <= 0:
        # No quantization parameters: the model takes integer pixels as they are.
        return PixelMapping(t.dtype, 1.0, float(lo), "0,255")
    real_lo, real_hi = (lo - t.zero_point) * t.scale, (hi - t.zero_point) * t.scale

    def mapping_for(norm: str) -> PixelMapping:
        na, nb = _NORMALIZATION_AFFINE[norm]
        a, b = na / t.scale, nb / t.scale + t.zero_point
        if abs(a - 1.0) < 0.01 and abs(b - lo) <= 1.0:
            # The converter's integer-input convention: the model takes pixels as they are (uint8) or
            # shifted by 128 (int8); scale/zero point only round to it (e.g. 1/127.5 and 128 → p+0.5).
            return PixelMapping(t.dtype, 1.0, float(lo), norm)
        return PixelMapping(t.dtype, a, b, norm)

    def problem(m: PixelMapping) -> str | None:
        # Pixels 0..255 must land inside the integer range (no clipping) and spread over enough of it
        # (not squashed into a few levels); calibration often uses only part of the range, which is fine.
        q0, q255 = m.b, 255 * m.a + m.b
        span = hi - lo
        if min(q0, q255) < lo - 0.02 * span or max(q0, q255) > hi + 0.02 * span:
            return f"pixels map to {q0:.0f}..{q255:.0f}, outside {t.dtype}'s {lo}..{hi}: they would be clipped"
        if abs(q255 - q0) < 0.1 * span:
            return f"pixels map to {q0:.1f}..{q255:.1f}: squashed into {abs(q255 - q0) + 1:.0f} levels"
        return None

    if normalization == "auto":
        # The family's convention first, then the others: the first that fits the quantization wins.
        order = [default_normalization] + [n for n in _NORMALIZATION_AFFINE if n != default_normalization]
        for norm in order:
            if problem(mapping_for(norm)) is None:
                return mapping_for(norm)
        raise ModelError(
            f"model input {t.name!r} is {t.dtype} with scale {t.scale:g} and zero point {t.zero_point}, "
            f"i.e. real values {real_lo:g}..{real_hi:g}, which fits no pixel normalisation "
            "(-1..1, 0..1, 0..255); pass --normalization explicitly if you know what the model expects"
        )
    chosen = mapping_for(normalization)
    why = problem(chosen)
    if why is not None:
        raise ModelError(
            f"--normalization {normalization} contradicts the quantization of model input {t.name!r} "
            f"({t.dtype}, scale {t.scale:g}, zero point {t.zero_point}: real values {real_lo:g}..{real_hi:g}): "
            f"{why}. Use --normalization auto to follow the model."
        )
    return chosen


@dataclass(frozen=True)
class Decoded:
    pixels: Image.Image | np.ndarray  # RGB, EXIF orientation applied: a Pillow image, or H x W x 3 uint8 (fastjpeg)
    width: int
    height: int

    @property
    def image(self) -> Image.Image:
        return self.pixels if isinstance(self.pixels, Image.Image) else Image.fromarray(self.pixels)


def decode_image(data: bytes, max_pixels: int, fit_to: tuple[int, int, str] | None = None) -> Decoded:
    """Decode to RGB with EXIF orientation applied. With `fit_to` (the input's width, height and resize
    mode), a JPEG much larger than what the resize will make of it is decoded at 1/2, 1/4 or 1/8 scale by
    libjpeg, never below that size, so the resize still only shrinks: most of the decode cost of a large
    photo for a small model input disappears. Such JPEGs are decoded into an array by fastjpeg where it is
    installed. Width and height are always the full image's."""
    if not data:
        raise DecodeError("empty file (0 bytes)", error_type="empty_file")
    # Pillow checks sizes itself (in open, and per frame for GIFs) against its own global limit, with a message
    # that never names --max-pixels: set to ours, its checks enforce the one limit and ours words it.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only: format, size, mode, EXIF
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLarge(_too_large(f"{w}x{h} = {w * h} pixels", max_pixels))
            orientation = img.getexif().get(0x0112, 1)
            # orientations 5-8 turn the image by 90°: the displayed width is the stored height
            turned = orientation in (5, 6, 7, 8)
            width, height = (h, w) if turned else (w, h)
            if fit_to is not None and img.format == "JPEG":
                tw, th = fitted_size(width, height, *fit_to)
                target = (th, tw) if turned else (tw, th)  # the stored image's target turns too
                fast = fastjpeg.decode(data, w, h, target, orientation) if fastjpeg.takes(img.format, img.mode) else None
                if fast is not None:
                    return Decoded(fast, width, height)
                img.draft("RGB", target)
            img.load()
            if orientation != 1:  # exif_transpose copies the whole image even when there is nothing to turn
                img = ImageOps.exif_transpose(img)
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's wording: "Image size (N pixels) exceeds ..."
        raise ImageTooLarge(_too_large(f"{int(found.group(1)) if found else 'more than that many'} pixels",
                                       max_pixels)) from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt data: Pillow raises OSError ("image file is truncated") or SyntaxError.
        raise DecodeError(f"corrupt or truncated image: {exc}", error_type="corrupt_image") from None
    return Decoded(_to_rgb(img), width, height)


def _too_large(size: str, max_pixels: int) -> str:
    return f"image is {size}, over the limit of {max_pixels} pixels: raise it with --max-pixels N"


def _unidentified(data: bytes) -> DecodeError:
    """A HEIF/AVIF container that no plugin could open is corrupt (or its plugin is missing), not unknown."""
    brand = data[8:12] if data[4:8] == b"ftyp" else b""
    if brand in _HEIF_BRANDS and not HEIF_PLUGIN:
        return DecodeError("HEIC/HEIF image, but pillow-heif is not installed where this ran: pip install pillow-heif",
                           error_type="unidentified_image")
    if brand in _HEIF_BRANDS | _AVIF_BRANDS:
        kind = "AVIF" if brand in _AVIF_BRANDS else "HEIF"
        return DecodeError(f"corrupt or truncated {kind} image (ftyp brand {brand.decode()!r})",
                           error_type="corrupt_image")
    return DecodeError("not a recognised image format", error_type="unidentified_image")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Wide greyscale: scale to 8 bits by the type's range rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def build_input(
    decoded: Decoded, spec: InputSpec, mapping: PixelMapping, resize: str
) -> tuple[np.ndarray, Placement]:
    """The [1,H,W,C] tensor for this image, checked against the model input before it is used."""
    if isinstance(decoded.pixels, np.ndarray):
        pixels, placement = resize_array_to_input(decoded.pixels, spec.width, spec.height, resize)
        image = Image.fromarray(pixels) if spec.channels == 1 else None  # Pillow's luma, as on its own path
    else:
        image, placement = resize_to_input(decoded.pixels, spec.width, spec.height, resize)
    if image is not None:
        pixels = np.asarray(image.convert("L") if spec.channels == 1 else image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    tensor = mapping.apply(pixels)[None, ...]
    expected = (1, spec.height, spec.width, spec.channels)
    if tensor.shape != expected:
        raise ShapeMismatch(f"input tensor shape {list(tensor.shape)} does not match the model's {list(expected)}")
    if tensor.dtype.name != spec.tensor.dtype:
        raise DtypeMismatch(f"input tensor is {tensor.dtype.name}, the model wants {spec.tensor.dtype}")
    return tensor, placement
