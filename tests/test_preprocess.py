import io

import numpy as np
import pytest
from PIL import Image

from batch_detect.errors import DecodeError, ImageTooLarge, ModelError
from batch_detect.model.geometry import fitted_size, resize_to_input
from batch_detect.model.interpreter import TensorSpec
from batch_detect.model.preprocess import InputSpec, build_input, decode_image, pixel_mapping


def spec(dtype="uint8", shape=(1, 8, 8, 3), scale=0.0, zp=0) -> InputSpec:
    return InputSpec.from_tensor(TensorSpec(0, "input", shape, shape, dtype, scale, zp))


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w=8, h=8) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = 128
    arr[..., 2] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


def test_uint8_input_gets_raw_pixels_without_a_copy():
    s = spec("uint8", scale=1 / 127.5, zp=128)
    m = pixel_mapping(s, "auto")
    assert m.normalization == "-1,1" and m.is_integer_shift
    decoded = decode_image(encode(gradient()), 10**6)
    tensor, _ = build_input(decoded, s, m, "stretch")
    assert tensor.dtype == np.uint8 and tensor.shape == (1, 8, 8, 3)
    assert np.array_equal(tensor[0], np.asarray(gradient()))


def test_int8_input_uses_scale_and_zero_point():
    # YOLO-style full-integer input: real = (q + 128) / 255 = pixel / 255
    s = spec("int8", scale=1 / 255, zp=-128)
    m = pixel_mapping(s, "auto")
    assert m.normalization == "0,1"
    tensor, _ = build_input(decode_image(encode(gradient()), 10**6), s, m, "stretch")
    assert tensor.dtype == np.int8
    expected = np.asarray(gradient()).astype(np.int16) - 128
    assert np.array_equal(tensor[0].astype(np.int16), expected)


@pytest.mark.parametrize("norm,lo,hi", [("-1,1", -1.0, 1.0), ("0,1", 0.0, 1.0), ("0,255", 0.0, 255.0)])
def test_float32_normalisations(norm, lo, hi):
    s = spec("float32")
    m = pixel_mapping(s, norm)
    img = Image.fromarray(np.array([[[0, 255, 0]] * 8] * 8, np.uint8))
    tensor, _ = build_input(decode_image(encode(img), 10**6), s, m, "stretch")
    assert tensor.dtype == np.float32
    assert tensor[0, 0, 0, 0] == pytest.approx(lo) and tensor[0, 0, 0, 1] == pytest.approx(hi)


def test_float32_auto_follows_the_family_default():
    assert pixel_mapping(spec("float32"), "auto", default_normalization="0,1").normalization == "0,1"


def test_forcing_a_normalisation_that_contradicts_the_quantization_is_refused():
    s = spec("uint8", scale=1 / 255, zp=0)  # the model sees 0..1
    with pytest.raises(ModelError, match="contradicts the quantization"):
        pixel_mapping(s, "-1,1")


def test_unusual_input_layouts_are_refused():
    with pytest.raises(ModelError, match="NHWC"):
        spec("float32", shape=(1, 3, 8, 8))
    with pytest.raises(ModelError, match="int16"):
        spec("int16")


def test_grayscale_model_input():
    s = spec("uint8", shape=(1, 8, 8, 1), scale=1 / 127.5, zp=128)
    tensor, _ = build_input(decode_image(encode(gradient()), 10**6), s, pixel_mapping(s, "auto"), "stretch")
    assert tensor.shape == (1, 8, 8, 1)


def test_decode_errors_are_typed():
    with pytest.raises(DecodeError) as e:
        decode_image(b"", 100)
    assert e.value.error_type == "empty_file" and e.value.stage == "decode"
    with pytest.raises(DecodeError) as e:
        decode_image(b"hello" * 20, 100)
    assert e.value.error_type == "unidentified_image"
    jpeg = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    with pytest.raises(DecodeError) as e:
        decode_image(jpeg[: len(jpeg) // 2], 10**6)
    assert e.value.error_type == "corrupt_image"
    with pytest.raises(ImageTooLarge) as e:
        decode_image(encode(gradient(40, 30)), 1000)
    assert e.value.stage == "validate" and "1200" in str(e.value)


def test_modes_become_rgb_and_exif_orientation_is_applied():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent → composited on white
    assert decode_image(encode(rgba), 100).image.getpixel((0, 0)) == (255, 255, 255)
    wide = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert wide.mode.startswith("I")
    assert decode_image(encode(wide), 100).image.getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert decode_image(encode(cmyk, "JPEG"), 100).image.mode == "RGB"
    # EXIF orientation 6 (rotate 90° CW on display): a 40x20 stored image displays as 20x40
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(img, "JPEG", exif=exif), 10**6)
    assert (decoded.width, decoded.height) == (20, 40)


def test_letterbox_placement_roundtrip():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    canvas, placement = resize_to_input(img, 50, 50, "letterbox")
    assert canvas.size == (50, 50)
    assert placement.y_offset == pytest.approx(0.24, abs=0.02) and placement.x_scale == 1.0
    assert canvas.getpixel((25, 2)) == (114, 114, 114) and canvas.getpixel((25, 25)) == (0, 0, 0)
    boxes = np.array([[0.1, 0.2, 0.7, 0.9]], np.float32)
    assert np.allclose(placement.to_image(placement.to_input(boxes)), boxes, atol=1e-6)
    # boxes reaching into the padding are clipped to the image
    assert placement.to_image(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)).tolist() == [[0, 0, 1, 1]]


def test_jpeg_draft_decodes_smaller_but_reports_the_full_size():
    big = Image.fromarray(np.random.default_rng(3).integers(0, 255, (1080, 1920, 3), np.uint8))
    data = encode(big, "JPEG", quality=90)
    drafted = decode_image(data, 10**8, fit_to=(300, 300, "stretch"))
    assert (drafted.width, drafted.height) == (1920, 1080)
    assert drafted.image.size == (960, 540)  # 1/2 scale: 1/4 would go below 300 pixels
    full = decode_image(data, 10**8)
    assert full.image.size == (1920, 1080)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encode(big, "JPEG", exif=exif)
    rotated = decode_image(turned, 10**8, fit_to=(300, 300, "stretch"))
    assert (rotated.width, rotated.height) == (1080, 1920) and rotated.image.size == (540, 960)


def test_jpeg_draft_follows_what_the_resize_keeps():
    """A stretched 640x640 input needs all 1080 lines; a letterboxed one keeps 640x360 of the image, so
    the same photo decodes at 1/2 scale. A turned photo and a non-square input are fitted the right way round."""
    big = Image.fromarray(np.random.default_rng(3).integers(0, 255, (1080, 1920, 3), np.uint8))
    data = encode(big, "JPEG", quality=90)
    assert decode_image(data, 10**8, fit_to=(640, 640, "stretch")).image.size == (1920, 1080)
    assert decode_image(data, 10**8, fit_to=(640, 640, "letterbox")).image.size == (960, 540)
    assert decode_image(data, 10**8, fit_to=(480, 270, "stretch")).image.size == (480, 270)  # 1/4
    assert decode_image(data, 10**8, fit_to=(270, 480, "stretch")).image.size == (960, 540)  # 1/4: 270 < 480 high
    exif = Image.Exif()
    exif[0x0112] = 6  # shown 1080 wide, 1920 high
    turned = encode(big, "JPEG", exif=exif)
    assert decode_image(turned, 10**8, fit_to=(270, 480, "stretch")).image.size == (270, 480)
    assert decode_image(turned, 10**8, fit_to=(480, 270, "stretch")).image.size == (540, 960)
    # never below the fitted size, so the resize only ever shrinks
    for mode in ("stretch", "letterbox"):
        for fit in ((300, 300), (640, 640), (320, 192), (192, 320)):
            for photo in (data, turned):
                decoded = decode_image(photo, 10**8, fit_to=(*fit, mode))
                need = fitted_size(decoded.width, decoded.height, *fit, mode)
                assert decoded.image.width >= need[0] and decoded.image.height >= need[1], (mode, fit)


def test_mean_std_for_float_inputs_per_channel():
    from batch_detect.model.preprocess import mean_std_spec

    s = spec("float32")
    norm = mean_std_spec([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    m = pixel_mapping(s, norm)
    assert m.normalization == norm
    decoded = decode_image(encode(gradient()), 10**6)
    tensor, _ = build_input(decoded, s, m, "stretch")
    expected = (np.asarray(gradient(), np.float32) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    assert tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], expected, rtol=1e-5, atol=1e-5)
    # one value for every channel: mean 127.5, std 127.5 is the -1..1 range
    one = pixel_mapping(s, mean_std_spec([127.5], [127.5]))
    np.testing.assert_allclose(one.apply(np.asarray(gradient())), pixel_mapping(s, "-1,1").apply(np.asarray(gradient())),
                               atol=1e-6)


def test_mean_std_refused_where_it_cannot_apply():
    from batch_detect.model.preprocess import mean_std_spec

    with pytest.raises(ModelError, match="apply to float inputs.*uint8"):
        pixel_mapping(spec("uint8", scale=1 / 255, zp=0), mean_std_spec([127.5], [127.5]))
    with pytest.raises(ModelError, match="3 values.*1 channel"):
        pixel_mapping(spec("float32", shape=(1, 8, 8, 1)), mean_std_spec([1, 2, 3], [1, 1, 1]))


def test_mean_std_settings_are_checked(tmp_path):
    from batch_detect.config import RunConfig, config_from_values, load_config_file
    from batch_detect.errors import ConfigError

    def cfg(**kw):
        return RunConfig(model="m", input="i", output="o", **kw).validate()

    assert cfg(input_mean="123.675,116.28,103.53", input_std="58.395,57.12,57.375").pixel_normalization == \
        "mean=123.675,116.28,103.53;std=58.395,57.12,57.375"
    assert cfg().pixel_normalization == "auto" and cfg(normalization="0,1").pixel_normalization == "0,1"
    with pytest.raises(ConfigError, match="go together"):
        cfg(input_mean="127.5")
    with pytest.raises(ConfigError, match="give one of them"):
        cfg(input_mean="127.5", input_std="127.5", normalization="-1,1")
    with pytest.raises(ConfigError, match="positive"):
        cfg(input_mean="0", input_std="0")
    with pytest.raises(ConfigError, match="1 value or 3"):
        cfg(input_mean="1,2", input_std="1")
    with pytest.raises(ConfigError, match="takes numbers"):
        cfg(input_mean="a,b,c", input_std="1")
    toml = tmp_path / "job.toml"
    toml.write_text('model = "m"\ninput = "i"\noutput = "o"\ninput_mean = [0.0, 0.0, 0.0]\ninput_std = 255\n')
    c = config_from_values(load_config_file(str(toml))).validate()
    assert c.pixel_normalization == "mean=0,0,0;std=255"


def test_mean_std_reaches_the_detector(models_dir):
    """The float fixture was trained on -1..1: mean 127.5 / std 127.5 gives the same detections, and a
    wrong mean/std changes them (the option is really used)."""
    import os

    from batch_detect.model.detector import Detector
    from batch_detect.model.interpreter import load_backend, read_model
    from batch_detect.synthetic import draw_scene, scene_rng

    content = read_model(os.path.join(models_dir, "shapes_ssd_float32.tflite"))

    def detect(norm):
        det = Detector(load_backend(), content, num_threads=1, score_threshold=0.3, resize="stretch",
                       normalization=norm, max_pixels=10**8)
        image, _ = draw_scene(scene_rng(99, 0), 320, 240)
        return det.process("x.png", encode(image)).detections

    ref, same, wrong = detect("-1,1"), detect("mean=127.5;std=127.5"), detect("mean=0;std=255")
    assert len(ref.scores) >= 1
    np.testing.assert_allclose(same.scores, ref.scores, atol=1e-5)
    assert len(wrong.scores) != len(ref.scores) or not np.allclose(wrong.scores, ref.scores, atol=0.05)


def _photo(w=1920, h=1080) -> Image.Image:
    from batch_detect.synthetic import draw_scene, scene_rng

    return draw_scene(scene_rng(34, w), w, h)[0]


def test_fast_jpeg_path_is_taken_and_matches_pillows(monkeypatch):
    """simplejpeg + OpenCV's area resize (issue #34) against Pillow's draft + bilinear, forced by turning
    the fast path off: the same scale, sizes and placement, pixels within JPEG rounding of each other."""
    from batch_detect.model import fastjpeg

    if not fastjpeg.ENABLED:
        msg = "simplejpeg or opencv-python-headless is not installed: only Pillow's path exists here"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    data = encode(_photo(), "JPEG", quality=90)
    for size, mode in (((300, 300), "stretch"), ((640, 640), "letterbox"), ((320, 192), "letterbox")):
        fast = decode_image(data, 10**8, fit_to=(*size, mode))
        with monkeypatch.context() as m:
            m.setattr(fastjpeg, "ENABLED", False)
            slow = decode_image(data, 10**8, fit_to=(*size, mode))
        assert isinstance(fast.pixels, np.ndarray) and isinstance(slow.pixels, Image.Image)
        assert (fast.width, fast.height) == (slow.width, slow.height) == (1920, 1080)
        # the same libjpeg scale and decoder: identical decoded pixels
        assert np.array_equal(fast.pixels, np.asarray(slow.pixels)), (size, mode)
        s = spec("uint8", shape=(1, size[1], size[0], 3))
        m8 = pixel_mapping(s, "auto")
        (ft, fp), (st, sp) = build_input(fast, s, m8, mode), build_input(slow, s, m8, mode)
        assert fp == sp and ft.shape == st.shape
        diff = np.abs(ft.astype(np.int16) - st.astype(np.int16))
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12, (size, mode, diff.mean())
    # one channel: Pillow's luma of the resized pixels on both paths
    gray = spec("uint8", shape=(1, 300, 300, 1))
    t1, _ = build_input(decode_image(data, 10**8, fit_to=(300, 300, "stretch")), gray, pixel_mapping(gray, "auto"),
                        "stretch")
    assert t1.shape == (1, 300, 300, 1) and 60 < t1.mean() < 200


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_path_applies_every_exif_orientation(orientation, monkeypatch):
    from batch_detect.model import fastjpeg

    if not fastjpeg.ENABLED:
        msg = "simplejpeg or opencv-python-headless is not installed"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_photo(1200, 800), "JPEG", quality=92, exif=exif)
    fast = decode_image(data, 10**8, fit_to=(300, 300, "stretch"))
    monkeypatch.setattr(fastjpeg, "ENABLED", False)
    slow = decode_image(data, 10**8, fit_to=(300, 300, "stretch"))
    assert isinstance(fast.pixels, np.ndarray)
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert fast.pixels.flags.c_contiguous and np.array_equal(fast.pixels, np.asarray(slow.pixels))


def test_fast_jpeg_path_leaves_the_rest_to_pillow():
    """Greyscale JPEGs take it (as RGB); CMYK JPEGs, PNGs and broken JPEGs keep Pillow's path and errors."""
    from batch_detect.model import fastjpeg

    if not fastjpeg.ENABLED:
        msg = "simplejpeg or opencv-python-headless is not installed"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    photo = _photo(1280, 720)
    fit = (300, 300, "stretch")
    gray = decode_image(encode(photo.convert("L"), "JPEG"), 10**8, fit_to=fit)
    assert isinstance(gray.pixels, np.ndarray) and gray.pixels.shape == (360, 640, 3)
    assert np.array_equal(gray.pixels[..., 0], gray.pixels[..., 2])
    cmyk = decode_image(encode(photo.convert("CMYK"), "JPEG"), 10**8, fit_to=fit)
    assert isinstance(cmyk.pixels, Image.Image) and cmyk.pixels.mode == "RGB"
    assert isinstance(decode_image(encode(photo, "PNG"), 10**8, fit_to=fit).pixels, Image.Image)
    jpeg = encode(photo, "JPEG")
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(jpeg[: len(jpeg) // 2], 10**8, fit_to=fit)
    with pytest.raises(ImageTooLarge, match="--max-pixels"):
        decode_image(jpeg, 1280 * 720 - 1, fit_to=fit)


def test_draft_scale_is_pillows():
    from batch_detect.model.fastjpeg import draft_scale

    assert draft_scale(1920, 1080, 300, 300) == 2 and draft_scale(4000, 3000, 300, 300) == 8
    assert draft_scale(902, 600, 640, 640) == 1  # a side below the target: full size, then enlarged
    assert draft_scale(1280, 720, 640, 360) == 2 and draft_scale(1279, 720, 640, 360) == 1


@pytest.mark.parametrize("missing", ["simplejpeg", "cv2"])
def test_without_fastjpeg_packages_pillow_decodes_everything(missing):
    """Either package absent where this runs (a cluster image without it): the import still works and
    every image takes Pillow's path, with the same tensor shapes."""
    import subprocess
    import sys

    code = f"""
import sys, io
sys.modules[{missing!r}] = None  # what an absent package looks like to `import`
import numpy as np
from PIL import Image
from batch_detect.model import fastjpeg, geometry
from batch_detect.model.interpreter import TensorSpec
from batch_detect.model.preprocess import InputSpec, build_input, decode_image, pixel_mapping
assert not fastjpeg.ENABLED and (geometry.cv2 is None) == ({missing!r} == "cv2")
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(1).integers(0, 255, (720, 1280, 3), np.uint8)).save(buf, "JPEG")
decoded = decode_image(buf.getvalue(), 10**8, fit_to=(300, 300, "letterbox"))
assert isinstance(decoded.pixels, Image.Image) and decoded.pixels.size == (320, 180)
spec = InputSpec.from_tensor(TensorSpec(0, "in", (1, 300, 300, 3), (1, 300, 300, 3), "uint8", 0.0, 0))
tensor, placement = build_input(decoded, spec, pixel_mapping(spec, "auto"), "letterbox")
assert tensor.shape == (1, 300, 300, 3) and abs(placement.y_scale - 169 / 300) < 1e-6
print("pillow path ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "pillow path ok" in out.stdout, out.stderr
