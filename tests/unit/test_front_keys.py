"""The front proxy's keys: the keys file, rotation, and the list nginx's workers hold."""

import re

import pytest

from kiln.cli.main import build_parser
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


def test_new_keys_never_start_with_a_dash_which_a_command_line_takes_for_an_option():
    # One key in 64 would, drawn freely: 2,000 of them all without one by chance, 2e-14.
    assert not [k for k in (front.new_key() for _ in range(2000)) if k.startswith("-")]


def test_an_older_key_that_starts_with_a_dash_is_revoked_after_double_dash():
    args = build_parser().parse_args(["keys", "--run-dir", "run", "revoke", "--", "-abc"])
    assert (args.action, args.key, str(args.run_dir)) == ("revoke", "-abc", "run")


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


def test_the_keys_list_holds_each_valid_key_with_its_end_second_and_names_its_content():
    keys = [front.Key(KEY), front.Key(KEY + "x", NOW + 59.2), front.Key(KEY + "y", NOW - 1)]
    text = front.keys_list(keys, now=NOW)
    # A key past its end is left out; an end is rounded up to the second the keys file says.
    body = f"{KEY} -\n{KEY}x {int(NOW) + 60}\n"
    assert text == f"# {front.generation(text)}\n{body}"
    assert re.fullmatch(r"[0-9a-f]{16}", front.generation(text))
    assert front.generation(front.keys_list(keys[:1], now=NOW)) != front.generation(text)
    assert front.keys_list(list(reversed(keys[:2])), now=NOW) != text  # the order is kept


def test_written_keys_files_are_private(tmp_path):
    path = tmp_path / "keys"
    front.write_keys(path, [front.Key(KEY)])
    assert path.stat().st_mode & 0o777 == 0o600
    assert front.read_keys(path) == [front.Key(KEY)]
