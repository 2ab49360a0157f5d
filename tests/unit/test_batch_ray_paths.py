"""--via ray hands Ray absolute paths: its workers run in a folder of their own."""

from pathlib import Path

import numpy as np

from kiln.batch.chunks import Chunk
from kiln.batch.ray_job import absolute_paths


def test_image_paths_are_named_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chunk = Chunk(3, ["a.png", "sub/b.png"], paths=[Path("in/a.png"), Path("in/sub/b.png")])
    sent = absolute_paths(chunk)
    assert sent.paths == [tmp_path / "in" / "a.png", tmp_path / "in" / "sub" / "b.png"]
    assert (sent.index, sent.ids, sent.errors) == (3, chunk.ids, [None, None])
    assert chunk.paths == [Path("in/a.png"), Path("in/sub/b.png")]  # the caller's, unchanged


def test_image_cells_of_instances_are_named_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"image": Path("pics/1.png"), "text": [1, 2]}, None,
            {"image": {"b64": "AAAA"}, "text": [3]}, {"image": Path("/abs/2.png"), "text": []}]
    chunk = Chunk(0, ["0", "1", "2", "3"], instances=rows,
                  errors=[None, "column 'image' is empty", None, None])
    sent = absolute_paths(chunk)
    assert sent.instances == [{"image": tmp_path / "pics" / "1.png", "text": [1, 2]}, None,
                              {"image": {"b64": "AAAA"}, "text": [3]},
                              {"image": Path("/abs/2.png"), "text": []}]
    assert sent.errors == chunk.errors


def test_rows_of_values_go_as_they_are():
    values = np.arange(6.0).reshape(2, 3)
    sent = absolute_paths(Chunk(1, ["0", "1"], values=values))
    assert sent.values is values and sent.paths is None and sent.instances is None
