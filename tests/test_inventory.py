"""An S3 Inventory report as the input, on the real S3 protocol (moto's server): a day's report written
the way S3 writes one (CSV.gz without a header, URL-encoded keys, delete markers and old versions of a
versioned bucket, non-image keys; a manifest.json with each file's MD5), the job run over it, then the
next day's report with --incremental."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
from urllib.parse import quote_plus

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_detect.commands.cli import main
from batch_detect.config import RunConfig
from batch_detect.inputs.listing import ListingStats, iter_listed
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset

SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
# Spaces, non-ASCII, '+' and '%' in keys: what URL-encoding in the CSV must survive.
KEYS = ["photos/summer 2026/beach {i}.jpg", "photos/café/naïve-{i}.jpg", "photos/a+b/%{i}.jpg",
        "photos/日本/写真{i}.png"]


@pytest.fixture
def bucket(empty_bucket, tmp_path, models_dir):
    name, options, fs = empty_bucket
    local = tmp_path / "images"
    truth = write_dataset(str(local), 10, seed=33)
    fs.put(os.path.join(models_dir, "shapes_ssd_uint8.tflite"), f"{name}/models/m.tflite")
    images = sorted(truth)
    keys = {}
    for i, image in enumerate(images[:8]):
        key = KEYS[i % len(KEYS)].format(i=i)
        fs.put(str(local / image), f"{name}/{key}")
        keys[key] = image
    fs.pipe(f"{name}/photos/notes.txt", b"not an image")
    fs.pipe(f"{name}/photos/empty folder/", b"")
    return name, options, fs, local, images, keys


def _row(name: str, key: str, size, etag, latest=True, deleted=False, version="v1") -> list:
    return [name, quote_plus(key, safe="/"), version, str(latest).lower(), str(deleted).lower(),
            "" if size is None else str(size), "2026-12-01T00:00:00.000Z", etag or "", "STANDARD"]


def inventory_rows(fs, name: str, gone: tuple[str, ...] = ()) -> list[list]:
    """A versioned bucket's inventory: every current object with its real size and ETag, an older version
    of each, and a delete marker (over an old version) for each key in `gone`."""
    fs.invalidate_cache()
    rows = [_row(name, "photos/empty folder/", 0, "d41d8cd98f00b204e9800998ecf8427e")]  # a console "folder"
    for path in fs.find(f"{name}/photos", withdirs=False):
        info = fs.info(path)
        if path.endswith("/") or info["type"] != "file":
            continue
        key = path[len(name) + 1:]
        rows.append(_row(name, key, info["size"], info["ETag"].strip('"'), version="v2"))
        rows.append(_row(name, key, info["size"] + 7, "0" * 32, latest=False, version="v1"))
    for key in gone:
        rows.append(_row(name, key, None, None, deleted=True, version="v9"))
        rows.append(_row(name, key, 1234, "f" * 32, latest=False, version="v8"))
    return rows


def write_report(fs, name: str, day: str, rows: list, files: int = 3, fmt: str = "CSV") -> str:
    """rows shuffled over `files` data files (S3 sorts nothing across files), a manifest naming them."""
    random.Random(day).shuffle(rows)
    base = f"inventory/{name}/daily/{day}"
    entries = []
    for n in range(files):
        part = rows[n::files]
        if fmt == "CSV":
            text = io.StringIO()
            csv.writer(text, quoting=csv.QUOTE_ALL).writerows(part)
            data, key = gzip.compress(text.getvalue().encode()), f"inventory/{name}/daily/data/{day}-{n}.csv.gz"
        else:
            data, key = _columnar(part, fmt), f"inventory/{name}/daily/data/{day}-{n}.{fmt.lower()}"
        fs.pipe(f"{name}/{key}", data)
        entries.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    manifest = {"sourceBucket": name, "destinationBucket": f"arn:aws:s3:::{name}", "version": "2016-11-30",
                "creationTimestamp": "1764547200000", "fileFormat": fmt.title() if fmt == "PARQUET" else fmt,
                "fileSchema": SCHEMA if fmt == "CSV" else "message s3.inventory { required binary key (UTF8); }",
                "files": entries}
    fs.pipe(f"{name}/{base}/manifest.json", json.dumps(manifest).encode())
    return f"s3://{name}/{base}/manifest.json"


def _columnar(rows: list, fmt: str) -> bytes:
    """Parquet and ORC inventories have snake_case columns, typed, and keys not URL-encoded."""
    from urllib.parse import unquote_plus

    table = pa.table({"bucket": [r[0] for r in rows], "key": [unquote_plus(r[1]) for r in rows],
                      "is_latest": [r[3] == "true" for r in rows], "is_delete_marker": [r[4] == "true" for r in rows],
                      "size": pa.array([int(r[5]) if r[5] else None for r in rows], pa.int64()),
                      "e_tag": [r[7] or None for r in rows]})
    sink = io.BytesIO()
    if fmt == "ORC":
        from pyarrow import orc

        orc.write_table(table, sink)
    else:
        pq.write_table(table, sink)
    return sink.getvalue()


def listed(url: str, options: dict, **kwargs) -> list[tuple[str, str | None]]:
    return list(iter_listed(url, (".jpg", ".png"), options, **kwargs))


def images_table(fs, name: str, out: str, tmp_path) -> list[tuple]:
    local = tmp_path / out
    fs.get(f"{name}/{out}/", str(local) + "/", recursive=True)
    return duckdb.execute(f"SELECT uri, run_id FROM read_parquet('{local}/images/*.parquet') ORDER BY uri").fetchall()


def test_inventory_lists_what_the_prefix_listing_lists_with_the_same_versions(bucket, monkeypatch):
    """CSV.gz, Parquet and ORC reports of the same bucket give exactly the prefix listing's current images and
    versions, in its order (also when sorted through the disk); old versions, delete markers, other
    extensions and folder markers are not planned; --inventory-prefix narrows it."""
    from batch_detect.inputs import extsort

    name, options, fs, local, images, keys = bucket
    prefix_listing = listed(f"s3://{name}/photos/", options)
    assert len(prefix_listing) == len(keys)
    rows = inventory_rows(fs, name, gone=("photos/deleted.jpg",))
    stats = ListingStats()
    assert listed(write_report(fs, name, "2026-12-01T00-00Z", list(rows)), options, stats=stats) == prefix_listing
    assert stats.old_versions == sum(r[3] == "false" or r[4] == "true" for r in rows) >= len(keys) + 2
    assert stats.skipped == 1 and not stats.sorted_on_disk  # notes.txt
    monkeypatch.setattr(extsort, "RUN_SIZE", 3)  # a report larger than memory's share: runs spilled and merged
    stats = ListingStats()
    assert listed(write_report(fs, name, "2026-12-01T00-02Z", list(rows)), options, stats=stats) == prefix_listing
    assert stats.sorted_on_disk
    monkeypatch.undo()
    parquet_url = write_report(fs, name, "2026-12-01T00-01Z", list(rows), files=2, fmt="PARQUET")
    assert listed(parquet_url, options) == prefix_listing
    orc_url = write_report(fs, name, "2026-12-01T00-03Z", list(rows), files=2, fmt="ORC")
    assert listed(orc_url, options) == prefix_listing
    cafe = listed(parquet_url, options, inventory_prefix="photos/café/")
    assert cafe == [item for item in prefix_listing if "/café/" in item[0]] and cafe
    assert listed(parquet_url, options, inventory_prefix=f"s3://{name}/photos/café/") == cafe


def test_run_over_an_inventory_then_incremental_with_the_next_days(bucket, tmp_path):
    name, options, fs, local, images, keys = bucket
    day1 = write_report(fs, name, "2026-12-01T00-00Z", inventory_rows(fs, name))
    cfg = dict(model=f"s3://{name}/models/m.tflite", output=f"s3://{name}/out", shard_size=3,
               storage_options=options)
    manifest = run(RunConfig(input=day1, **cfg)).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["failures"] == 0
    assert manifest["input"]["inventory_old_versions"] == len(keys) + 1  # each object's older version
    rows = images_table(fs, name, "out", tmp_path / "1")
    expected = sorted(f"s3://{name}/{k}" for k in keys)
    assert [u for u, _ in rows] == expected  # each current image once, nothing else
    # Day 2: one image added, one replaced by other bytes, one deleted (a delete marker over it).
    added, changed, deleted = "photos/new day/neu ß.jpg", sorted(keys)[0], sorted(keys)[1]
    fs.put(str(local / images[8]), f"{name}/{added}")
    fs.put(str(local / images[9]), f"{name}/{changed}")
    fs.rm(f"{name}/{deleted}")
    day2 = write_report(fs, name, "2026-12-02T00-00Z", inventory_rows(fs, name, gone=(deleted,)))
    manifest = run(RunConfig(input=day2, incremental=True, **cfg)).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["failures"] == 0
    rows = images_table(fs, name, "out", tmp_path / "2")
    assert sorted(u for u, run_id in rows if run_id == 2) == sorted(f"s3://{name}/{k}" for k in (added, changed))
    assert len([u for u, _ in rows]) == len(expected) + 2


@pytest.mark.parametrize("damage", ["md5", "missing"])
def test_a_damaged_or_missing_data_file_is_exit_2_before_anything_is_written(bucket, damage, capsys):
    name, options, fs, local, images, keys = bucket
    url = write_report(fs, name, "2026-12-01T00-00Z", inventory_rows(fs, name))
    report = json.loads(fs.cat_file(url))
    victim = report["files"][1]["key"]
    if damage == "md5":
        fs.pipe(f"{name}/{victim}", gzip.compress(b'"x","photos/evil.jpg"\n'))
    else:
        fs.rm(f"{name}/{victim}")
    so = [f"--storage-option={k}={v}" for k, v in options.items()]
    code = main(["run", "--model", f"s3://{name}/models/m.tflite", "--input", url,
                 "--output", f"s3://{name}/out-bad", *so])
    err = capsys.readouterr().err
    assert code == 2, err
    assert victim in err and ("MD5" in err if damage == "md5" else "does not exist" in err), err
    assert not fs.exists(f"{name}/out-bad")


def test_inventory_prefix_needs_an_inventory(bucket):
    name, options, fs, local, images, keys = bucket
    with pytest.raises(Exception, match="--inventory-prefix"):
        listed(f"s3://{name}/photos/", options, inventory_prefix="photos/")
