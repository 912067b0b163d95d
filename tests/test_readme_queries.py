"""The README's DuckDB recipes, run against a real run's output: they execute, and the invariant they
state holds."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import duckdb
import pytest

from batch_detect.config import RunConfig
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset
from helpers import write_bad_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_sql() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```sql\n(.*?)```", text, re.S).group(1)
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", block).split(";")]
    return [s for s in statements if s]


def rounded(rows: list[tuple]) -> list[tuple]:
    """Rows with floats rounded: an average summed in another order may differ in its last bits."""
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in row) for row in rows]


def test_readme_duckdb_recipes(local_ray, models_dir, tmp_path):
    images = tmp_path / "images"
    write_dataset(str(images), 30, seed=31)
    write_bad_inputs(str(images))
    out = tmp_path / "out"
    run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
                  labels=os.path.join(models_dir, "shapes_labels.txt"), input=str(images), output=str(out),
                  shard_size=8))
    # one shard, one actor: a small input does not start the whole pool (2 CPUs here)
    one = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(images),
                        output=str(tmp_path / "one"), shard_size=64)).manifest
    assert one["plan"]["num_shards"] == 1 and one["cluster"]["actors"] == 1
    statements = readme_sql()
    assert len(statements) == 6
    results = [duckdb.execute(s.replace("'out/", f"'{out}/")).fetchall() for s in statements]
    planned, done, per_class, _, failures, top = results
    assert planned == done == [(33,)]
    assert {row[0] for row in per_class} <= {"circle", "square", "triangle"} and per_class
    assert sum(n for *_, n in failures) == 3
    assert len(top) == 10 and top[0][2] >= top[-1][2]
    # Ties (the uint8 model's scores are quantized: many boxes share the top score) must not decide
    # which rows a query returns: the same queries over the rows in another order give the same answer.
    shuffled = {t: f"(SELECT * FROM read_parquet('{out}/{t}/*.parquet') ORDER BY md5(uri) DESC, random())"
                for t in ("images", "detections", "failures")}
    ordered = [s for s in statements if "ORDER BY" in s]
    assert len(ordered) == 2
    for statement in ordered:
        again = statement
        for table, subquery in shuffled.items():
            again = again.replace(f"read_parquet('out/{table}/*.parquet')", subquery)
        assert rounded(duckdb.execute(again).fetchall()) == rounded(results[statements.index(statement)]), statement


def test_readme_shell_and_polars_lines_run_after_the_readme_setup(local_ray, models_dir, tmp_path):
    """The flow's `duckdb -c` line and the Polars lines, as the README writes them, with what `make demo`
    installs (the duckdb command line and Polars come with the [query] extra)."""
    import shutil
    import subprocess
    import sys

    text = open(os.path.join(ROOT, "README.md")).read()
    shell = re.search(r"^duckdb -c \"(.*)\"$", text, re.M).group(1)
    python = re.search(r"```python\n(import polars as pl\n.*?)\n```", text, re.S).group(1)
    duckdb_cli = shutil.which("duckdb", path=os.path.dirname(sys.executable))
    assert duckdb_cli, "the duckdb command line is not installed beside this Python: pip install -e '.[query]'"
    images = tmp_path / "images"
    write_dataset(str(images), 20, seed=33)
    out = tmp_path / "out"
    run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
                  labels=os.path.join(models_dir, "shapes_labels.txt"), input=str(images), output=str(out)))
    got = subprocess.run([duckdb_cli, "-csv", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    labels = {line.split(",")[0] for line in got.stdout.splitlines()[1:]}
    assert labels and labels <= {"circle", "square", "triangle"}, got.stdout
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(python.replace('pl.read_parquet("out/detections/*.parquet").group_by("label").len()',
                            'result = pl.read_parquet("out/detections/*.parquet").group_by("label").len()'), scope)
    finally:
        os.chdir(cwd)
    polars_labels = set(scope["result"]["label"].to_list())
    assert polars_labels == labels


def test_readme_spark_lines_read_a_job_output(models_dir, tmp_path):
    """The README's Spark lines, as written, on an output `batch-detect run` wrote: the failures by stage and
    type that DuckDB counts."""
    if not shutil.which("java"):
        pytest.skip("no Java runtime on PATH, which Spark needs (Debian: apt-get install default-jre-headless)")
    if importlib.util.find_spec("pyspark") is None:
        pytest.skip("pyspark is not installed (pip install -e '.[spark]'; .ci/run does where Java is present)")
    text = open(os.path.join(ROOT, "README.md")).read()
    spark = re.search(r"```python\n(from pyspark\.sql import SparkSession\n.*?)```", text, re.S).group(1)
    images = tmp_path / "images"
    write_dataset(str(images), 12, seed=35)
    write_bad_inputs(str(images))
    job = subprocess.run([sys.executable, "-m", "batch_detect", "run", "--model",
                          os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", str(images), "--output",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert job.returncode == 0, job.stderr[-3000:]
    # local[1]: one core of the test machine's two; SPARK_LOCAL_IP: no lookup of this host's name
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_SUBMIT_ARGS": "--master local[1] pyspark-shell"}
    got = subprocess.run([sys.executable, "-c", spark], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert got.returncode == 0, got.stderr[-3000:]
    rows = [(stage, kind, int(n)) for stage, kind, n in
            re.findall(r"^\|\s*(\w+)\|\s*(\w+)\|\s*(\d+)\|$", got.stdout, re.M)]
    expected = duckdb.execute("SELECT stage, error_type, count(*) FROM "
                              f"read_parquet('{tmp_path}/out/failures/*.parquet') GROUP BY ALL").fetchall()
    assert len(expected) == 3 and sorted(rows) == sorted(expected), got.stdout
