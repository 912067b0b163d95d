import os

import pytest

from batch_detect.errors import InputError
from batch_detect.listing import list_input
from batch_detect.plan import plan_fingerprint, plan_shards


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
