"""Issue #16, "the first hour": what a new user trips over, tried the way they would."""

from __future__ import annotations

import ast
import io
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
from batch_detect.run.pipeline import run
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
    for path in glob.glob(os.path.join(ROOT, "batch_detect", "**", "*.py"), recursive=True):
        text = open(path).read()
        written |= set(re.findall(r"error_type\s*=\s*\"([a-z_]+)\"", text))
        written |= set(re.findall(r"\"(?:read|decode|validate|infer|postprocess)\", \"([a-z_]+)\"", text))
    written -= set(STAGES)  # the stage tuple itself matches the second pattern
    assert "worker_crashed" in written and "corrupt_image" in written, "the scan found too little: fix the test"
    assert written <= documented, written - documented


# Issue #29, "the first hour, round 2".

def _png(width: int, height: int) -> bytes:
    """A huge PNG that is tiny on disk (one bit per pixel, all zero)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_max_pixels_is_the_only_pixel_limit(tmp_path, models_dir):
    """Pillow's own bomb limits (89,478,485 pixels warned, twice that refused) must neither stop an image that
    --max-pixels allows nor word the refusal of one it does not."""
    from batch_detect.errors import ImageTooLarge
    from batch_detect.model.preprocess import decode_image

    hundred_million = _png(10_000, 10_000)  # over Pillow's warning limit, under its error limit
    assert decode_image(hundred_million, 500_000_000).width == 10_000
    two_hundred_million = _png(20_000, 10_000)  # over Pillow's error limit too
    for data, limit in ((hundred_million, 50_000_000), (two_hundred_million, 150_000_000)):
        try:
            decode_image(data, limit)
        except ImageTooLarge as exc:
            assert "--max-pixels" in str(exc) and f"{limit}" in str(exc), str(exc)
        else:
            raise AssertionError(f"an image over --max-pixels {limit} was decoded")
    # the job itself: the flag raised, the image processed
    images = tmp_path / "images"
    images.mkdir()
    (images / "huge.png").write_bytes(hundred_million)
    out = tmp_path / "out"
    run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(images), output=str(out),
                  max_pixels=500_000_000))
    assert duckdb.execute(f"SELECT uri, width FROM read_parquet('{out}/images/*.parquet')").fetchall() == [
        (str(images / "huge.png"), 10_000)]


def batch_detect(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_detect", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "RAY_ADDRESS": ""})


def test_a_changed_object_is_reported_by_a_re_run_and_by_verify(tmp_path, models_dir):
    images, out = tmp_path / "images", tmp_path / "out"
    write_dataset(str(images), 6, seed=11)
    job = ["run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", str(images),
           "--output", str(out)]
    assert batch_detect(*job).returncode == 0
    changed = images / "img_00002.jpg"
    changed.write_bytes((images / "img_00004.jpg").read_bytes())  # same URI, other bytes (and size, and mtime)
    again = batch_detect(*job)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert "1 planned object changed since it was planned" in again.stderr and "--incremental" in again.stderr
    checked = batch_detect("verify", str(out), "--input", str(images))
    assert checked.returncode == 1 and "NOT OK" in checked.stdout, checked.stdout
    assert "1 planned object changed" in checked.stdout and str(changed) in checked.stdout, checked.stdout
    # the way out it names works: the changed object is processed again, as run 2
    assert batch_detect(*job, "--incremental").returncode == 0
    assert duckdb.execute(f"SELECT uri, run_id FROM read_parquet('{out}/images/*.parquet') WHERE run_id = 2"
                          ).fetchall() == [(str(changed), 2)]
    assert batch_detect("verify", str(out), "--input", str(images)).returncode == 0


def test_the_resize_follows_the_models_family(tmp_path, models_dir):
    images = tmp_path / "images"
    write_dataset(str(images), 3, seed=12)
    for model, resize in (("shapes_yolov8_int8.tflite", "letterbox"), ("shapes_ssd_uint8.tflite", "stretch")):
        manifest = run(RunConfig(model=os.path.join(models_dir, model), input=str(images),
                                 output=str(tmp_path / model))).manifest
        assert (manifest["config"]["resize"], manifest["model"]["default_resize"]) == (resize, resize), model
    given = run(RunConfig(model=os.path.join(models_dir, "shapes_yolov8_int8.tflite"), input=str(images),
                          output=str(tmp_path / "given"), resize="stretch")).manifest
    assert given["config"]["resize"] == "stretch"


def test_the_failure_rate_verdict_holds_on_a_re_run(tmp_path, models_dir):
    images, out = tmp_path / "images", tmp_path / "out"
    write_dataset(str(images), 4, seed=13)
    write_bad_inputs(str(images))
    job = ["run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", str(images),
           "--output", str(out), "--max-failure-rate", "0.1"]
    for attempt in ("run", "re-run"):
        result = batch_detect(*job)
        assert result.returncode == 1, (attempt, result.stdout, result.stderr)
        assert "over --max-failure-rate 0.1" in result.stderr, (attempt, result.stderr)


def test_the_real_full_integer_yolov8n_finds_the_cat_by_default(tmp_path, realworld):
    """Ultralytics letterboxes; stretched, the full-integer YOLOv8n sees clocks in the cat's eyes."""
    real = realworld
    out = tmp_path / "out"
    images = tmp_path / "images"
    images.mkdir()
    (images / "chelsea.png").write_bytes(open(os.path.join(real, "images", "chelsea.png"), "rb").read())
    model = os.path.join(real, "yolov8n_full_integer_quant.tflite")
    run(RunConfig(model=model, input=str(images), output=str(out), score_threshold=0.4))
    best = duckdb.execute(f"SELECT class_id FROM read_parquet('{out}/detections/*.parquet') "
                          "ORDER BY score DESC LIMIT 1").fetchall()
    assert best == [(15,)], best  # COCO class 15: cat
    run(RunConfig(model=model, input=str(images), output=str(tmp_path / "stretched"), score_threshold=0.4,
                  resize="stretch"))
    stretched = duckdb.execute(f"SELECT class_id FROM read_parquet('{tmp_path}/stretched/detections/*.parquet') "
                               "ORDER BY score DESC LIMIT 1").fetchall()
    assert stretched != [(15,)], "stretched finds the cat too: the test shows nothing"


def test_an_edge_tpu_model_is_named_as_one(tmp_path, models_dir):
    """edgetpu_compiler leaves one custom op, `edgetpu-custom-op`; here the fixture's post-processing op is
    renamed so (the flatbuffer string's length prefix with it), which the CPU runtime cannot resolve either."""
    content = bytearray(open(os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "rb").read())
    at = content.find(b"TFLite_Detection_PostProcess")
    assert at > 0 and content.count(b"TFLite_Detection_PostProcess") == 1
    name = b"edgetpu-custom-op"
    content[at - 4:at] = len(name).to_bytes(4, "little")
    content[at:at + len(name) + 1] = name + b"\0"
    model = tmp_path / "shapes_ssd_uint8_edgetpu.tflite"
    model.write_bytes(bytes(content))
    images = tmp_path / "images"
    write_dataset(str(images), 1, seed=14)
    result = batch_detect("run", "--model", str(model), "--input", str(images), "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "compiled for the Edge TPU" in result.stderr and "CPU model it was compiled from" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_no_command_prints_the_runtimes_delegate_notice(tmp_path, models_dir):
    images = tmp_path / "images"
    write_dataset(str(images), 2, seed=15)
    model = os.path.join(models_dir, "shapes_ssd_uint8.tflite")
    for args in (["inspect", model], ["run", "--model", model, "--input", str(images), "--output", str(tmp_path / "o")]):
        result = batch_detect(*args)
        assert result.returncode == 0, result.stderr
        assert "XNNPACK" not in result.stderr + result.stdout, (args, result.stderr)


def test_status_of_an_ended_run_neither_lists_nor_slows_down(tmp_path, models_dir):
    from batch_detect.commands.status import render, status

    images, out = tmp_path / "images", tmp_path / "out"
    write_dataset(str(images), 40, seed=16)
    manifest = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(images),
                             output=str(out), shard_size=4)).manifest
    import time

    for later in (0, 3600):  # read at once, and an hour after the run ended
        s = status(str(out), now=time.time() + later)
        assert s["rate_images_per_s"] == manifest["timings"]["images_per_s"] and s["eta_s"] is None, (later, s)
        text = render(s)
        assert "until it ended" in text and "1 node " in text and "1 nodes" not in text, text
    # a "running" output with no commit for minutes: its driver may be waiting out a store outage
    text = render({**s, "state": "stalled", "ended": False})
    assert f"up to {manifest['config']['store_timeout']:.0f} s of --store-timeout" in text and "may be gone" in text, text
    # a run stopped before its listing ended (status from the commit log: no total known)
    text = render({**s, "state": "interrupted", "planned": None, "listed_so_far": 16})
    assert "still listing" not in text and "≥16 (the listing stopped with the run" in text, text


def test_an_early_interrupt_says_what_is_committed_and_when_it_is_readable(tmp_path, models_dir):
    import signal
    import time

    from batch_detect.output.commitlog import read_state
    from batch_detect.output.sink import OutputStore
    from helpers import committed_count, kill_driver_when

    images, out = tmp_path / "images", tmp_path / "out"
    write_dataset(str(images), 400, seed=17, sizes=((96, 72),))
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
           "--input", str(images), "--output", str(out), "--shard-size", "4"]
    code, text = kill_driver_when(cmd, lambda: committed_count(str(out)) >= 2, sig=signal.SIGINT)
    assert code == 130, text[-3000:]
    state = read_state(OutputStore(str(out)))
    readable = sum(p["end"] - p["first"] for p in state.parts if p["done"])
    images_done = state.totals["images"] + state.totals["failures"]
    said = re.search(r"(\d+) shards \((\d+) images\) committed(;|,) (all of them|(\d+) of them) in part files", text)
    assert said, text[-3000:]
    assert (int(said.group(1)), int(said.group(2))) == (state.num_committed, images_done)
    assert (said.group(4) == "all of them") == (readable == state.num_committed)
    if readable < state.num_committed:
        assert int(said.group(5)) == readable and "re-run" in text
    assert "Traceback" not in text
    time.sleep(0)  # the process is gone: kill_driver_when waited for it


def test_a_job_files_relative_paths_are_beside_it(tmp_path, models_dir):
    from batch_detect.commands.cli import config_from_args, parse_args

    job = tmp_path / "jobs" / "nightly.toml"
    job.parent.mkdir()
    job.write_text('model = "../models/m.tflite"\ninput = "images/*.jpg"\noutput = "out"\n'
                   'labels = "/abs/labels.txt"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        cfg = config_from_args(parse_args(["run", "--config", str(job), "--output", "flag-out"])).validate()
    finally:
        os.chdir(cwd)
    assert cfg.model == str(tmp_path / "models" / "m.tflite")
    assert cfg.input == str(job.parent / "images" / "*.jpg")
    assert cfg.labels == "/abs/labels.txt"
    assert cfg.output == str(elsewhere / "flag-out")  # a flag's relative path is the shell's, as always


def test_report_and_verify_say_what_a_user_can_use(tmp_path, models_dir):
    images, out = tmp_path / "images", tmp_path / "out"
    write_dataset(str(images), 4, seed=18)
    assert batch_detect("run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", str(images),
                        "--output", str(out)).returncode == 0
    cwd = tmp_path / "project"
    cwd.mkdir()  # what `ray job submit --working-dir .` would upload: the report must not land here
    result = batch_detect("report", str(out), cwd=str(cwd))
    assert result.returncode == 0, result.stderr
    assert os.listdir(cwd) == [], os.listdir(cwd)
    assert f"html: {out / '_report' / 'run-1'}" in result.stdout and (out / "_report" / "run-1" / "index.html").exists()
    assert batch_detect("verify", str(out)).returncode == 0  # the report beside the results is no stray part
    # an output whose listing never ended: no "planned None"
    from batch_detect.output.commitlog import read_state
    from batch_detect.output.sink import OutputStore

    log = sorted(glob.glob(str(out / "_log" / "*.jsonl")))
    lines = [ln for path in log for ln in open(path)]
    assert any('"ev": "listed"' in ln for ln in lines) or read_state(OutputStore(str(out))).listed
    for path in glob.glob(str(out / "_log" / "*")):
        os.remove(path)
    lines = [ln for ln in lines if '"ev": "listed"' not in ln]
    (out / "_log" / "000000000000.jsonl").write_text("".join(lines))
    checked = batch_detect("verify", str(out))
    assert checked.returncode == 1 and "None" not in checked.stdout and "an unknown number of" in checked.stdout, \
        checked.stdout


def test_progress_knows_the_totals_once_the_listing_is_counted(tmp_path, models_dir):
    """A run without Ray counts its whole listing before it starts: no progress line says "?" after that."""
    images = tmp_path / "images"
    write_dataset(str(images), 40, seed=19)
    result = batch_detect("run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input",
                          str(images), "--output", str(tmp_path / "out"), "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    assert "without starting Ray (40 images" in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("progress: ")]
    assert lines and all("/40 images" in ln and "shards " in ln and "/10," in ln for ln in lines), lines
    # a terminal's bar drawn before the totals were known is redrawn with them at once
    from batch_detect.commands.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = Progress(None, None, stream=screen)
    bar.update({"images": 4, "failures": 0, "detections": 1})
    bar.listed(40, 10)
    assert "4/40 images committed" in screen.getvalue().rsplit("\r", 1)[-1], screen.getvalue()
