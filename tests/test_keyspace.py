"""keyspace.py: cut points for listing a flat prefix in ranges. A cut must sort after the name it is cut from
(else a range could repeat or skip keys); how many keys a range holds is only a guess, checked here where
names go on as they began."""

from __future__ import annotations

import bisect
import random
import uuid

import pytest

from batch_detect.inputs.keyspace import KeySpace


def test_sequential_names_are_read_as_decimal_and_cut_where_the_count_says():
    names = [f"img_{i:07d}.jpg" for i in range(100_000)]
    space = KeySpace.of(names[:1000])
    assert space.head == "img_" and space.alphabet == "0123456789"
    cut = space.cut_after(names[999], 16_000)
    assert abs(bisect.bisect(names, cut) - 1000 - 16_000) <= 1  # the keys asked for (the cut is a prefix of one)


def test_uuid_names_are_read_as_hex_and_ranges_hold_about_what_was_asked():
    rng = random.Random(3)
    names = sorted(f"{uuid.UUID(int=rng.getrandbits(128), version=4)}.jpg" for _ in range(200_000))
    space = KeySpace.of(names[:1000])
    assert set(space.alphabet) >= set("0123456789abcdef")
    held, at = [], names[999]
    for _ in range(10):
        cut = space.cut_after(at, 16_000)
        held.append(bisect.bisect(names, cut) - bisect.bisect(names, at))
        at = cut
    assert 8_000 <= sorted(held)[5] <= 32_000, held  # random names: within 2x of the ask


@pytest.mark.parametrize("seed", range(30))
def test_a_cut_always_sorts_after_the_name_it_is_cut_from(seed):
    """Any names at all (characters between and beyond the digits seen, names that end early, unicode): a cut
    is None or strictly after, and cuts from cuts keep increasing."""
    rng = random.Random(seed)
    alphabet = rng.choice(["01", "0123456789", "ab-. /é日", "xyz_0", "".join(chr(c) for c in range(32, 127))])
    names = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(300)})
    space = KeySpace.of(names)
    if space is None:
        return
    probes = names + ["".join(rng.choice(alphabet + "~é\x7f") for _ in range(rng.randint(0, 14))) for _ in range(300)]
    for name in probes:
        cut = space.cut_after(name, rng.choice([1, 10, 1000]))
        assert cut is None or cut > name, (name, cut)
    at = names[-1]
    for _ in range(50):
        cut = space.cut_after(at, 5)
        if cut is None:
            break
        assert cut > at
        at = cut


def test_no_space_from_too_little():
    assert KeySpace.of(["a"]) is None
    assert KeySpace.of(["a", "a"]) is None
    assert KeySpace.of(["a", "aa", "aaa"]) is None  # one digit: no number to read
