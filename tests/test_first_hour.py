"""Issue #16, "the first hour": what a new user trips over, tried the way they would."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import tarfile
import threading

from batch_detect.synthetic import write_dataset


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
                                  "--num-actors", "1"])
    assert rc == 2, text[-3000:]
    assert "\r[" in text, "no progress bar was drawn: the test tested nothing"
    lines = text.replace("\r\n", "\n").split("\n")
    error = [ln for ln in lines if "holds both tar files and images" in ln]
    assert len(error) == 1 and error[0].startswith("batch-detect: error: input "), error
    assert text.replace("\r\n", "\n").split(error[0], 1)[1].startswith("\n")
