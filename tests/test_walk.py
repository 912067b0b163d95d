"""walk(): one deterministic order (the full paths sorted, as S3 lists them) over local folders, S3 prefixes (moto's
server on 127.0.0.1) and other fsspec stores; streaming and uncached on object stores."""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid

import fsspec
import pytest
import s3fs

import batch_detect.inputs.walk as walk_module
from batch_detect.inputs.walk import walk

# Names where a depth-first walk by name alone and the sorted strings disagree ('-', '.', ' ', '!' sort before '/'),
# unicode, deep nesting.
TRICKY = [
    "a-b.jpg", "a/x.jpg", "a/x y.jpg", "a0.jpg", "A.jpg", "b/c/d.jpg", "x.y/z.jpg", "x/1.jpg", "x.jpg",
    "x!", "x-/q.jpg", "é.jpg", "z/ü/ß.jpg", "日本/写真.jpg", "emoji/🙂.png",
    "d1/d2/d3/d4/d5/d6/d7/deep.jpg", "d1/d2/side.jpg", "d1.jpg",
]


def _by_components(paths):
    """The walk's order: the full path strings sorted (S3's own order)."""
    return sorted(paths)


def _touch(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


# --- local -------------------------------------------------------------------------------------------

def test_local_sorted_order_on_tricky_names(tmp_path):
    for rel in TRICKY:
        _touch(tmp_path / rel)
    (tmp_path / "empty").mkdir()
    (tmp_path / "emptier" / "still-empty").mkdir(parents=True)
    got = list(walk(fsspec.filesystem("file"), str(tmp_path)))
    assert got == _by_components(str(tmp_path / rel) for rel in TRICKY)
    rel = [os.path.relpath(p, tmp_path) for p in got]
    assert rel.index("a-b.jpg") < rel.index("a/x.jpg") < rel.index("a0.jpg")  # '-' < '/' < '0', as S3 sorts


def test_local_symlinks_to_directories_are_not_followed(tmp_path):
    _touch(tmp_path / "real" / "1.jpg")
    os.symlink(tmp_path / "real", tmp_path / "loop")  # would list real/ twice, or forever if it were a cycle
    os.symlink(tmp_path, tmp_path / "real" / "up")
    os.symlink(tmp_path / "real" / "1.jpg", tmp_path / "link.jpg")  # a symlink to a file is a file
    os.symlink(tmp_path / "missing.jpg", tmp_path / "broken.jpg")
    got = list(walk(fsspec.filesystem("file"), f"file://{tmp_path}/"))
    assert got == [str(tmp_path / "link.jpg"), str(tmp_path / "real" / "1.jpg")]


def test_local_empty_and_missing(tmp_path):
    assert list(walk(fsspec.filesystem("file"), str(tmp_path))) == []
    with pytest.raises(FileNotFoundError):
        list(walk(fsspec.filesystem("file"), str(tmp_path / "nope")))


def test_other_stores_through_ls(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/walk-{uuid.uuid4().hex}"
    for rel in TRICKY:
        fs.pipe(f"{root}/{rel}", b"x")
    fs.mkdir(f"{root}/empty")
    assert list(walk(fs, f"memory://{root}", workers=3, lookahead=2)) == _by_components(
        f"{root}/{rel}" for rel in TRICKY)


# --- S3 ----------------------------------------------------------------------------------------------

def _fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(key="testing-key-id", secret="x", endpoint_url=endpoint, skip_instance_cache=True)


S3_KEYS = (
    [f"p/{k}" for k in TRICKY]
    + ["p/a", "p/a/b",  # a key and a 'directory' of the same name
       "p/dir/", "p/dir/f.jpg", "p/marker-only/",  # zero-byte directory markers: never files
       "p/x y/in-space.jpg", "outside.jpg", "p0/not-under-p.jpg"]
    + [f"p/flat/img-{i:04d}.jpg" for i in range(60)]  # waits for the 'img/' that S3 lists after them
    + ["p/flat/img/inside.jpg", "p/flat/img-0007/deeper.jpg"]
    + [f"p/nested/{i:02d}/{j}.jpg" for i in range(20) for j in range(12)]
)


@pytest.fixture(scope="module")
def tricky_bucket(s3_server):
    fs = _fs(s3_server)
    name = f"walk-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    fs.pipe({f"{name}/{k}": b"" if k.endswith("/") else b"x" for k in S3_KEYS})
    expected = _by_components(f"{name}/{k}" for k in S3_KEYS
                              if k.startswith("p/") and not k.endswith("/"))
    return name, expected


@pytest.mark.parametrize("workers", [1, 8])
@pytest.mark.parametrize("page", [1000, 7])  # 7: many pages per level
def test_s3_sorted_order(s3_server, tricky_bucket, monkeypatch, workers, page):
    name, expected = tricky_bucket
    monkeypatch.setattr(walk_module, "_PAGE", page)
    fs = _fs(s3_server)
    got = list(walk(fs, f"s3://{name}/p/", workers=workers, lookahead=4 if page == 7 else 64))
    assert got == expected
    assert got.index(f"{name}/p/a") < got.index(f"{name}/p/a-b.jpg") < got.index(f"{name}/p/a/b")
    assert not fs.dircache  # the listing must not stay in memory


def test_s3_missing_and_empty(s3_server, tricky_bucket):
    name, _ = tricky_bucket
    fs = _fs(s3_server)
    with pytest.raises(FileNotFoundError):
        list(walk(fs, f"{name}/no-such-prefix"))
    with pytest.raises(FileNotFoundError):
        list(walk(fs, "no-such-bucket-walk/p"))
    assert list(walk(fs, f"{name}/p/marker-only")) == []
    assert list(walk(fs, f"{name}/p/dir")) == [f"{name}/p/dir/f.jpg"]


def _put_direct(fs, name: str, keys) -> None:
    """Keys straight into the in-process moto backend behind the server: thousands of PUTs over HTTP
    would take most of the test budget."""
    from moto.s3.models import s3_backends

    fs.mkdir(name)
    partition, account = s3_backends.bucket_accounts[name]
    backend = s3_backends[account][partition]
    for key in keys:
        backend.put_object(name, key, b"", disable_notification=True)


@pytest.mark.parametrize("page", [1, 3])
def test_s3_random_names_any_page_size(s3_server, monkeypatch, page):
    """Random keys over an alphabet where '/' meets characters either side of it, with markers ('x/')
    and empty components ('a//b'): the walk equals the sorted keys, whatever the page size."""
    rng = random.Random(page)
    keys = {"r/" + "".join(rng.choice("ab-. /é") for _ in range(rng.randint(1, 7))) for _ in range(250)}
    fs = _fs(s3_server)
    name = f"walk-rand-{uuid.uuid4().hex[:8]}"
    _put_direct(fs, name, sorted(keys))
    monkeypatch.setattr(walk_module, "_PAGE", page)
    expected = _by_components(f"{name}/{k}" for k in keys if not k.endswith("/"))
    assert list(walk(fs, f"{name}/r", workers=4, lookahead=8)) == expected


FLAT_STYLES = {
    "sequential": lambda rng, i: f"img_{i:05d}.jpg",
    "uuid": lambda rng, i: f"{uuid.UUID(int=rng.getrandbits(128))}.jpg",
    "unpadded": lambda rng, i: f"frame_{i}.jpg",
    "mixed": lambda rng, i: "".join(rng.choice("ab-. /é0日") for _ in range(rng.randint(1, 9))),
}


@pytest.mark.parametrize("style", list(FLAT_STYLES))
def test_s3_flat_prefix_is_listed_in_ranges_side_by_side(s3_server, monkeypatch, style):
    """A flat prefix bigger than a page is cut into ranges (StartAfter) listed at once: the walk still equals
    the sorted keys exactly, directories among the names included, and the ranges were really used."""
    rng = random.Random(style)
    keys = {"f/" + FLAT_STYLES[style](rng, i) for i in range(700)}
    keys |= {"f/img_00300/in.jpg", "f/img_00301/x/y.jpg", "f/img_00301", "f/0/a.jpg", "f/zz/last.jpg", "f/é/ü.jpg"}
    fs = _fs(s3_server)
    name = f"walk-flat-{uuid.uuid4().hex[:8]}"
    _put_direct(fs, name, sorted(keys))
    monkeypatch.setattr(walk_module, "_PAGE", 20)
    monkeypatch.setattr(walk_module, "_RANGE_PAGES", 2)
    requests = []
    real = fs._call_s3

    async def counting(method, *args, **kwargs):
        requests.append((kwargs.get("Prefix"), kwargs.get("StartAfter"), kwargs.get("ContinuationToken")))
        return await real(method, *args, **kwargs)

    fs._call_s3 = counting
    expected = _by_components(f"{name}/{k}" for k in keys if not k.endswith("/"))
    assert list(walk(fs, f"{name}/f", workers=4, lookahead=8)) == expected
    ranges = [r for r in requests if r[0] == "f/" and r[1]]
    if style != "mixed":  # names that read as numbers: the prefix's pages were cut into many ranges
        assert len(ranges) >= 5, requests
    # each range starts once; no page of the prefix is fetched twice
    assert len({r[1] for r in ranges}) == len(ranges)
    assert len([r for r in requests if r[0] == "f/"]) <= 2 * len(keys) // 20 + 2 * len(ranges) + 2


def test_s3_walk_is_lazy_and_streams(s3_server):
    fs = _fs(s3_server)
    name = f"walk-lazy-{uuid.uuid4().hex[:8]}"
    _put_direct(fs, name, [f"data/d{i:03d}/{j:02d}.jpg" for i in range(100) for j in range(20)])
    listed = []
    real = fs._call_s3

    async def counting(method, *args, **kwargs):
        listed.append(kwargs.get("Prefix"))
        return await real(method, *args, **kwargs)

    fs._call_s3 = counting
    stream = walk(fs, f"{name}/data", workers=4, lookahead=8)
    first = list(itertools.islice(stream, 10))
    assert first == [f"{name}/data/d000/{j:02d}.jpg" for j in range(10)]
    stream.close()
    time.sleep(0.3)  # listings already running when the consumer stopped may still finish
    # the root, `lookahead` sub-directories ahead of the consumer and the one entered; not 100
    assert len(listed) <= 1 + 8 + 2, listed
    listed.clear()
    assert sum(1 for _ in walk(fs, f"{name}/data", workers=4, lookahead=8)) == 2000
    assert len(listed) == 101 and not fs.dircache


# --- globs: streamed through walk, matching what fsspec's glob matches ----------------------------------

GLOBS = ["*.jpg", "*", "*/*.jpg", "**/*.jpg", "**", "a/*", "?/*.jpg", "[ab]*/*", "d1/**/deep.jpg", "d1/*/*.jpg",
         "x*/*", "日本/*", "nothing/*.jpg", "z/*/ß.jpg"]


def _fsspec_glob(fs, pattern):
    """What the listing did before: fsspec's own glob, files only, sorted."""
    from batch_detect.inputs.walk import version_of

    return sorted((p, version_of(info)) for p, info in fs.glob(pattern, detail=True).items()
                  if info.get("type") == "file")


def _streamed_glob(url):
    from batch_detect.inputs.listing import ListingStats, iter_listed

    return list(iter_listed(url, (), stats=ListingStats()))


@pytest.mark.parametrize("pattern", GLOBS)
def test_local_glob_streams_what_fsspec_globs(tmp_path, pattern):
    for name in TRICKY:
        _touch(str(tmp_path / "t" / name))
    fs = fsspec.filesystem("file")
    want = [(p, v) for p, v in _fsspec_glob(fs, f"{tmp_path}/t/{pattern}")
            if not os.path.basename(p).startswith((".", "_"))]
    assert _streamed_glob(f"{tmp_path}/t/{pattern}") == want
    assert want or pattern == "nothing/*.jpg"


def test_glob_enters_only_directories_it_can_match(monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.pipe({f"/globbed/{k}": b"x" for k in ["top.jpg", "a/1.jpg", "a/deep/2.jpg", "b/3.jpg", "c/d/4.jpg"]})
    listed = []
    real_ls = type(fs).ls

    def ls(self, path, detail=True, **kw):
        listed.append(path.rstrip("/"))
        return real_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(type(fs), "ls", ls)
    assert [p for p, _ in _streamed_glob("memory:///globbed/*.jpg")] == ["memory:///globbed/top.jpg"]
    assert listed == ["/globbed"]  # no sub-directory listed: '*.jpg' cannot reach into them
    listed.clear()
    assert [p for p, _ in _streamed_glob("memory:///globbed/a/*.jpg")] == ["memory:///globbed/a/1.jpg"]
    assert listed == ["/globbed/a"]
    listed.clear()
    assert [p for p, _ in _streamed_glob("memory:///globbed/[ab]/*.jpg")] == [
        "memory:///globbed/a/1.jpg", "memory:///globbed/b/3.jpg"]
    assert listed == ["/globbed", "/globbed/a", "/globbed/b"]  # not a/deep, not c


def test_glob_files_are_what_a_folder_walk_finds(tmp_path):
    """Where fsspec's glob and a folder walk disagree, a glob follows the walk: a symlink to a file is a file."""
    _touch(str(tmp_path / "g" / "a.jpg"))
    os.symlink(tmp_path / "g" / "a.jpg", tmp_path / "g" / "link.jpg")
    assert [os.path.basename(p) for p, _ in _streamed_glob(f"{tmp_path}/g/*.jpg")] == ["a.jpg", "link.jpg"]
    assert [os.path.basename(p) for p in walk(fsspec.filesystem("file"), str(tmp_path / "g"))] == ["a.jpg", "link.jpg"]


def test_glob_errors_are_clear(tmp_path):
    from batch_detect.errors import InputError

    with pytest.raises(InputError, match="only be an entire path component"):
        _streamed_glob(f"{tmp_path}/x**.jpg")
    with pytest.raises(InputError, match="wildcard in its first component"):
        _streamed_glob("s3://*/photos/*.jpg")
    assert _streamed_glob(f"{tmp_path}/missing/*.jpg") == []


@pytest.mark.parametrize("pattern", ["*.jpg", "*/*.jpg", "**/*.jpg", "n*/0[0-4]/*", "dir/*", "?", "**"])
def test_s3_glob_streams_what_fsspec_globs(s3_server, tricky_bucket, pattern):
    """As fsspec's glob, but for the files a walk sees differently: the key 'p/a' (also a prefix) is a
    file with its own version (fs.glob drops it, or under '**' gives the prefix's '0:'), the markers
    'p/dir/' and 'p/marker-only/' are not files."""
    name, _ = tricky_bucket
    fs = _fs(s3_server)
    want = [(f"s3://{p}", v) for p, v in _fsspec_glob(fs, f"{name}/p/{pattern}")
            if not os.path.basename(p).startswith((".", "_")) and not p.endswith("/") and p != f"{name}/p/a"]
    if pattern in ("?", "**"):
        etag = __import__("hashlib").md5(b"x").hexdigest()  # its content is b"x" (fs.info answers for the prefix)
        want = sorted(want + [(f"s3://{name}/p/a", f"1:{etag}")])
    fs.invalidate_cache()
    from batch_detect.inputs.listing import ListingStats, iter_listed

    options = {"key": "testing-key-id", "secret": "x", "endpoint_url": s3_server, "skip_instance_cache": True}
    got = list(iter_listed(f"s3://{name}/p/{pattern}", (), storage_options=options, stats=ListingStats()))
    assert got == want and want


def test_s3_listing_parses_timestamps_fast_and_equal(s3_server, tricky_bucket):
    """A listed key's LastModified is parsed by datetime (dateutil's parse was 38 of the 51 µs a key cost):
    the same instants as botocore's own parser, versions as before, and headers' HTTP dates still parse."""
    from botocore.utils import parse_timestamp
    from fsspec.asyn import sync

    from batch_detect.inputs.walk import _iso_timestamp, version_of

    name, expected = tricky_bucket
    before = {p: version_of(info) for p, info in _fs(s3_server).find(f"{name}/p/", detail=True).items()}
    fs = _fs(s3_server)
    got = dict(walk(fs, f"s3://{name}/p/", workers=2, versions=True))
    assert list(got) == expected and got == {p: before[p] for p in expected}
    parser = fs.session.get_component("response_parser_factory").create_parser("rest-xml")
    assert parser._timestamp_parser is _iso_timestamp
    listed = sync(fs.loop, fs._call_s3, "list_objects_v2", Bucket=name, Prefix="p/")["Contents"]
    for c in listed:  # a page parsed by the fast parser, against botocore's parse of the same instants
        assert c["LastModified"] == parse_timestamp(c["LastModified"].strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    head = sync(fs.loop, fs._call_s3, "head_object", Bucket=name, Key=listed[0]["Key"])
    assert head["LastModified"] == listed[0]["LastModified"].replace(microsecond=0)
    for value in ("2026-12-06T21:44:54.000Z", "2026-12-06T21:44:54Z", "Sun, 06 Dec 2026 21:44:54 GMT", 1796593494):
        assert _iso_timestamp(value) == parse_timestamp(value), value
