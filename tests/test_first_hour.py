"""Issue #16, "the first hour": what a new user trips over, tried the way they would."""

from __future__ import annotations

import ast
import glob
import os
import pty
import re
import struct
import subprocess
import sys
import tarfile
import threading

import duckdb

from batch_detect.config import RunConfig
from batch_detect.errors import STAGES
from batch_detect.pipeline import run
from batch_detect.synthetic import write_dataset
from helpers import write_bad_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """The CLI with stderr on a pseudo-terminal, as a user sees it: the progress bar is drawn."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "batch_detect", *args], stdout=subprocess.DEVNULL,
                            stderr=slave, env={**os.environ, "RAY_ADDRESS": ""})
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    rc = proc.wait(timeout=timeout)
    reader.join(timeout=10)
    os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


def test_an_error_after_the_progress_bar_stands_on_its_own_line(tmp_path, models_dir):
    """The listing finds a tar among the images only after shards have run (and the bar was drawn)."""
    images = tmp_path / "images"
    write_dataset(str(images), 200, seed=3)
    with tarfile.open(images / "zzz.tar", "w") as tar:
        tar.add(images / "img_00000.jpg", arcname="img_00000.jpg")
    rc, text = run_on_a_terminal(["run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
                                  "--input", str(images), "--output", str(tmp_path / "out"), "--shard-size", "4",
                                  "--num-actors", "1", "--ray-min-images", "0"])  # a small run would list it all first
    assert rc == 2, text[-3000:]
    assert "\r[" in text, "no progress bar was drawn: the test tested nothing"
    lines = text.replace("\r\n", "\n").split("\n")
    error = [ln for ln in lines if "holds both tar files and images" in ln]
    assert len(error) == 1 and error[0].startswith("batch-detect: error: input "), error
    assert text.replace("\r\n", "\n").split(error[0], 1)[1].startswith("\n")


def readme_failure_types() -> dict[str, set[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| `(read|decode|validate|infer|postprocess)` \| (`.*`) \|$", text, re.M)
    return {stage: set(re.findall(r"`([a-z_]+)`", types)) for stage, types in rows}


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags are none Pillow knows: its DDS plugin raises
    NotImplementedError, an exception class no decoder error handling anticipates."""
    header = struct.pack("<3I", 0, 64, 64) + bytes(12) + bytes(44) + struct.pack("<4I", 32, 0, 0, 0) + bytes(36)
    return b"DDS " + struct.pack("<I", 124) + header


def test_unexpected_exceptions_get_their_stages_documented_type(local_ray, models_dir, tmp_path):
    images = tmp_path / "images"
    write_dataset(str(images), 6, seed=8)
    write_bad_inputs(str(images))
    (images / "texture_named.jpg").write_bytes(dds_with_unknown_pixel_format())
    out = tmp_path / "out"
    manifest = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(images),
                             output=str(out), shard_size=4)).manifest
    assert manifest["status"] == "complete"
    documented = readme_failure_types()
    assert set(documented) == {"read", "decode", "validate", "infer", "postprocess"}
    rows = duckdb.execute(f"SELECT uri, stage, error_type, message FROM read_parquet('{out}/failures/*.parquet')"
                          ).fetchall()
    assert len(rows) == 4
    for uri, stage, error_type, message in rows:
        assert error_type in documented[stage], (uri, stage, error_type, message)
    dds = [r for r in rows if r[0].endswith("texture_named.jpg")]
    assert dds and dds[0][1:3] == ("decode", "decode_error") and dds[0][3].startswith("NotImplementedError: ")


# A home or work folder of someone's own machine, as a literal: meaningless anywhere else.
_MACHINE_PATH = re.compile(r"(?<![\w.])/(work|home|Users|root|mnt/c)/")


def test_no_test_names_a_path_of_one_machine():
    """Skip messages (and any other text a test prints) must make sense on any machine: paths are
    computed (ROOT, SHARED, sys.executable), never written out."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        if os.path.basename(path) == os.path.basename(__file__):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MACHINE_PATH.search(node.value):
                found.append(f"{os.path.basename(path)}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_the_readme_lists_every_error_type_the_code_writes():
    documented = set().union(*readme_failure_types().values())
    written = set()
    for path in glob.glob(os.path.join(ROOT, "batch_detect", "*.py")):
        text = open(path).read()
        written |= set(re.findall(r"error_type\s*=\s*\"([a-z_]+)\"", text))
        written |= set(re.findall(r"\"(?:read|decode|validate|infer|postprocess)\", \"([a-z_]+)\"", text))
    written -= set(STAGES)  # the stage tuple itself matches the second pattern
    assert "worker_crashed" in written and "corrupt_image" in written, "the scan found too little: fix the test"
    assert written <= documented, written - documented
