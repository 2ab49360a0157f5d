"""The front proxy's keys: the keys file, rotation, and the nginx map that enforces their end."""

import random
import re

import pytest

from kiln.deploy import front
from kiln.keys import KEY_CHARS

KEY = "Abc+def/ghi.jkl_mno-pq="  # 23 characters, every kind of punctuation a key may hold
NOW = 1_796_180_000.0  # 2026-12-02


def test_keys_file_comments_blank_lines_duplicates_and_ends():
    text = (f"# rotated 2026-11\n\n{KEY} expires=2026-12-02T10:00:00Z\n  {KEY}  # again\n"
            f"{KEY}x\n")
    assert front.parse_keys(text, now=NOW) == [
        front.Key(KEY, 1_796_205_600.0), front.Key(KEY + "x")]


@pytest.mark.parametrize("text, message", [
    ("short\n", "too short"),
    ('has"quote' + "x" * 22 + "\n", "may hold only"),
    ("# nothing\n\n", "holds no key"),
    (f"{KEY} expires=tomorrow\n", "is not a time"),
    (f"{KEY} expires=2026-12-02T10:00:00\n", "no time zone"),
    (f"{KEY} until=2026-12-02T10:00:00Z\n", "only expires="),
    (f"{KEY} expires=2026-12-01T10:00:00Z\n", "every key in the keys file has expired"),
])
def test_bad_keys_files_are_refused(text, message):
    with pytest.raises(front.KeysError, match=message):
        front.parse_keys(text, now=NOW)


def test_a_key_line_reads_back_as_the_same_key():
    keys = [front.Key(KEY, NOW + 90), front.Key(KEY + "x")]
    assert front.parse_keys(front.format_keys(keys), now=NOW) == keys


def test_new_keys_hold_256_random_bits_and_pass_the_file_rules():
    keys = {front.new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k) == 43 and KEY_CHARS.fullmatch(k) for k in keys)


def test_rotation_adds_a_key_and_ends_the_others_after_the_overlap():
    old, ending, gone = front.Key(KEY), front.Key(KEY + "a", NOW + 10), front.Key(KEY + "b", NOW)
    keys = front.rotate([old, ending, gone], NOW, overlap_s=60)
    assert keys[:2] == [front.Key(KEY, NOW + 60), front.Key(KEY + "a", NOW + 10)]
    assert keys[2].expires is None and keys[2].value not in (KEY, KEY + "a")
    assert front.current(keys, NOW + 30) == keys[2]
    lived = front.rotate(keys, NOW, overlap_s=20, lifetime_s=60)
    assert lived[-1].expires == NOW + 60 and lived[-2].expires == NOW + 20
    with pytest.raises(ValueError, match="longer than"):
        front.rotate(keys, NOW, overlap_s=60, lifetime_s=60)


def test_the_current_key_is_the_newest_valid_one():
    keys = [front.Key(KEY), front.Key(KEY + "x", NOW + 5)]
    assert front.current(keys, NOW).value == KEY + "x"
    assert front.current(keys, NOW + 5).value == KEY
    assert front.current([front.Key(KEY, NOW)], NOW) is None


@pytest.mark.parametrize("limit", [1_796_180_000, 1_000_000_000, 9_999_999_999, 1, 10, 0,
                                   1_796_189_999])
def test_below_matches_exactly_the_numbers_under_the_limit(limit):
    pattern = re.compile(front.below(limit) + "$")
    rng = random.Random(limit)
    near = [limit + d for d in range(-1200, 1200)]
    far = [rng.randrange(0, 10**10) for _ in range(3000)]
    for n in near + far + [0, 10**10 - 1]:
        if 0 <= n < 10**10:
            assert bool(pattern.match(f"{n:010d}")) == (n < limit), n


def test_keys_map_matches_the_key_exactly_and_before_its_end_only():
    lines = front.keys_map([front.Key(KEY), front.Key(KEY + "x", NOW + 60),
                            front.Key(KEY + "y", NOW - 1)], now=NOW).splitlines()
    assert len(lines) == 2  # a key past its end is left out
    forever, ending = (re.compile(line.split('"')[1][1:]) for line in lines)
    at = f"{NOW + 59:.3f}"
    assert forever.match(f"Bearer {KEY} {at}") and forever.match(f"bearer {KEY} {at}")
    for wrong in (KEY.lower(), KEY + "x", KEY[:-1], f"{KEY} 1.5"):
        assert not forever.match(f"Bearer {wrong} {at}")
    assert ending.match(f"Bearer {KEY}x {at}")
    assert not ending.match(f"Bearer {KEY}x {NOW + 60:.3f}")
    assert not ending.match(f"Bearer {KEY}x {NOW + 3600:.3f}")


def test_written_keys_files_are_private(tmp_path):
    path = tmp_path / "keys"
    front.write_keys(path, [front.Key(KEY)])
    assert path.stat().st_mode & 0o777 == 0o600
    assert front.read_keys(path) == [front.Key(KEY)]
