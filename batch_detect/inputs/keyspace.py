"""Cut points for listing one flat prefix side by side: where the keys after a page probably lie.

S3 lists a prefix one page after another (a page names the next), so a flat prefix of 100M keys is
100,000 requests in a row however many CPUs wait. Any key can start a listing, though (StartAfter): cut the
rest of the prefix into ranges and list them at once. The cuts are guesses from the page in hand, read as
numbers: the positions where its first and last names differ, with the characters seen there as the
digits (`img_000000`..`img_000999`: decimal from the first '0'; uuid or hash names: hexadecimal).
Extrapolated, those give cuts that hold a chosen number of keys if the names go on as they began.

A guess never changes what is listed, only how fast: ranges are contiguous, each key falls in exactly one,
and a cut always sorts after the name it is cut from. Where the names do not go on as they began, a range
is just longer (listed page by page) or shorter (one cheap request); the last range, open-ended, is cut
again from its own first page.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["KeySpace"]

VARYING = 8  # positions from the first difference on, at most, that vary on the page
WIDTH = 12  # positions in the number, at most, with the unvarying ones of the same digits to their left


@dataclass(frozen=True)
class KeySpace:
    """Names read as numbers: `head` (the part a page's names share before the number), then `width`
    positions of digits `alphabet` (sorted). `density` is names per unit of that number on the page it
    was read from."""

    head: str
    alphabet: str
    width: int
    density: float

    @classmethod
    def of(cls, names: Sequence[str]) -> "KeySpace | None":
        """The space a sorted page of names suggests, or None where it suggests none (fewer than two
        names, one digit)."""
        if len(names) < 2 or names[0] >= names[-1]:
            return None
        first, last = names[0], names[-1]
        i = next((j for j, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
        end = i
        while end < i + VARYING and len({n[end] if end < len(n) else "" for n in names}) > 1:
            end += 1
        digits = sorted({n[j] for n in names for j in range(i, end) if j < len(n)})
        if len(digits) < 2:
            return None
        member = set(digits)
        start = i
        while start > 0 and end - start < WIDTH and last[start - 1] in member:
            start -= 1  # leading zeros and the like: the number may carry into them
        space = cls(last[:start], "".join(digits), min(end, start + WIDTH) - start, 0.0)
        span = space.number(last) - space.number(first)
        if span <= 0:
            return None
        return cls(space.head, space.alphabet, space.width, (len(names) - 1) / span)

    def number(self, name: str) -> float:
        """`name` as a number of this space (monotone in the name's sort order, up to `width` positions;
        -inf / inf for names outside the space, before or after it). A character between digits counts as
        halfway; a name that ends counts as below every digit."""
        if not name.startswith(self.head):
            return -math.inf if name < self.head else math.inf
        base, value = len(self.alphabet), 0.0
        rest = name[len(self.head):]
        for j in range(self.width):
            if j < len(rest):
                c = rest[j]
                k = bisect.bisect_left(self.alphabet, c)
                digit = k if k < base and self.alphabet[k] == c else k - 0.5
            else:
                digit = -0.5
            value += digit * base ** (self.width - 1 - j)
            if j >= len(rest):
                break
        return value

    def name(self, number: int) -> str | None:
        """The name of this space whose number is `number` (digits only, full width); None beyond it."""
        base = len(self.alphabet)
        if number < 0 or number >= base ** self.width:
            return None
        digits = []
        for _ in range(self.width):
            number, d = divmod(number, base)
            digits.append(self.alphabet[d])
        return self.head + "".join(reversed(digits))

    def cut_after(self, name: str, keys: int) -> str | None:
        """A name after `name` such that about `keys` names lie between them if the names go on as the page
        did; None where the space cannot say (`name` outside it, or no room left in it)."""
        at = self.number(name)
        if not math.isfinite(at):
            return None
        step = max(1, math.ceil(keys / self.density))
        n = math.floor(at) + step
        for _ in range(len(self.alphabet) + 1):  # a name with characters between digits: step past it
            cut = self.name(n)
            if cut is None:
                return None
            if cut > name:
                return cut
            n += 1
        return None
