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
from typing import Callable, Iterable, Iterator

from ..errors import InputError
from .listing import ListingStats, iter_input, iter_listed

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
    versions: tuple[str | None, ...] | None = None  # each URI's version when listed (see walk.version_of)
    run: int = 1  # the run of the output that planned it (the `run_id` of its rows)

    @property
    def index(self) -> int:
        return shard_index(self.shard_id)

    def part(self, lo: int, hi: int) -> "Shard":
        """A contiguous slice of this shard (for isolating images that kill workers)."""
        return replace(self, uris=self.uris[lo:hi], start=self.start + lo,
                       versions=None if self.versions is None else self.versions[lo:hi])

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
    """sha256 over shard ids and their URIs: equal fingerprints mean the same plan. Versions are left
    out: a plain re-run resumes over objects rewritten since (`--incremental` is what compares them)."""
    h = hashlib.sha256()
    for shard in shards:
        _update(h, shard)
    return h.hexdigest()


def plan_shards(uris: list[str], shard_size: int) -> list[Shard]:
    """Fixed-size shards of the sorted URIs (a whole listing in memory: tests and small inputs)."""
    return list(cut_shards(((u, None) for u in sorted(uris)), shard_size))


def cut_shards(listed: Iterator[tuple[str, str | None]], shard_size: int, *, first: int = 0,
               run: int = 1) -> Iterator[Shard]:
    """Shards of `shard_size` (uri, version) pairs, numbered from `first`."""
    index = first
    while batch := list(itertools.islice(listed, shard_size)):
        uris, versions = zip(*batch)
        yield Shard(shard_id(index), uris, versions=versions, run=run)
        index += 1


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


def chunked(shards: Iterator[Shard], first: int = 0) -> Iterator[Chunk]:
    """Group consecutive shards into chunks numbered from `first`, each with its fingerprint. A run's
    i-th chunk holds `chunk_shards(i)` shards: every run starts with a small one."""
    local, batch = 0, []
    for shard in shards:
        batch.append(shard)
        if len(batch) == chunk_shards(local):
            yield Chunk(first + local, batch, plan_fingerprint(batch))
            local, batch = local + 1, []
    if batch:
        yield Chunk(first + local, batch, plan_fingerprint(batch))


@dataclass
class PlanStream:
    """The input as a stream of shards, with what the listing saw. `form` is decided before the first
    shard is yielded (see `plan_input`)."""

    form: str
    shards: Iterator[Shard]
    stats: ListingStats = field(default_factory=ListingStats)


Listed = tuple[str, "str | None"]  # (uri, version)


def plan_input(url: str, *, form: str, extensions: tuple[str, ...], shard_size: int,
               image_column: str | None = None, id_column: str | None = None,
               storage_options: dict | None = None,
               select: Callable[[Iterator[Listed]], Iterator[Listed]] | None = None,
               first_shard: int = 0, run: int = 1, inventory_prefix: str | None = None,
               listing_processes: int | None = 1) -> PlanStream:
    """The input's shards, streamed, for any input form. `auto` is Parquet when an image column is named,
    tar when the input lists tar files, else files. Raises InputError before returning when the input
    does not exist or holds nothing to process.

    `select` (files and tar input) picks which listed objects to plan (an incremental run's new ones);
    shards are then numbered from `first_shard` and belong to run `run`. `inventory_prefix`: the keys
    of an S3 Inventory input to plan. `listing_processes`: see `listing.iter_listed` (files and tar input)."""
    from .containers import parquet_ranges

    stats = ListingStats()
    if form == "auto" and image_column:
        form = "parquet"
    if form == "parquet":
        if select is not None:
            raise InputError("--incremental reads image files and tar files, not Parquet image columns (yet): "
                             "give new Parquet files their own --output, or re-run with --overwrite")
        files = list(iter_input(url, (".parquet",), storage_options, manifests=False, stats=stats))
        if not files:
            raise InputError(f"no .parquet files found at {url!r} (--image-column reads Parquet input)")
        ranges = parquet_ranges(files, image_column, id_column, shard_size, storage_options)
        shards = (Shard(shard_id(i), ids, form="parquet", source=src, start=start)
                  for i, (src, start, ids) in enumerate(ranges))
        return _peeked(PlanStream("parquet", shards, stats), url, extensions)
    keep = select or (lambda listed: listed)
    if form == "files":
        images = _first_or_refuse(iter_listed(url, extensions, storage_options, stats=stats,
                                              inventory_prefix=inventory_prefix, processes=listing_processes),
                                  url, extensions, stats)
        return PlanStream("files", cut_shards(keep(images), shard_size, first=first_shard, run=run), stats)
    listed = iter_listed(url, (extensions + (".tar",)) if extensions else (), storage_options, stats=stats,
                         inventory_prefix=inventory_prefix, processes=listing_processes)
    first = next(listed, None)
    listed = itertools.chain([first], listed) if first is not None else iter(())
    if form == "auto" and not (first or ("",))[0].lower().endswith(".tar"):
        images = _first_or_refuse(_one_kind(listed, url, stats, tar=False, strict=True), url, extensions, stats)
        return PlanStream("files", cut_shards(keep(images), shard_size, first=first_shard, run=run), stats)
    # tar: each tar is one shard; with --input-format tar, images beside the tars are skipped
    tars = _first_or_refuse(_one_kind(listed, url, stats, tar=True, strict=form == "auto"), url,
                            extensions + (".tar",), stats, what="no .tar files")
    shards = (Shard(shard_id(first_shard + i), (u,), form="tar", source=u, versions=(v,), run=run)
              for i, (u, v) in enumerate(keep(tars)))
    return PlanStream("tar", shards, stats)


def _one_kind(listed: Iterator[Listed], url: str, stats: ListingStats, *, tar: bool,
              strict: bool) -> Iterator[Listed]:
    """Tars or images: with `strict` (auto-detected form) a listing that mixes them is refused when the
    other kind first shows; else the other kind is skipped."""
    for item in listed:
        u = item[0]
        if u.lower().endswith(".tar") == tar:
            yield item
        elif strict:
            raise InputError(
                f"input {url!r} holds both tar files and images (e.g. {u!r}): pass --input-format tar or "
                "files (or a glob that selects one kind)")
        else:
            stats.skip(u)


def _first_or_refuse(listed: Iterator[Listed], url: str, extensions: tuple[str, ...], stats: ListingStats,
                     what: str = "no images") -> Iterator[Listed]:
    """Pull the first object now, so that an empty or unreadable input is refused before anything runs
    (even when an incremental run then finds nothing new in it)."""
    first = next(listed, None)
    if first is None:
        hint = f" ({stats.skipped} files skipped for their extension)" if stats.skipped else ""
        raise InputError(f"{what} found at {url!r}{hint}; accepted: {', '.join(extensions)}")
    return itertools.chain([first], listed)


def _peeked(stream: PlanStream, url: str, extensions: tuple[str, ...], what: str = "no images") -> PlanStream:
    """Pull the first shard now, so that an empty or unreadable input is refused before anything runs."""
    first = next(stream.shards, None)
    if first is None:
        hint = f" ({stream.stats.skipped} files skipped for their extension)" if stream.stats.skipped else ""
        raise InputError(f"{what} found at {url!r}{hint}; accepted: {', '.join(extensions)}")
    stream.shards = itertools.chain([first], stream.shards)
    return stream


def stored_shards(batches: Iterable, form: str, run: int) -> Iterator[Shard]:
    """Shards rebuilt from stored plan rows (record batches of shard_id, uri, version, in plan order):
    what a resumed incremental run still has to do of its own plan."""
    current, uris, versions = None, [], []
    for batch in batches:
        cols = batch.to_pydict()
        for sid, uri, version in zip(cols["shard_id"], cols["uri"], cols["version"]):
            if sid != current:
                if current is not None:
                    yield _rebuilt(current, uris, versions, form, run)
                current, uris, versions = sid, [], []
            uris.append(uri)
            versions.append(version)
    if current is not None:
        yield _rebuilt(current, uris, versions, form, run)


def _rebuilt(sid: str, uris: list[str], versions: list, form: str, run: int) -> Shard:
    return Shard(sid, tuple(uris), form=form, source=uris[0] if form == "tar" else None, versions=tuple(versions),
                 run=run)
