"""Test helpers: ground-truth matching and a bad-input corpus drawn here, never downloaded."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time

import numpy as np
from PIL import Image

from batch_detect.model.geometry import box_iou as iou  # noqa: F401  (one definition, used by the tests)


def recall_precision(truth: dict, predicted: dict, threshold: float = 0.5) -> tuple[float, float]:
    """truth/predicted: {name: [(class_id, xmin, ymin, xmax, ymax), ...]}; greedy one-to-one matching."""
    tp = n_truth = n_pred = 0
    for name, gts in truth.items():
        preds = list(predicted.get(name, []))
        n_truth += len(gts)
        n_pred += len(preds)
        used = set()
        for gt in gts:
            best, best_j = threshold, None
            for j, p in enumerate(preds):
                if j in used or p[0] != gt[0]:
                    continue
                v = iou(gt[1:], p[1:])
                if v >= best:
                    best, best_j = v, j
            if best_j is not None:
                used.add(best_j)
                tp += 1
    return tp / max(n_truth, 1), tp / max(n_pred, 1)


def committed_count(out: str) -> int:
    """Shards the output's commit log records as committed (0 before the first segment)."""
    from batch_detect.output.commitlog import read_state
    from batch_detect.output.sink import OutputStore

    if not os.path.isdir(os.path.join(out, "_log")):
        return 0
    return read_state(OutputStore(out)).num_committed


def shard_events(out: str) -> list[dict]:
    from batch_detect.output.commitlog import shard_events as events
    from batch_detect.output.sink import OutputStore

    return events(OutputStore(out)) if os.path.isdir(os.path.join(out, "_log")) else []


def write_bad_inputs(folder: str) -> dict[str, str]:
    """Files that must become failure records: {file name: expected error_type}."""
    os.makedirs(folder, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    jpeg = buf.getvalue()
    files = {
        "bad_truncated.jpg": (jpeg[: len(jpeg) // 3], "corrupt_image"),
        "bad_zero_bytes.jpg": (b"", "empty_file"),
        "bad_text_named.jpg": (b"this is not an image, just text\n" * 10, "unidentified_image"),
    }
    for name, (data, _) in files.items():
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
    return {name: etype for name, (_, etype) in files.items()}


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header), data for 1x1."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21: ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4: ihdr + 21])) & 0xFFFFFFFF)
    return bytes(data)


def write_corpus(folder: str) -> dict[str, tuple]:
    """Awkward real-world files. Returns {name: ("ok", (width, height), boxes or None) | ("fail", error_type)};
    boxes, where given, are (class_id, xmin, ymin, xmax, ymax) the model must find in the displayed image."""
    from batch_detect.synthetic import scene_rng, draw_scene

    os.makedirs(folder, exist_ok=True)
    expected: dict[str, tuple] = {}

    def save(name: str, img: Image.Image, outcome: tuple, **kw) -> None:
        img.save(os.path.join(folder, name), **kw)
        expected[name] = outcome

    scene, boxes = draw_scene(scene_rng(4242, 0), 400, 300)
    gt = [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in boxes]
    # Stored rotated, EXIF orientation 6 ("rotate 90° clockwise to display"): displays as `scene`.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", scene.transpose(Image.Transpose.ROTATE_90), ("ok", (400, 300), gt),
         exif=exif, quality=95)
    save("rgba.png", scene.convert("RGBA"), ("ok", (400, 300), gt))
    save("cmyk.jpg", scene.convert("CMYK"), ("ok", (400, 300), None), quality=95)
    save("palette.gif", scene.convert("P"), ("ok", (400, 300), None))
    grey16 = (np.asarray(scene.convert("L"), dtype=np.uint16) * 257)
    save("sixteen_bit.png", Image.fromarray(grey16), ("ok", (400, 300), None))
    save("animated.gif", scene.convert("P"), ("ok", (400, 300), None), save_all=True,
         append_images=[Image.new("P", (400, 300))], duration=100, loop=0)
    save("multipage.tif", scene, ("ok", (400, 300), gt), save_all=True, append_images=[Image.new("RGB", (400, 300))])
    save("image.webp", scene, ("ok", (400, 300), None), quality=90)
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)), ("ok", (1, 1), None))
    with open(os.path.join(folder, "bomb_header.png"), "wb") as fh:
        fh.write(_png_with_size(100_000, 100_000))
    expected["bomb_header.png"] = ("fail", "image_too_large")
    # Phone formats, encoded here by libheif (pillow-heif) and libavif (Pillow): upright, and stored turned
    # with EXIF orientation 6 as cameras write them; both must display as `scene`.
    import pillow_heif

    pillow_heif.register_heif_opener()
    for ext, fmt in ((".heic", "HEIF"), (".avif", "AVIF")):
        save(f"phone{ext}", scene, ("ok", (400, 300), gt), format=fmt, quality=90)
        save(f"phone_rotated{ext}", scene.transpose(Image.Transpose.ROTATE_90), ("ok", (400, 300), gt), format=fmt,
             quality=90, exif=exif.tobytes())
        whole = open(os.path.join(folder, f"phone{ext}"), "rb").read()
        with open(os.path.join(folder, f"truncated{ext}"), "wb") as fh:
            fh.write(whole[: len(whole) // 2])
        expected[f"truncated{ext}"] = ("fail", "corrupt_image")
    # A HEIF container header with no image in it, named .jpg.
    with open(os.path.join(folder, "empty_heic.jpg"), "wb") as fh:
        fh.write(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    expected["empty_heic.jpg"] = ("fail", "corrupt_image")
    for name, etype in write_bad_inputs(folder).items():
        expected[name] = ("fail", etype)
    return expected


def kill_driver_when(cmd: list[str], ready, timeout: float = 180, sig: int = signal.SIGKILL,
                     env_extra: dict | None = None) -> tuple[int, str]:
    """Run a `batch-detect` driver (embedded Ray) and send it `sig` once `ready()` holds; fail with its output
    if it ends or times out first. Returns its exit code and output (it has 30 s to exit).

    Each batch of images takes 20 ms longer (a test-only hook, forwarded to workers and actors): `ready()`
    reads a commit log flushed once a second, and a fast machine finished hundreds of small images within
    that second, so the stop came after the last shard and tested nothing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_ADDRESS": "", "BATCH_DETECT_TEST_SLOW_BATCH_S": "0.02", **(env_extra or {})}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.time() + timeout
        while not ready() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None and ready(), driver.stdout.read().decode()[-3000:] if driver.poll() is not None \
            else f"not ready after {timeout}s"
        os.kill(driver.pid, sig)
        output = driver.communicate(timeout=30)[0].decode()
        return driver.returncode, output
    finally:
        if driver.poll() is None:
            driver.kill()


def token_cluster_env(prefix: str, **extra: str) -> tuple[str, dict]:
    """A short temp dir (Ray's unix sockets under it have a length limit) holding a fresh auth token, and
    the environment for `ray start`/clients of a token-authenticated cluster of a test's own, as Ray >= 2.59
    runs local clusters: the venv's `ray` on PATH, no usage stats, no address or token from outside."""
    import secrets
    import sys
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as fh:
        fh.write(secrets.token_hex(32))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path, **extra}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    return temp_dir, env
