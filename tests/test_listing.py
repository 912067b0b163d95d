import os

import pytest

from batch_detect.errors import InputError
from batch_detect.inputs.listing import list_input
from batch_detect.inputs.plan import plan_fingerprint, plan_shards


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def test_plan_is_sorted_fixed_size_and_stable():
    uris = [f"s3://b/p/{i:03d}.jpg" for i in range(10)][::-1]
    shards = plan_shards(uris, 4)
    assert [s.shard_id for s in shards] == ["shard-000000", "shard-000001", "shard-000002"]
    assert [len(s.uris) for s in shards] == [4, 4, 2]
    assert shards[0].uris[0] == "s3://b/p/000.jpg"
    assert [u for s in shards for u in s.uris] == sorted(uris)
    # same listing in any order → same plan and fingerprint; a different size → a different plan
    assert plan_fingerprint(plan_shards(list(reversed(uris)), 4)) == plan_fingerprint(shards)
    assert plan_fingerprint(plan_shards(uris, 5)) != plan_fingerprint(shards)


def test_list_folder_recursive_filters_extensions_and_hidden(tmp_path):
    for rel in ["a.jpg", "sub/b.PNG", "notes.txt", ".hidden.jpg", "_SUCCESS", "sub/c.jpeg"]:
        _touch(str(tmp_path / rel))
    listing = list_input(str(tmp_path), (".jpg", ".jpeg", ".png"))
    assert [os.path.relpath(u, tmp_path) for u in listing.uris] == ["a.jpg", "sub/b.PNG", "sub/c.jpeg"]
    assert [os.path.basename(u) for u in listing.skipped] == ["notes.txt"]
    everything = list_input(str(tmp_path), ())
    assert len(everything.uris) == 4 and not everything.skipped


def test_list_glob_and_memory_filesystem(tmp_path):
    for rel in ["x/1.jpg", "x/2.jpg", "x/3.png"]:
        _touch(str(tmp_path / rel))
    listing = list_input(str(tmp_path / "x" / "*.jpg"), (".jpg", ".png"))
    assert [os.path.basename(u) for u in listing.uris] == ["1.jpg", "2.jpg"]

    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/imgs/b.jpg": b"x", "/bucket/imgs/a.jpg": b"y"})
    mem = list_input("memory://bucket/imgs", (".jpg",))
    assert mem.uris == ["memory:///bucket/imgs/a.jpg", "memory:///bucket/imgs/b.jpg"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_input(str(tmp_path / "nope"), (".jpg",))


def test_manifest_files_give_the_same_plan_as_listing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for rel in ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.png"]:
        _touch(str(tmp_path / rel))
    listed = list_input(str(tmp_path / "imgs"), (".jpg", ".png"))
    (tmp_path / "list.txt").write_text("# images\nimgs/c.png\nimgs/a.jpg\n\nimgs/b.jpg\nimgs/a.jpg\n")
    (tmp_path / "list.csv").write_text("uri,note\n" + "\n".join(f"{u},x" for u in reversed(listed.uris)) + "\n")
    pq.write_table(pa.table({"uri": listed.uris[::-1], "id": [1, 2, 3]}), str(tmp_path / "list.parquet"))
    for name in ("list.txt", "list.csv", "list.parquet"):
        got = list_input(str(tmp_path / name), (".jpg",))
        assert got.uris == listed.uris, name
        assert plan_fingerprint(plan_shards(got.uris, 2)) == plan_fingerprint(plan_shards(listed.uris, 2))
    assert list_input(str(tmp_path / "list.txt"), ()).duplicates == 1
    (tmp_path / "bad.csv").write_text("path\nimgs/a.jpg\n")
    with pytest.raises(InputError, match="no 'uri' column"):
        list_input(str(tmp_path / "bad.csv"), ())


def test_external_sort_merges_in_rounds_and_keeps_any_string(tmp_path, monkeypatch):
    from batch_detect.inputs import extsort

    monkeypatch.setattr(extsort, "RUN_SIZE", 7)
    monkeypatch.setattr(extsort, "FAN_IN", 3)  # 300 strings: 43 runs, merged in rounds of 3
    rng = __import__("random").Random(5)
    strings = [f"s3://b/{rng.randrange(250):04d}" for _ in range(300)] + ["s3://b/line\nbreak", "s3://b/é", "s3://b/é"]
    rng.shuffle(strings)
    repeats = []
    got = list(extsort.sorted_unique(strings, repeats.append, folder=str(tmp_path)))
    assert got == sorted(set(strings))
    assert sorted(repeats) == sorted(s for s, n in __import__("collections").Counter(strings).items() for _ in range(n - 1))
    assert os.listdir(tmp_path) == []  # the runs are removed


def test_large_unsorted_manifest_is_sorted_on_disk(tmp_path, monkeypatch):
    import tempfile

    from batch_detect.inputs import extsort, listing

    monkeypatch.setattr(listing, "SORT_LIMIT", 40)
    monkeypatch.setattr(extsort, "RUN_SIZE", 25)
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    uris = [f"s3://bucket/img/{i:05d}.jpg" for i in range(300)]
    listed = uris + uris[::7]  # 43 repeats
    __import__("random").Random(9).shuffle(listed)
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(listed) + "\n")
    stats = listing.ListingStats()
    assert list(listing.iter_input(str(manifest), (), stats=stats)) == uris
    assert stats.duplicates == 43 and stats.sorted_on_disk
    assert os.listdir(spill) == []

    # A head in order is streamed as it comes: a line out of order after it stops the listing, named.
    late = tmp_path / "late.txt"
    late.write_text("\n".join(uris[:100] + [uris[0]] + uris[100:]) + "\n")
    with pytest.raises(InputError, match=r"not sorted \(URI 101 's3://bucket/img/00000.jpg' comes after"):
        list(listing.iter_input(str(late), ()))

    # No room to sort: the error says where and what to do.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(InputError, match="set TMPDIR"):
        list(listing.iter_input(str(manifest), ()))


def test_external_sort_leaves_no_runs_when_a_daemon_thread_merging_is_killed_at_exit(tmp_path):
    """The listing merges on a daemon thread; a run that fails while it merges exits without the
    generator's `finally`: the runs are removed at exit all the same."""
    import subprocess
    import sys

    script = f"""
import sys, threading, time
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from batch_detect.inputs import extsort
extsort.RUN_SIZE = 1000
def consume():
    for s in extsort.sorted_unique((f"u{{i * 7919 % 5000:05d}}" for i in range(5000)), folder={str(tmp_path)!r}):
        time.sleep(0.01)
threading.Thread(target=consume, daemon=True).start()
time.sleep(0.5)
import os
print(len(os.listdir({str(tmp_path)!r})))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"  # merging when the process exits: its folder exists
    assert os.listdir(tmp_path) == []
