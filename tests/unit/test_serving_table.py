"""`kiln tune --write-declaration` rewrites a declaration's [serving] table and nothing else."""

import tomllib
from pathlib import Path

import pytest

from kiln.loadtests.serving_table import TableError, rewrite, rewrite_text

BUILTIN = Path(__file__).resolve().parents[2] / "training" / "models"
PICK = {"workers": 2, "batch_size": 16, "max_batch_delay_ms": 5}

WITH_TABLE = """\
# my model
version = "1.0"

[model]
file = "m.py"

[serving]                 # tuned on the build box
batch_size = 8            # measured
# workers = 1
response_timeout_s = 60

[[examples]]
file = "x.json"   # [serving] in a comment is no header
"""


def test_an_existing_table_keeps_its_comments_and_other_keys():
    new = rewrite_text(WITH_TABLE, PICK)
    assert new == WITH_TABLE.replace(
        "batch_size = 8            # measured\n# workers = 1\nresponse_timeout_s = 60\n",
        "batch_size = 16            # measured\n# workers = 1\nresponse_timeout_s = 60\n"
        "workers = 2\nmax_batch_delay_ms = 5\n")
    parsed = tomllib.loads(new)
    assert parsed["serving"] == {**PICK, "response_timeout_s": 60}
    assert {k: v for k, v in parsed.items() if k != "serving"} == {
        k: v for k, v in tomllib.loads(WITH_TABLE).items() if k != "serving"}


def test_a_missing_table_is_added_at_the_end():
    text = 'version = "1.0"\n\n[model]\nfile = "m.py"'  # no final newline either
    new = rewrite_text(text, PICK)
    assert new == text + "\n\n[serving]\nworkers = 2\nbatch_size = 16\nmax_batch_delay_ms = 5\n"
    assert tomllib.loads(new)["serving"] == PICK


def test_a_table_at_the_end_of_the_file():
    new = rewrite_text('[model]\nfile = "m.py"\n\n[serving]\nworkers = 1\n\n', PICK)
    assert new == ('[model]\nfile = "m.py"\n\n[serving]\nworkers = 2\nbatch_size = 16\n'
                   "max_batch_delay_ms = 5\n\n")


def test_rewriting_again_changes_nothing():
    once = rewrite_text(WITH_TABLE, PICK)
    assert rewrite_text(once, PICK) == once


@pytest.mark.parametrize("text", ["serving.workers = 1\n", "serving = {workers = 1}\n"])
def test_serving_written_otherwise_is_refused(text):
    with pytest.raises(TableError, match="as a \\[serving\\] table first"):
        rewrite_text(text, PICK)


def test_a_rewrite_that_would_change_more_is_refused():
    # A key written quoted is not recognised: adding it again would break the file.
    with pytest.raises(TableError, match="by hand"):
        rewrite_text('[serving]\n"workers" = 1\n', PICK)


@pytest.mark.parametrize("name", ["lenet", "binary", "mlp", "rnn"])
def test_kiln_s_own_declarations_round_trip(tmp_path, name):
    path = tmp_path / f"{name}.toml"
    original = (BUILTIN / f"{name}.toml").read_text()
    path.write_text(original)
    rewrite(path, PICK)
    before, after = tomllib.loads(original), tomllib.loads(path.read_text())
    assert after == {**before, "serving": {**before.get("serving", {}), **PICK}}
    assert path.read_text().startswith(original.rstrip("\n"))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
