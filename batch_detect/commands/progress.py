"""Progress on the driver: a redrawn line on a terminal; otherwise (Ray job logs, Kubernetes, CI) a plain
line at the first shard, then one a minute, and one at the end: a day-long job logs ~1,400 lines, not
one per shard."""

from __future__ import annotations

import sys
import time

from ..outage import OUTAGE


class Progress:
    def __init__(self, total_images: int | None, total_shards: int | None, stream=None, interval_s: float = 60.0,
                 done_images: int = 0, done_shards: int = 0, listing=None):
        # Totals are None until the listing ends (it runs alongside the job); tar input never knows images.
        self.total = total_images
        self.total_shards = total_shards
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval_s
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.failed = self.detections = 0
        self.done, self.shards = done_images, done_shards
        self.base = done_images  # images finished by an earlier attempt: not part of this run's rate
        self.line_open = False  # a terminal bar drawn without its newline yet
        self.listing = listing  # the live ListingStats: keys listed so far and their rate, while it lists

    def listed(self, total_images: int | None, total_shards: int) -> None:
        self.total, self.total_shards = total_images, total_shards
        if self.tty and self.line_open:  # the bar drawn with "?" is redrawn with the totals at once
            self._print(time.perf_counter())

    def update(self, summary: dict) -> None:
        self.done += summary["images"] + summary["failures"]
        self.failed += summary["failures"]
        self.detections += summary["detections"]
        self.shards += 1
        now = time.perf_counter()
        if self.tty or now - self.last_print >= self.interval or self.shards == self.total_shards:
            self.last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.base) / elapsed
        if self.total_shards is None:  # still listing: no total yet
            frac, eta, total = 0.0, float("inf"), "?"
        elif self.total is None:  # tar input: images are counted while streaming, progress is by shard
            frac = self.shards / max(self.total_shards, 1)
            eta = elapsed * (1 - frac) / frac if frac > 0 else float("inf")
            total = "?"
        else:
            frac = self.done / max(self.total, 1)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            total = self.total
        pct = 100.0 * frac
        down = OUTAGE.state().unavailable_s
        paused = f" | store unavailable for {down:.0f} s, retrying" if down is not None else ""
        if self.tty:
            width = 24
            filled = int(width * frac)
            bar = "#" * filled + "-" * (width - filled)
            # counts are of committed shards: a worker logs a failure before its shard commits
            line = (f"\r[{bar}] {self.done}/{total} images committed {pct:5.1f}% | {rate:6.1f} img/s | "
                    f"{self.failed} failed | shards {self.shards}/{self.total_shards or '?'} | ETA {_eta(eta):>6}"
                    + self._listing(" | ") + paused)
            self.stream.write(line)
            self.line_open = True
            if self.shards == self.total_shards:
                self.end_line()
        else:
            self.stream.write(f"progress: {self.done}/{total} images committed ({pct:.1f}%), {rate:.1f} img/s, "
                              f"{self.failed} failed, shards {self.shards}/{self.total_shards or '?'}, "
                              f"ETA {_eta(eta)}{self._listing(', ')}{paused.replace(' |', ';')}\n")
        self.stream.flush()

    def _listing(self, sep: str) -> str:
        """'listing: 2.1M keys, 38k keys/s' while the listing goes on (its rate over the time the run waited
        on it); nothing once it has ended."""
        if self.listing is None or self.total_shards is not None:
            return ""
        rate = self.listing.keys_per_s
        return f"{sep}listing: {_short(self.listing.keys_seen)} keys" + (
            f", {_short(rate)} keys/s" if rate is not None else "")

    def end_line(self) -> None:
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.line_open = False


def _short(n: float) -> str:
    """2,100,000 as 2.1M, 38,412 as 38k: a count read at a glance."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n / size:.0f}{unit}"
    return f"{n:.0f}"


def _eta(seconds: float) -> str:
    return "?" if seconds == float("inf") else f"{seconds:.0f}s"
