"""Images inside containers: tar shards (WebDataset style) and Parquet image-bytes columns, streamed
by the real job, locally and from a bucket on moto's S3 server; each hostile member is a failure record."""

from __future__ import annotations

import io
import json
import os
import tarfile

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_detect.config import IMAGE_EXTENSIONS, RunConfig
from batch_detect.inputs.containers import iter_parquet, iter_tar, unsafe_member_name
from batch_detect.errors import InputError, ReadError
from batch_detect.inputs.plan import plan_input
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import recall_precision

HOSTILE = {  # member name -> the failure it must become
    "../escape.jpg": "read/unsafe_member_name",
    "/etc/absolute.jpg": "read/unsafe_member_name",
    "a/../../up.jpg": "read/unsafe_member_name",
    "corrupt.jpg": "decode/unidentified_image",
    "link.jpg": "read/not_a_file",
}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tars(folder, images, truth: dict, per_tar: int, hostile: bool = True) -> dict:
    """WebDataset-style tars of the images (each with a .json sidecar); the first tar also gets the
    hostile members. Returns {item uri: truth boxes} for the good members."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(truth)
    expected = {}
    for t, lo in enumerate(range(0, len(names), per_tar)):
        path = os.path.join(folder, f"shard-{t:03d}.tar")
        with tarfile.open(path, "w") as tar:
            for name in names[lo:lo + per_tar]:
                key = f"sample/{os.path.splitext(name)[0]}"
                _add(tar, key + ".jpg", open(os.path.join(images, name), "rb").read())
                _add(tar, key + ".json", json.dumps({"name": name}).encode())
                expected[f"{path}#{key}.jpg"] = truth[name]
            if hostile and t == 0:
                good = open(os.path.join(images, names[0]), "rb").read()
                for member in ("../escape.jpg", "/etc/absolute.jpg", "a/../../up.jpg"):
                    _add(tar, member, good)
                _add(tar, "corrupt.jpg", b"this is text, not a JPEG")
                link = tarfile.TarInfo("link.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(link)
    return expected


def tuples(boxes) -> list:
    return [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in boxes]


def predictions(out: str, keys) -> dict:
    rows = duckdb.execute(f"SELECT uri, class_id, xmin, ymin, xmax, ymax FROM read_parquet('{out}/detections/*.parquet')"
                          ).fetchall()
    pred: dict = {k: [] for k in keys}
    for uri, *box in rows:
        pred.setdefault(uri, []).append(tuple(box))
    return pred


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("containers") / "images"
    truth = write_dataset(str(folder), 40, seed=77)
    return str(folder), truth


# --- tar: pure streaming ---------------------------------------------------------------------------


def test_unsafe_member_names():
    for name in ("../x.jpg", "/abs.jpg", "a/../../b.jpg", "C:/x.jpg", "..\\x.jpg"):
        assert unsafe_member_name(name), name
    for name in ("a/b.jpg", "x..y.jpg", "..hidden/x.jpg"):
        assert not unsafe_member_name(name), name


def _outcomes(items) -> dict:
    out = {}
    for uri, get in items:
        try:
            out[uri] = len(get())
        except ReadError as exc:
            out[uri] = exc.error_type
    return out


def test_tar_members_streamed_and_hostile_ones_recorded(tmp_path, drawn):
    images, truth = drawn
    expected = make_tars(str(tmp_path / "tars"), images, dict(list(truth.items())[:5]), per_tar=10)
    tar = str(tmp_path / "tars" / "shard-000.tar")
    stats: dict = {}
    got = _outcomes(iter_tar(tar, fsspec.filesystem("file"), IMAGE_EXTENSIONS, stats))
    assert stats["skipped_members"] == 5  # the .json sidecars
    for uri in expected:
        assert isinstance(got.pop(uri), int)
    assert got == {f"{tar}#../escape.jpg": "unsafe_member_name", f"{tar}#/etc/absolute.jpg": "unsafe_member_name",
                   f"{tar}#a/../../up.jpg": "unsafe_member_name", f"{tar}#link.jpg": "not_a_file",
                   f"{tar}#corrupt.jpg": 24}  # bytes: it fails later, at decode


def test_tar_cut_short_duplicate_and_empty(tmp_path, drawn):
    images, truth = drawn
    make_tars(str(tmp_path / "t"), images, dict(list(truth.items())[:6]), per_tar=6, hostile=False)
    whole = (tmp_path / "t" / "shard-000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    got = _outcomes(iter_tar(str(cut), fsspec.filesystem("file"), IMAGE_EXTENSIONS, {}))
    assert got.pop(str(cut)) == "corrupt_archive"
    assert 1 <= len(got) < 6 and all(isinstance(v, int) for v in got.values())

    dup = tmp_path / "dup.tar"
    with tarfile.open(dup, "w") as tar:
        _add(tar, "x.jpg", b"1")
        _add(tar, "x.jpg", b"2")
    assert _outcomes(iter_tar(str(dup), fsspec.filesystem("file"), IMAGE_EXTENSIONS, {})) == {
        f"{dup}#x.jpg": 1, f"{dup}#x.jpg#2": "duplicate_member"}

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:
        _add(tar, "only.json", b"{}")
    assert _outcomes(iter_tar(str(empty), fsspec.filesystem("file"), IMAGE_EXTENSIONS, {})) == {
        str(empty): "empty_archive"}
    missing = str(tmp_path / "gone.tar")
    assert _outcomes(iter_tar(missing, fsspec.filesystem("file"), IMAGE_EXTENSIONS, {})) == {missing: "not_found"}


def test_auto_form_and_mixed_input(tmp_path, drawn):
    images, truth = drawn
    make_tars(str(tmp_path / "tars"), images, truth, per_tar=15, hostile=False)
    plan = plan_input(str(tmp_path / "tars"), form="auto", extensions=IMAGE_EXTENSIONS, shard_size=64)
    assert plan.form == "tar" and [s.source for s in plan.shards] == sorted(
        str(p) for p in (tmp_path / "tars").glob("*.tar"))
    (tmp_path / "tars" / "stray.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="both tar files"):  # raised when the listing reaches the image
        list(plan_input(str(tmp_path / "tars"), form="auto", extensions=IMAGE_EXTENSIONS, shard_size=64).shards)
    tars = plan_input(str(tmp_path / "tars"), form="tar", extensions=IMAGE_EXTENSIONS, shard_size=64)
    assert tars.form == "tar" and len(list(tars.shards)) == 3 and tars.stats.skipped == 1
    files = plan_input(str(tmp_path / "tars"), form="files", extensions=IMAGE_EXTENSIONS, shard_size=64)
    assert files.form == "files" and sum(len(s.uris) for s in files.shards) == 1


# --- Parquet: pure planning and streaming ----------------------------------------------------------


def plan_parquet(paths, image_column, id_column, shard_size):
    assert len(paths) == 1
    return list(plan_input(paths[0], form="parquet", extensions=(), shard_size=shard_size,
                           image_column=image_column, id_column=id_column).shards)


def write_parquet(path, images, names, id_prefix="id-", row_group_size=7, extra_rows=()):
    data = [open(os.path.join(images, n), "rb").read() for n in names]
    ids = [f"{id_prefix}{n}" for n in names]
    for i, d in extra_rows:
        ids.append(i)
        data.append(d)
    table = pa.table({"key": ids, "jpeg": pa.array(data, pa.binary()), "note": ["x"] * len(ids)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return ids


def test_parquet_plan_and_rows_across_row_groups(tmp_path, drawn):
    images, truth = drawn
    names = sorted(truth)[:30]
    path = str(tmp_path / "part-0.parquet")
    ids = write_parquet(path, images, names, extra_rows=[("id-null", None)])
    shards = plan_parquet([path], "jpeg", "key", shard_size=8)
    assert [len(s.uris) for s in shards] == [8, 8, 8, 7] and [s.start for s in shards] == [0, 8, 16, 24]
    # the third shard spans row groups 2-3 (7 rows each)
    got = list(iter_parquet(shards[2], fsspec.filesystem("file"), "jpeg"))
    assert [u for u, _ in got] == ids[16:24]
    assert [g() for _, g in got] == [open(os.path.join(images, n), "rb").read() for n in names[16:24]]
    assert _outcomes(iter_parquet(shards[3], fsspec.filesystem("file"), "jpeg"))["id-null"] == "empty_cell"
    # a half of a shard (how poison images are isolated) reads exactly its rows
    half = shards[2].halves()[1]
    assert [u for u, _ in iter_parquet(half, fsspec.filesystem("file"), "jpeg")] == ids[20:24]
    no_ids = plan_parquet([path], "jpeg", None, shard_size=100)
    assert no_ids[0].uris[:2] == (f"{path}#0", f"{path}#1")


def test_parquet_input_errors(tmp_path, drawn):
    images, truth = drawn
    path = str(tmp_path / "p.parquet")
    write_parquet(path, images, sorted(truth)[:3], extra_rows=[("id-" + sorted(truth)[0], b"x")])
    with pytest.raises(InputError, match="repeated ids"):
        plan_parquet([path], "jpeg", "key", 8)
    with pytest.raises(InputError, match="no column 'image'.*jpeg"):
        plan_parquet([path], "image", None, 8)
    with pytest.raises(InputError, match="not binary"):
        plan_parquet([path], "note", None, 8)
    with pytest.raises(InputError, match="no column 'id'"):
        plan_parquet([path], "jpeg", "id", 8)


def test_parquet_ids_are_checked_across_files_beyond_memory(tmp_path, drawn, monkeypatch):
    """Ids go through the spilling sort (runs of 5 here): a repeat across files is found, unique ids plan."""
    from batch_detect.inputs import extsort

    monkeypatch.setattr(extsort, "RUN_SIZE", 5)
    images, truth = drawn
    names = sorted(truth)[:24]
    folder = tmp_path / "pq"
    folder.mkdir()
    write_parquet(str(folder / "a.parquet"), images, names[:12])
    write_parquet(str(folder / "b.parquet"), images, names[12:])
    shards = list(plan_input(str(folder), form="parquet", extensions=(), shard_size=8, image_column="jpeg",
                             id_column="key").shards)
    assert [u for s in shards for u in s.uris] == [f"id-{n}" for n in names]
    write_parquet(str(folder / "c.parquet"), images, [names[3], names[20], names[3]])
    with pytest.raises(InputError, match=rf"repeated ids \(3 rows repeat an earlier id, e.g. 'id-{names[3]}', 'id-{names[20]}'\)"):
        plan_input(str(folder), form="parquet", extensions=(), shard_size=8, image_column="jpeg", id_column="key")


def test_many_parquet_files_planned_at_once_come_out_in_file_order(tmp_path, drawn):
    """Files are planned several at a time (each costs a few requests on a store): the plan is still in
    file order, and the first bad file in that order is the one named, whichever finished first."""
    from batch_detect.inputs.containers import PLAN_FILES_AT_ONCE

    images, truth = drawn
    names = sorted(truth)[:3]
    folder = tmp_path / "many"
    folder.mkdir()
    count = 2 * PLAN_FILES_AT_ONCE + 3
    for f in range(count):
        write_parquet(str(folder / f"part-{f:03d}.parquet"), images, names[:1 + f % 3], id_prefix=f"f{f:03d}-",
                      row_group_size=1)
    for id_column in ("key", None):
        shards = list(plan_input(str(folder), form="parquet", extensions=(), shard_size=2, image_column="jpeg",
                                 id_column=id_column).shards)
        sources = [s.source for s in shards]
        assert sources == sorted(sources) and len(set(sources)) == count
        assert sum(len(s.uris) for s in shards) == sum(1 + f % 3 for f in range(count))
    pq.write_table(pa.table({"other": [1]}), str(folder / "part-005.parquet"))
    pq.write_table(pa.table({"other": [1]}), str(folder / "part-010.parquet"))  # planned beside part-005
    with pytest.raises(InputError, match="part-005.parquet' has no column 'jpeg'"):
        list(plan_input(str(folder), form="parquet", extensions=(), shard_size=2, image_column="jpeg").shards)


# --- through the job -------------------------------------------------------------------------------


def _cfg(models_dir, **kw) -> RunConfig:
    return RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
                     labels=os.path.join(models_dir, "shapes_labels.txt"), score_threshold=0.3, **kw)


def test_tar_shards_through_the_job(local_ray, models_dir, tmp_path, drawn):
    images, truth = drawn
    expected = make_tars(str(tmp_path / "tars"), images, truth, per_tar=15)
    out = str(tmp_path / "out")
    manifest = run(_cfg(models_dir, input=str(tmp_path / "tars"), output=out)).manifest
    assert manifest["status"] == "complete" and manifest["plan"]["form"] == "tar"
    assert manifest["plan"]["num_tars"] == 3
    assert manifest["counts"]["images"] == len(truth)
    failures = dict(duckdb.execute(f"SELECT split_part(uri, '#', 2), stage || '/' || error_type "
                                   f"FROM read_parquet('{out}/failures/*.parquet')").fetchall())
    assert failures == HOSTILE
    report = verify(out)
    assert report.ok, report.problems
    recall, precision = recall_precision({k: tuples(v) for k, v in expected.items()}, predictions(out, expected))
    assert recall >= 0.95 and precision >= 0.9, (recall, precision)
    # the report's gallery reads members back out of their tars
    from batch_detect.commands.report import summarize, write_html

    write_html(summarize(out), str(tmp_path / "html"), samples=4)
    assert len(list((tmp_path / "html" / "gallery").glob("*.png"))) == 4


def test_parquet_rows_through_the_job_and_resume(local_ray, models_dir, tmp_path, drawn):
    images, truth = drawn
    names = sorted(truth)
    os.makedirs(tmp_path / "pq")
    ids = write_parquet(str(tmp_path / "pq" / "a.parquet"), images, names[:25])
    ids += write_parquet(str(tmp_path / "pq" / "b.parquet"), images, names[25:], extra_rows=[("not-an-image", b"GIF89a")])
    out = str(tmp_path / "out")
    cfg = _cfg(models_dir, input=str(tmp_path / "pq"), output=out, image_column="jpeg", id_column="key", shard_size=8)
    manifest = run(cfg).manifest
    assert manifest["status"] == "complete" and manifest["plan"]["form"] == "parquet"
    assert (manifest["counts"]["images"], manifest["counts"]["failures"]) == (len(names), 1)
    got = {r[0] for r in duckdb.execute(f"SELECT uri FROM read_parquet('{out}/images/*.parquet')").fetchall()}
    assert got == {f"id-{n}" for n in names}
    report = verify(out, input_url=str(tmp_path / "pq"))
    assert report.ok, report.problems
    recall, precision = recall_precision({f"id-{k}": tuples(v) for k, v in truth.items()},
                                         predictions(out, [f"id-{k}" for k in truth]))
    assert recall >= 0.95 and precision >= 0.9, (recall, precision)
    again = run(_cfg(models_dir, input=str(tmp_path / "pq"), output=out, image_column="jpeg", id_column="key",
                     shard_size=8)).manifest
    assert again["counts"]["skipped_committed_shards"] == manifest["plan"]["num_shards"]


def test_tar_and_parquet_from_a_bucket(local_ray, s3_server, models_dir, tmp_path, drawn):
    import s3fs

    images, truth = drawn
    options = {"key": "k", "secret": "s", "endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**options)
    name = f"bd-cont-{os.getpid()}"
    fs.mkdir(name)
    make_tars(str(tmp_path / "tars"), images, truth, per_tar=20)
    fs.put(str(tmp_path / "tars") + "/", f"{name}/tars/", recursive=True)
    write_parquet(str(tmp_path / "rows.parquet"), images, sorted(truth))
    fs.put(str(tmp_path / "rows.parquet"), f"{name}/rows/rows.parquet")
    from flaky_proxy import FlakyProxy

    # Through a proxy that throttles ~5% of requests (503 SlowDown): retries absorb them, no records.
    with FlakyProxy(s3_server, fail_fraction=0.05, seed=3) as proxy:
        flaky = {**options, "endpoint_url": proxy.url}
        for form, kw in (("tar", {"input": f"s3://{name}/tars/"}),
                         ("parquet", {"input": f"s3://{name}/rows/", "image_column": "jpeg"})):
            out = f"s3://{name}/out-{form}"
            manifest = run(_cfg(models_dir, output=out, storage_options=flaky, shard_size=16, **kw)).manifest
            assert manifest["status"] == "complete" and manifest["plan"]["form"] == form
            expected_failures = {"read/unsafe_member_name": 3, "read/not_a_file": 1,
                                 "decode/unidentified_image": 1} if form == "tar" else {}
            assert manifest["counts"]["images"] == len(truth), manifest["counts"]
            assert manifest["counts"]["failure_types"] == expected_failures
            assert verify(out, storage_options=options).ok
        assert proxy.injected > 0, "no fault was injected: the test tested nothing"
    fs.get(f"{name}/out-parquet/images/", str(tmp_path / "dl") + "/", recursive=True)
    assert duckdb.execute(f"SELECT count(*) FROM read_parquet('{tmp_path}/dl/*.parquet')").fetchone() == (len(truth),)
    first = duckdb.execute(f"SELECT min(uri) FROM read_parquet('{tmp_path}/dl/*.parquet')").fetchone()[0]
    assert first == f"s3://{name}/rows/rows.parquet#0"
