"""How many reads a worker keeps in flight ahead of its interpreter, sized from what it measures.

A store across a network answers each read after a latency that no amount of CPU removes; the only way
to hide it is to have enough reads outstanding. By Little's law that is latency × the rate the interpreter
takes images, so a worker measures both (moving averages over the images it has seen, kept from shard to
shard) and keeps ceil(latency / interpreter time per image) + 1 images ahead of the interpreter, never
fewer than its decode window: the window alone on a local disk, tens on a slow bucket. The bytes those reads hold are capped by a budget, so large files do not
turn read-ahead into a memory problem; decoded images are bounded separately (the decode window).
"""

from __future__ import annotations

import math

MIB = 1024 * 1024
MAX_READS = 32  # reads in flight per worker, at most (a store under load answers slower: no runaway)
BYTES_BUDGET = 32 * MIB  # bytes of undecoded files held per worker, at most (counted in the actor's memory)
START = 4  # before anything is measured


class ReadAhead:
    """Images to keep ahead of the interpreter (being read or decoded): fixed (`fixed` > 0, `--read-ahead N`)
    or sized from the measurements. The caller keeps at least its decode window ahead whatever this says."""

    def __init__(self, fixed: int = 0, smoothing: float = 0.2):
        self.fixed = fixed
        self.alpha = smoothing
        self.latency_s: float | None = None  # one read, wall time (waiting on the store included)
        self.busy_s: float | None = None  # the interpreter's time per image (invoke, outputs, rows)
        self.bytes: float | None = None  # one file's size
        self.peak = 0

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def read_done(self, seconds: float, nbytes: int) -> None:
        self.latency_s = self._mix(self.latency_s, seconds)
        self.bytes = self._mix(self.bytes, float(nbytes))

    def images_done(self, seconds: float, images: int) -> None:
        if images:
            self.busy_s = self._mix(self.busy_s, seconds / images)

    @property
    def reads(self) -> int:
        if self.fixed:
            n = self.fixed
        elif self.latency_s is None or self.busy_s is None:
            n = START
        else:
            n = math.ceil(self.latency_s / max(self.busy_s, 1e-4)) + 1
        # The caps hold for a fixed count too: the actor's memory reservation counts on them.
        if self.bytes:
            n = min(n, max(1, int(BYTES_BUDGET // max(self.bytes, 1.0))))
        n = max(1, min(n, MAX_READS))
        self.peak = max(self.peak, n)
        return n
