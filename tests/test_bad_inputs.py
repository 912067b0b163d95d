"""The bad-input corpus end to end: each file is either processed correctly or a failure record with
its specific error type; none crashes the job, none is lost."""

from __future__ import annotations

import os

import duckdb

from batch_detect.config import RunConfig
from batch_detect.run.pipeline import run
from batch_detect.commands.verify import verify
from helpers import iou, write_corpus


def test_corpus_outcomes(local_ray, models_dir, tmp_path):
    folder = str(tmp_path / "corpus")
    expected = write_corpus(folder)
    out = str(tmp_path / "out")
    manifest = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=folder,
                             output=out, shard_size=4, score_threshold=0.3)).manifest
    assert manifest["status"] == "complete" and verify(out, folder).ok
    ok = {os.path.basename(u): (w, h) for u, w, h in
          duckdb.execute(f"SELECT uri, width, height FROM read_parquet('{out}/images/*.parquet')").fetchall()}
    failed = {os.path.basename(u): (s, e) for u, s, e in
              duckdb.execute(f"SELECT uri, stage, error_type FROM read_parquet('{out}/failures/*.parquet')").fetchall()}
    dets: dict = {}
    for u, c, x0, y0, x1, y1 in duckdb.execute(
            f"SELECT uri, class_id, xmin, ymin, xmax, ymax FROM read_parquet('{out}/detections/*.parquet')").fetchall():
        dets.setdefault(os.path.basename(u), []).append((c, x0, y0, x1, y1))
    assert set(ok) | set(failed) == set(expected)
    for name, outcome in expected.items():
        if outcome[0] == "fail":
            assert name in failed, f"{name} should have failed with {outcome[1]}"
            assert failed[name][1] == outcome[1], (name, failed[name])
            continue
        assert name in ok, f"{name} failed: {failed.get(name)}"
        assert ok[name] == outcome[1], (name, ok[name])
        for box in outcome[2] or []:
            # boxes follow the displayed (EXIF-oriented) image
            assert any(d[0] == box[0] and iou(d[1:], box[1:]) >= 0.5 for d in dets.get(name, [])), (name, box)
    assert failed["bomb_header.png"][0] == "validate"
    assert all(failed[n][0] == "decode" for n in ("truncated.heic", "truncated.avif", "empty_heic.jpg"))
