"""The output location, checked for real before a run writes and in its dry run (issue #29, items 3, 4
and 7): a place that cannot be written, a file or a path under one, a bucket that does not exist are each
exit 2, one sentence naming the location and the fix, and the location left as it was (no bucket made);
and the dry run names the executor the run uses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from batch_detect.synthetic import write_dataset

MODEL = "shapes_ssd_uint8.tflite"
FLAG_ADVICE = "or pass --allow-nonempty-output"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("first_hour_output") / "images"
    write_dataset(str(folder), 6, seed=5)
    return str(folder)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_detect", "run", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RAY_ADDRESS": "", **(env or {})})


def refused(result: subprocess.CompletedProcess, *named: str) -> str:
    """The one error line of a run refused before it started (exit 2, no traceback), holding `named`."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("batch-detect: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in named:
        assert text in errors[0], (text, errors[0])
    return errors[0]


def tree(root) -> list[tuple[str, int]]:
    """Every path under `root` with its size: what "nothing written" is checked against."""
    out = []
    for folder, dirs, files in os.walk(root):
        out += [(os.path.join(folder, d), -1) for d in dirs]
        out += [(os.path.join(folder, f), os.path.getsize(os.path.join(folder, f))) for f in files]
    return sorted(out)


def _writable(folder: str) -> bool:
    try:
        with open(os.path.join(folder, ".probe"), "wb"):
            pass
    except OSError:
        return False
    os.remove(os.path.join(folder, ".probe"))
    return True


@pytest.fixture(params=["immutable folder", "read-only mount"])
def unwritable(request, tmp_path):
    """A folder no write can go into, even as root (the tests run as root, for whom a chmod'ed folder is
    writable): `chattr +i` (EPERM), or a tmpfs mounted read-only (EROFS). It holds a `_manifest.json`, so
    that it is an output to resume (the lease is its first write). Skipped, saying why, where neither works."""
    folder = tmp_path / "locked"
    folder.mkdir()
    undo: list[list[str]] = []
    if request.param == "immutable folder":
        (folder / "_manifest.json").write_text("{}")
        setup, undo = [["chattr", "+i", str(folder)]], [["chattr", "-i", str(folder)]]
    else:
        setup = [["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                 ["sh", "-c", f"echo '{{}}' > {folder}/_manifest.json"],
                 ["mount", "-o", "remount,ro", str(folder)]]
        undo = [["umount", str(folder)]]
    done = 0
    try:
        for step in setup:
            if shutil.which(step[0]) is None or subprocess.run(step, capture_output=True).returncode != 0:
                break
            done += 1
        if done < len(setup) or _writable(str(folder)):
            print(f"skipped: no {request.param} here ({' '.join(setup[min(done, len(setup) - 1)])} failed "
                  "or left the folder writable)")
            pytest.skip(f"cannot make an unwritable {request.param} here")
        yield str(folder)
    finally:
        if done:
            for step in undo:
                subprocess.run(step, capture_output=True)


def test_an_unwritable_output_is_refused_before_anything_in_the_run_and_the_dry_run(unwritable, models_dir,
                                                                                     images):
    """Before: a PermissionError (OSError: read-only file system) traceback from the lease, exit 1, and a
    dry run that said all was well."""
    model = os.path.join(models_dir, MODEL)
    before = tree(unwritable)
    for dry in (["--dry-run"], []):
        for output in (unwritable, os.path.join(unwritable, "new", "deeper")):
            result = cli("--model", model, "--input", images, "--output", output, *dry)
            refused(result, repr(output), "cannot be written", "choose an --output you can write to")
            assert tree(unwritable) == before


def test_a_file_or_a_path_under_a_file_is_refused_as_such(tmp_path, models_dir, images):
    """Before: the file was "a folder that already holds 1 entries", and the advice it gave,
    --allow-nonempty-output, a FileExistsError traceback; under a file, a NotADirectoryError traceback."""
    model = os.path.join(models_dir, MODEL)
    afile = tmp_path / "results.parquet"
    afile.write_bytes(b"not a folder")
    before = tree(tmp_path)
    cases = [(str(afile), [], "is a file, not a folder"),
             (str(afile), ["--allow-nonempty-output"], "is a file, not a folder"),
             (str(afile / "out"), [], f"is under {str(afile)!r}, which is a file"),
             (str(afile / "a" / "b"), ["--allow-nonempty-output"], f"is under {str(afile)!r}, which is a file")]
    for output, extra, message in cases:
        for dry in (["--dry-run"], []):
            result = cli("--model", model, "--input", images, "--output", output, *extra, *dry)
            line = refused(result, repr(output), message, "choose")
            assert FLAG_ADVICE not in line, line  # the flag would not help
            assert tree(tmp_path) == before
    assert afile.read_bytes() == b"not a folder"


def test_a_dry_run_probes_a_new_output_and_leaves_nothing(tmp_path, models_dir, images):
    """The probe creates the folders a new output needs and a file, and removes them all again."""
    model = os.path.join(models_dir, MODEL)
    before = tree(tmp_path)
    result = cli("--model", model, "--input", images, "--output", str(tmp_path / "new" / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing was written" in result.stdout and "the run can write it" in result.stdout
    assert tree(tmp_path) == before


def test_the_dry_run_names_the_executor_the_run_uses(tmp_path, models_dir, images):
    """Before: the dry run said "N actors on an embedded local Ray" where the run used worker processes
    without Ray. Both now print the one decision's words."""
    model = os.path.join(models_dir, MODEL)
    common = ["--model", model, "--input", images, "--shard-size", "2"]
    phrase = re.compile(r"\d+ worker process(es)? of this machine, without starting Ray \(6 images, under "
                        r"--ray-min-images \d+\)")
    dry = cli(*common, "--output", str(tmp_path / "dry"), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    estimate = next(ln for ln in dry.stdout.splitlines() if ln.startswith("estimate:"))
    said = phrase.search(estimate)
    assert said and "actors" not in estimate, estimate
    ran = cli(*common, "--output", str(tmp_path / "run"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert said.group(0) in ran.stderr, (said.group(0), ran.stderr[-3000:])
    assert not (tmp_path / "dry").exists()
    # Forced onto Ray: the dry run says Ray, as the run's "starting Ray on this machine" does
    ray = cli(*common, "--output", str(tmp_path / "dry"), "--dry-run", "--ray-min-images", "0")
    assert ray.returncode == 0, ray.stderr[-3000:]
    estimate = next(ln for ln in ray.stdout.splitlines() if ln.startswith("estimate:"))
    assert "actors on Ray on this machine (no --address" in estimate and "worker process" not in estimate, estimate


# --- object stores -----------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server, tmp_path, models_dir):
    """A bucket holding the images; its options, and a name for a bucket that does not exist."""
    import s3fs

    options = {"key": "testing-key-id", "secret": "testing-secret", "endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**options)
    name = f"bd-out-{os.getpid()}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs.mkdir(name)
    write_dataset(str(tmp_path / "images"), 3, seed=5)
    fs.put(str(tmp_path / "images") + "/", f"{name}/in/", recursive=True)
    return name, options, f"{name}-typo"


def _bucket_exists(options: dict, name: str) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)  # no cached listing
    try:
        fs.call_s3("head_bucket", Bucket=name)
        return True
    except FileNotFoundError:
        return False


def test_an_output_bucket_that_does_not_exist_is_refused_never_created(bucket, models_dir):
    """Before: the run created the bucket and exit 0 (s3fs's makedirs, from the lease, creates buckets)."""
    name, options, missing = bucket
    flags = [f"--storage-option={k}={v}" for k, v in options.items()]
    output = f"s3://{missing}/results"
    for dry in (["--dry-run"], []):
        result = cli("--model", os.path.join(models_dir, MODEL), "--input", f"s3://{name}/in/", "--output", output,
                     *flags, *dry)
        refused(result, repr(output), f"the bucket {missing!r} does not exist", "create it first")
        assert options["secret"] not in result.stderr
        assert not _bucket_exists(options, missing)
    assert _bucket_exists(options, name)  # the check itself sees buckets that are there


def test_nothing_in_the_driver_or_workers_creates_a_bucket(bucket):
    """The lease and a part's compaction, each the first write of its kind, on an output whose bucket is
    gone: an error, not a new bucket. Before: both created it (the lease's makedirs, the part's makedirs)."""
    from batch_detect.errors import OutputError
    from batch_detect.output.lease import Lease
    from batch_detect.output.sink import OutputStore

    name, options, missing = bucket
    store = OutputStore(f"s3://{missing}/out", options)
    with pytest.raises(OutputError, match=f"the bucket '{missing}' does not exist"):
        Lease.acquire(store, renewing=False)
    assert not _bucket_exists(options, missing)
    with pytest.raises(OSError):
        store.compact(0, ["shard-000000"])
    assert not _bucket_exists(options, missing)
