"""Issue #29, "the first hour": the command line's help, version and missing flags; relative paths inside a
Ray job; the README's first command, its S3 queries and its `ray start` ports, run as written."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest

from batch_detect.commands.cli import build_parser
from batch_detect.config import RunConfig
from batch_detect.synthetic import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite")
GROUPS = ("input", "model", "output", "cluster", "tuning", "operating")
BIN = os.path.dirname(sys.executable)


def cli(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_detect", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def readme() -> str:
    return open(os.path.join(ROOT, "README.md")).read()


def run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]


def test_run_help_groups_every_option_and_shows_its_real_default():
    run = run_parser()
    grouped = {g.title: g._group_actions for g in run._action_groups if g.title in GROUPS}
    assert tuple(grouped) == GROUPS
    in_groups = {a.dest for actions in grouped.values() for a in actions}
    ungrouped = [a.option_strings for a in run._actions if a.dest not in in_groups | {"help", "version"}]
    assert not ungrouped, f"options outside the groups: {ungrouped}"
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(RunConfig)}
    for action in run._actions:
        if action.dest in ("help", "version"):
            continue
        shown = re.search(r"\(default: (.*)\)$", action.help)
        default = defaults.get(action.dest)
        if default == "":  # --model, --input, --output
            assert shown is None and action.help.startswith("required"), action.help
            continue
        assert shown, f"{action.option_strings} shows no default: {action.help!r}"
        text = shown.group(1)
        if isinstance(action, argparse._StoreConstAction):
            assert text == ("on" if default == action.const else "off"), action.help
        elif isinstance(default, (int, float)):
            assert float(text.replace(",", "")) == default, action.help
        elif isinstance(default, str):
            assert text == default, action.help
        elif isinstance(default, tuple):
            assert text.split(",") == [e.lstrip(".") for e in default], action.help
    # as a user sees it: the required flags in the usage line, the groups as sections
    result = cli("run", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: batch-detect run --model MODEL --input INPUT --output OUTPUT [options]")
    for title in GROUPS:
        assert f"\n{title}:\n" in result.stdout, title
    assert "(default: 0.25)" in result.stdout and "(default: 64)" in result.stdout


def test_version_is_the_package_version():
    expected = f"batch-detect {importlib.metadata.version('batch-detect')}"
    for args in (["--version"], ["run", "--version"]):
        result = cli(*args)
        assert (result.returncode, result.stdout.strip()) == (0, expected), result.stderr
    job = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "detect.py"), "--version"],
                         capture_output=True, text=True, timeout=60)
    assert job.stdout.strip() == expected, job.stderr


def test_a_run_without_its_required_flags_names_every_one_missing(tmp_path):
    result = cli("run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line, = result.stderr.strip().splitlines()
    assert all(flag in line for flag in ("--model", "--input", "--output")), line
    config = tmp_path / "job.toml"
    config.write_text(f"model = {json.dumps(MODEL)}\n")
    result = cli("run", "--config", str(config))
    assert result.returncode == 2 and "--input" in result.stderr and "--output" in result.stderr
    assert "--model" not in result.stderr


@pytest.fixture
def job_copy(tmp_path):
    """A folder laid out as Ray's copy of a job's --working-dir, holding the project's models, and the
    environment Ray's job supervisor gives the entrypoint."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    shutil.copytree(os.path.join(ROOT, "models"), copy / "models")
    write_dataset(str(copy / "images"), 3, seed=5)
    images = tmp_path / "images"
    write_dataset(str(images), 3, seed=5)
    env = {RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}}),
           "RAY_ADDRESS": ""}
    return copy, str(images), env


def test_relative_paths_inside_a_ray_job(job_copy, tmp_path):
    copy, images, env = job_copy
    model = "models/shapes_ssd_uint8.tflite"
    out = str(tmp_path / "out")
    refused = {
        "relative output": (["--model", model, "--input", images, "--output", "./out"], "--output './out'"),
        "relative input": (["--model", model, "--input", "images", "--output", out], "--input 'images'"),
        "model not shipped": (["--model", "models/mine.tflite", "--input", images, "--output", out],
                              "--model 'models/mine.tflite'"),
    }
    (copy / "job.toml").write_text(f'model = "{model}"\ninput = {json.dumps(images)}\noutput = "out"\n')
    refused["output in the job file"] = (["--config", "job.toml"], "--output")
    for case, (args, names) in refused.items():
        result = cli("run", *args, cwd=str(copy), env=env)
        assert result.returncode == 2, (case, result.stderr[-2000:])
        line = result.stderr.strip().splitlines()[-1]  # (after where a relative --config was found)
        assert names in line and "absolute path" in line and "URL" in line, (case, line)
        assert "Traceback" not in line
    assert not (copy / "out").exists() and not os.path.exists(out)
    # The model shipped in the working dir is read from there, and the run says where.
    result = cli("run", "--model", model, "--input", images, "--output", out, "--dry-run", cwd=str(copy), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"relative paths are read from Ray's temporary copy of the job's --working-dir ({copy}): --model {model}" \
        in result.stderr
    # Outside a job, the same relative paths are this folder's, as always.
    result = cli("run", "--model", model, "--input", "images", "--output", "./out", "--dry-run", cwd=str(copy),
                 env={"RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ray job" not in result.stderr


def test_the_job_supervisor_still_marks_the_entrypoint_as_we_look_for_it():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from batch_detect.commands.rayjob import JOB_ENV

    assert JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR


def test_readme_first_command_runs_on_the_images_make_demo_draws(tmp_path):
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    block = re.search(r"## The whole flow on one screen\n.*?```bash\n(.*?)```", readme(), re.S).group(1)
    given = re.search(r"--input (\S+)", block).group(1)
    assert os.path.normpath(given) == os.path.relpath(demo.IMAGES, ROOT), given
    # the project folder after `make demo`, with fewer images
    os.symlink(os.path.join(ROOT, "models"), tmp_path / "models")
    write_dataset(str(tmp_path / given), 12, seed=7)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"],
                                              "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "status: complete" in result.stdout
    assert re.search(r"\b(circle|square|triangle)\b", result.stdout.split("output:", 1)[1]), result.stdout


@pytest.fixture(scope="module")
def s3_output(s3_server, tmp_path_factory):
    """A run's output on S3 (moto on 127.0.0.1), at the README's example prefix in a bucket of this module's."""
    import s3fs

    from batch_detect.run.pipeline import run

    options = {"key": "my-key-id", "secret": "my-secret", "endpoint_url": s3_server}
    name = f"results-{os.getpid()}"
    s3fs.S3FileSystem(**options).mkdir(name)
    images = tmp_path_factory.mktemp("s3-query") / "images"
    write_dataset(str(images), 12, seed=41)
    manifest = run(RunConfig(model=MODEL, labels=os.path.join(ROOT, "models", "shapes_labels.txt"),
                             input=str(images), output=f"s3://{name}/photos", storage_options=options)).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["detections"] > 0

    def as_here(text: str) -> str:
        host = s3_server.split("://", 1)[1]
        return (text.replace("http://minio.internal:9000", s3_server).replace("minio.internal:9000", host)
                .replace("s3://results/photos/", f"s3://{name}/photos/"))

    return as_here, manifest["counts"]["detections"]


def test_readme_polars_query_of_an_s3_output(s3_output):
    as_here, detections = s3_output
    block = re.search(r"```python\n(import polars as pl\ns3 = .*?)```", readme(), re.S).group(1)
    *setup, query = block.strip().splitlines()
    scope: dict = {}
    exec(as_here("\n".join(setup) + "\nresult = " + query), scope)
    assert set(scope["result"]["label"].to_list()) <= {"circle", "square", "triangle"}
    assert scope["result"]["len"].sum() == detections


def test_readme_duckdb_query_of_an_s3_output(s3_output):
    import duckdb

    as_here, detections = s3_output
    block = re.search(r"```sql\n(INSTALL httpfs.*?)```", readme(), re.S).group(1)
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", as_here(block)).split(";") if s.strip()]
    con = duckdb.connect()
    try:
        for statement in statements[:2]:  # INSTALL, LOAD
            con.execute(statement)
    except duckdb.Error as exc:
        pytest.skip(f"DuckDB's httpfs extension cannot be had here, so the README's S3 query is not run: "
                    f"{str(exc).splitlines()[0]}")
    for statement in statements[2:-1]:
        con.execute(statement)
    rows = con.execute(statements[-1]).fetchall()
    assert {label for label, _ in rows} <= {"circle", "square", "triangle"}
    assert sum(n for _, n in rows) == detections


def test_readme_says_which_ray_ports_to_give_when_the_defaults_are_taken():
    """The README's `ray start` with its own ports names every port the suite's real-cluster test gives
    (which runs beside another Ray), each a real `ray start` option, and its job goes to the port chosen."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme(), re.S) if "--dashboard-agent-listen-port" in b)
    command = block.replace("\\\n", " ")
    ports = dict(re.findall(r"--([a-z-]*port)=(\d+)", command.split("\n")[0]))
    test_source = open(os.path.join(ROOT, "tests", "test_ray_job.py")).read()
    head = test_source[test_source.index("def head("):test_source.index("def submit(")]
    assert set(re.findall(r"--([a-z-]*port)=", head)) <= set(ports), ports
    defaults = {"port": "6379", "dashboard-port": "8265", "ray-client-server-port": "10001",
                "dashboard-agent-listen-port": "52365"}
    assert all(ports[name] != value for name, value in defaults.items()), ports
    options = subprocess.run([os.path.join(BIN, "ray"), "start", "--help"], capture_output=True, text=True,
                             timeout=120).stdout
    assert all(f"--{name}" in options for name in ports), ports
    assert f"--address http://127.0.0.1:{ports['dashboard-port']}" in command
