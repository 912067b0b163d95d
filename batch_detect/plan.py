"""The plan: the input cut into shards with stable ids, streamed, and grouped into plan chunks.

Shards are numbered in listing order, so the same listing and shard size always give the same shards.
The plan is stored in the output chunk by chunk (`_plan/chunk-NNNNNN.parquet`) as it is listed; each
chunk has a fingerprint, so a resumed run compares its listing with the stored plan chunk by chunk
instead of holding either whole.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

from .errors import InputError
from .listing import ListingStats, iter_input

FORMS = ("files", "tar", "parquet")
FIRST_CHUNK_SHARDS = 16  # the first chunk is small so the first shards start within moments
MAX_CHUNK_SHARDS = 4096  # chunks double up to this (262,144 images at 64 per shard)


@dataclass(frozen=True)
class Shard:
    """The unit of work and of commit. `files`: `uris` are image files. `tar`: `uris` is the one tar,
    whose image members are discovered while streaming it. `parquet`: `uris` are the item ids of rows
    `start … start+len(uris)` of the Parquet file `source`."""

    shard_id: str
    uris: tuple[str, ...]
    form: str = "files"
    source: str | None = None
    start: int = 0

    @property
    def index(self) -> int:
        return shard_index(self.shard_id)

    def part(self, lo: int, hi: int) -> "Shard":
        """A contiguous slice of this shard (for isolating images that kill workers)."""
        return replace(self, uris=self.uris[lo:hi], start=self.start + lo)

    def halves(self) -> list["Shard"]:
        mid = len(self.uris) // 2
        return [self.part(0, mid), self.part(mid, len(self.uris))]


def shard_id(index: int) -> str:
    return f"shard-{index:06d}"


def shard_index(sid: str) -> int:
    return int(sid.rsplit("-", 1)[1])


def chunk_shards(chunk: int) -> int:
    """How many shards plan chunk `chunk` holds (the last one may hold fewer)."""
    return min(FIRST_CHUNK_SHARDS << min(chunk, 20), MAX_CHUNK_SHARDS)


def _update(h, shard: Shard) -> None:
    h.update(shard.shard_id.encode())
    if shard.form != "files":
        h.update(f"\0{shard.form}\0{shard.source}\0{shard.start}".encode())
    for uri in shard.uris:
        h.update(b"\0" + uri.encode())
    h.update(b"\n")


def plan_fingerprint(shards: Iterable[Shard]) -> str:
    """sha256 over shard ids and their URIs: equal fingerprints mean the same plan."""
    h = hashlib.sha256()
    for shard in shards:
        _update(h, shard)
    return h.hexdigest()


def plan_shards(uris: list[str], shard_size: int) -> list[Shard]:
    """Fixed-size shards of the sorted URIs (a whole listing in memory: tests and small inputs)."""
    return list(cut_shards(iter(sorted(uris)), shard_size))


def cut_shards(uris: Iterator[str], shard_size: int) -> Iterator[Shard]:
    index, batch = 0, []
    for uri in uris:
        batch.append(uri)
        if len(batch) == shard_size:
            yield Shard(shard_id(index), tuple(batch))
            index, batch = index + 1, []
    if batch:
        yield Shard(shard_id(index), tuple(batch))


@dataclass
class Chunk:
    """A run of consecutive shards, stored and fingerprinted together."""

    index: int
    shards: list[Shard]
    sha: str

    @property
    def first_shard(self) -> int:
        return self.shards[0].index

    @property
    def items(self) -> int:
        return sum(len(s.uris) for s in self.shards)


def chunked(shards: Iterator[Shard]) -> Iterator[Chunk]:
    """Group consecutive shards into chunks of `chunk_shards(i)` shards, each with its fingerprint."""
    index, batch = 0, []
    for shard in shards:
        batch.append(shard)
        if len(batch) == chunk_shards(index):
            yield Chunk(index, batch, plan_fingerprint(batch))
            index, batch = index + 1, []
    if batch:
        yield Chunk(index, batch, plan_fingerprint(batch))


@dataclass
class PlanStream:
    """The input as a stream of shards, with what the listing saw. `form` is decided before the first
    shard is yielded (see `plan_input`)."""

    form: str
    shards: Iterator[Shard]
    stats: ListingStats = field(default_factory=ListingStats)


def plan_input(url: str, *, form: str, extensions: tuple[str, ...], shard_size: int,
               image_column: str | None = None, id_column: str | None = None,
               storage_options: dict | None = None) -> PlanStream:
    """The input's shards, streamed, for any input form. `auto` is Parquet when an image column is named,
    tar when the input lists tar files, else files. Raises InputError before returning when the input
    does not exist or holds nothing to process."""
    from .containers import parquet_ranges

    stats = ListingStats()
    if form == "auto" and image_column:
        form = "parquet"
    if form == "parquet":
        files = list(iter_input(url, (".parquet",), storage_options, manifests=False, stats=stats))
        if not files:
            raise InputError(f"no .parquet files found at {url!r} (--image-column reads Parquet input)")
        ranges = parquet_ranges(files, image_column, id_column, shard_size, storage_options)
        shards = (Shard(shard_id(i), ids, form="parquet", source=src, start=start)
                  for i, (src, start, ids) in enumerate(ranges))
        return _peeked(PlanStream("parquet", shards, stats), url, extensions)
    if form == "files":
        images = iter_input(url, extensions, storage_options, stats=stats)
        return _peeked(PlanStream("files", cut_shards(images, shard_size), stats), url, extensions)
    listed = iter_input(url, (extensions + (".tar",)) if extensions else (), storage_options, stats=stats)
    first = next(listed, None)
    listed = itertools.chain([first], listed) if first is not None else iter(())
    if form == "auto" and not (first or "").lower().endswith(".tar"):
        images = _one_kind(listed, url, stats, tar=False, strict=True)
        return _peeked(PlanStream("files", cut_shards(images, shard_size), stats), url, extensions)
    # tar: each tar is one shard; with --input-format tar, images beside the tars are skipped
    tars = _one_kind(listed, url, stats, tar=True, strict=form == "auto")
    shards = (Shard(shard_id(i), (u,), form="tar", source=u) for i, u in enumerate(tars))
    return _peeked(PlanStream("tar", shards, stats), url, extensions + (".tar",), what="no .tar files")


def _one_kind(uris: Iterator[str], url: str, stats: ListingStats, *, tar: bool, strict: bool) -> Iterator[str]:
    """Tars or images: with `strict` (auto-detected form) a listing that mixes them is refused when the
    other kind first shows; else the other kind is skipped."""
    for u in uris:
        if u.lower().endswith(".tar") == tar:
            yield u
        elif strict:
            raise InputError(
                f"input {url!r} holds both tar files and images (e.g. {u!r}): pass --input-format tar or "
                "files (or a glob that selects one kind)")
        else:
            stats.skip(u)


def _peeked(stream: PlanStream, url: str, extensions: tuple[str, ...], what: str = "no images") -> PlanStream:
    """Pull the first shard now, so that an empty or unreadable input is refused before anything runs."""
    first = next(stream.shards, None)
    if first is None:
        hint = f" ({stream.stats.skipped} files skipped for their extension)" if stream.stats.skipped else ""
        raise InputError(f"{what} found at {url!r}{hint}; accepted: {', '.join(extensions)}")
    stream.shards = itertools.chain([first], stream.shards)
    return stream
