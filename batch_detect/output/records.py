"""What an output's tables say of each image's latest processing: the failures that a `--retry-failures`
run takes again, and how many of each type `status` and `report` call retryable.

An image's latest record is the one with the highest `run_id` in `images` or `failures` (the README's
current-rows query). Records are sorted, not held (a billion-image output may hold millions of
failures); `images` is read only where a row group's statistics say it may hold a run later than the
earliest failure, so an output with one run reads no image rows at all.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from ..errors import STAGES
from ..inputs.extsort import sorted_unique


def kind_matches(kind: str, want: str | None) -> bool:
    """`want`: None (any failure), a stage (`read`) or a stage and type (`read/read_error`)."""
    return want is None or kind == want or kind.split("/", 1)[0] == want


_AFTER_EVERY_RUN = "9" * 12  # a run number above any: "planned by the run being resumed" is latest


def iter_latest_failures(store, want: str | None = None, planned: Iterable[str] = ()) -> Iterator[tuple[str, str]]:
    """(uri, "stage/error_type") of the images whose latest record is a failure of the kind `want`, in URI
    order; `planned`: URIs a resumed retry run has planned already (their latest record is that run's).
    Memory stays bounded however many failures an output holds: every record is one string
    `uri NUL run NUL what`, sorted by `extsort` (spilled to local disk past a run of them), and an image's
    records come together, its latest last."""
    records = itertools.chain(_records(store), (f"{uri}\0{_AFTER_EVERY_RUN}\0P" for uri in planned))
    for uri, group in itertools.groupby(sorted_unique(records), key=lambda record: record.split("\0", 1)[0]):
        *_, latest = group
        what = latest.rsplit("\0", 1)[1]
        if what.startswith("F") and kind_matches(what[1:], want):
            yield uri, what[1:]


def _records(store) -> Iterator[str]:
    """Every failure record, then the image records that may be later than one (a row group whose
    statistics say all its runs are at or before the earliest failure is not read)."""
    earliest = None
    for path in store.part_files("failures"):
        with store.fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=["uri", "run_id", "stage", "error_type"])
        for uri, run, stage, error_type in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            earliest = run if earliest is None else min(earliest, run)
            yield f"{uri}\0{run:012d}\0F{stage}/{error_type}"
    if earliest is None:
        return
    for path in store.part_files("images"):
        with store.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            run_col = pf.schema_arrow.get_field_index("run_id")
            for rg in range(pf.num_row_groups):
                stats = pf.metadata.row_group(rg).column(run_col).statistics
                if stats is not None and stats.has_min_max and stats.max <= earliest:
                    continue  # no run here is later than any failure
                table = pf.read_row_group(rg, columns=["uri", "run_id"])
                for uri, run in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
                    if run > earliest:
                        yield f"{uri}\0{run:012d}\0A"  # 'A' < 'F': a failure of the same run is the latest


def retryable_by_type(store) -> dict[str, int]:
    """{"stage/error_type": images whose latest record is such a failure}: what `--retry-failures` would take."""
    return dict(sorted(Counter(kind for _, kind in iter_latest_failures(store)).items()))


def check_retry_kind(want: str) -> str | None:
    """Why `want` is no failure kind (None when it is one)."""
    stage = want.split("/", 1)[0]
    if stage not in STAGES:
        return f"its stage {stage!r} is not one of {', '.join(STAGES)}"
    return None
