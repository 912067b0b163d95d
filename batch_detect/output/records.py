"""What an output's tables say of each image's latest processing: the failures that a `--retry-failures`
run takes again, and how many of each type `status` and `report` call retryable.

An image's latest record is the one with the highest `run_id` in `images` or `failures` (the README's
current-rows query). Failures are few and read whole; `images` is read only where a row group's
statistics say it may hold a run later than the earliest failure, so an output with one run reads no
image rows at all.
"""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq

from ..errors import STAGES


def kind_matches(kind: str, want: str | None) -> bool:
    """`want`: None (any failure), a stage (`read`) or a stage and type (`read/read_error`)."""
    return want is None or kind == want or kind.split("/", 1)[0] == want


def latest_failures(store, want: str | None = None) -> dict[str, str]:
    """{uri: "stage/error_type"} of the images whose latest record is a failure of the kind `want`."""
    latest: dict[str, tuple[int, str]] = {}
    for path in store.part_files("failures"):
        with store.fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=["uri", "run_id", "stage", "error_type"])
        for uri, run, stage, error_type in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            seen = latest.get(uri)
            if seen is None or run > seen[0]:
                latest[uri] = (run, f"{stage}/{error_type}")
    if latest:
        _drop_processed_later(store, latest)
    return {uri: kind for uri, (_, kind) in latest.items() if kind_matches(kind, want)}


def _drop_processed_later(store, latest: dict[str, tuple[int, str]]) -> None:
    earliest = min(run for run, _ in latest.values())
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
                    seen = latest.get(uri)
                    if seen is not None and run > seen[0]:
                        del latest[uri]


def retryable_by_type(store) -> dict[str, int]:
    """{"stage/error_type": images whose latest record is such a failure}: what `--retry-failures` would take."""
    return dict(sorted(Counter(latest_failures(store).values()).items()))


def check_retry_kind(want: str) -> str | None:
    """Why `want` is no failure kind (None when it is one)."""
    stage = want.split("/", 1)[0]
    if stage not in STAGES:
        return f"its stage {stage!r} is not one of {', '.join(STAGES)}"
    return None
