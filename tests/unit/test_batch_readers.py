"""batch.readers: every input row comes out once, with a stable id, and a bad row gets an
error instead of a gap."""

import json

import numpy as np
import pytest
from PIL import Image

from kiln.batch.chunks import BatchError
from kiln.batch.readers import open_source


def _rows(source):
    return [(i, c.errors[k], c.values[k] if c.values is not None else c.paths[k])
            for c in source.chunks() for k, i in enumerate(c.ids)]


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8)).save(path)


def test_image_folder_ids_are_relative_posix_paths_sorted_and_recursive(tmp_path, image_signature):
    for rel in ["b.png", "a/z.JPG", "a/c.jpeg", "notes.txt", "a/deeper/d.png"]:
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("not an image")
        else:
            _png(tmp_path / rel)
    source = open_source(tmp_path, image_signature, chunk_size=2)
    ids = [c.ids for c in source.chunks()]
    assert ids == [["a/c.jpeg", "a/deeper/d.png"], ["a/z.JPG", "b.png"]]
    assert source.total == 4


def test_ids_do_not_depend_on_the_chunk_size(tmp_path, features_signature, feature_row):
    names = features_signature["inputs"][0]["names"]
    path = tmp_path / "rows.csv"
    path.write_text(",".join(names) + "\n" + "\n".join(
        ",".join(str(feature_row[n] + i) for n in names) for i in range(7)) + "\n")
    by_three = [r[0] for r in _rows(open_source(path, features_signature, 3))]
    by_five = [r[0] for r in _rows(open_source(path, features_signature, 5))]
    assert by_three == by_five == [str(i) for i in range(7)]


def test_csv_takes_feature_columns_by_name_in_any_order(tmp_path, features_signature,
                                                        feature_row):
    names = features_signature["inputs"][0]["names"]
    header = ["patient"] + names[::-1]
    path = tmp_path / "rows.csv"
    path.write_text(",".join(header) + "\n"
                    + ",".join(["p1"] + [str(feature_row[n]) for n in names[::-1]]) + "\n")
    (row_id, error, values), = _rows(open_source(path, features_signature, 10))
    assert (row_id, error) == ("0", None)
    assert values.tolist() == [feature_row[n] for n in names]


def test_csv_bad_cells_and_short_rows_get_errors(tmp_path, features_signature):
    good = ",".join(["1.5"] * 30)
    path = tmp_path / "rows.csv"
    path.write_text("\n".join([good, ",".join(["1"] * 29 + ["abc"]), ",".join(["2"] * 29),
                               good]) + "\n")
    rows = _rows(open_source(path, features_signature, 10))
    assert [(r[0], r[1]) for r in rows] == [
        ("0", None),
        ("1", "column '29' is not a number: 'abc'"),
        ("2", "row has 29 cells, the header 30"),
        ("3", None),
    ]


def test_csv_with_the_wrong_columns_is_a_clear_error(tmp_path, features_signature):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(BatchError, match="2 columns, expected the 30 feature columns"):
        open_source(path, features_signature, 10)


def test_jsonl_objects_lists_and_bad_lines(tmp_path, features_signature, feature_row):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(feature_row), json.dumps(list(feature_row.values())), "{oops",
             json.dumps({"mean radius": 1})]
    path.write_text("\n".join(lines) + "\n")
    rows = _rows(open_source(path, features_signature, 10))
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0][1] is None and rows[1][1] is None
    assert rows[0][2].tolist() == rows[1][2].tolist() == list(feature_row.values())
    assert rows[2][1] == "not valid JSON: Expecting property name enclosed in double quotes " \
                        "at column 2"
    assert rows[3][1].startswith("expected 30 features, got 1: missing ")


def test_npy_of_flat_pixels(tmp_path, image_signature):
    pixels = np.arange(3 * 784, dtype=np.uint8).reshape(3, 784)
    path = tmp_path / "pixels.npy"
    np.save(path, pixels)
    rows = _rows(open_source(path, image_signature, 2))
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert rows[2][2].shape == (28, 28)
    assert rows[2][2].tolist() == pixels[2].reshape(28, 28).astype(float).tolist()


def test_parquet_with_a_null_cell(tmp_path, features_signature, feature_row):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
    import pyarrow.parquet as pq

    names = features_signature["inputs"][0]["names"]
    columns = {n: [feature_row[n], None if n == "mean area" else 1.0] for n in names}
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table(columns), path)
    rows = _rows(open_source(path, features_signature, 10))
    assert [(r[0], r[1]) for r in rows] == [("0", None), ("1", "column 'mean area' is empty")]
    assert rows[0][2].tolist() == list(feature_row.values())


def test_unknown_suffix(tmp_path, features_signature):
    path = tmp_path / "rows.xlsx"
    path.write_bytes(b"")
    with pytest.raises(BatchError, match="cannot read '.xlsx' files"):
        open_source(path, features_signature, 10)


@pytest.mark.parametrize("header", [True, False])
def test_arrow_blocks_read_exactly_what_the_csv_module_reads(tmp_path, features_signature,
                                                             feature_row, header):
    """Blocks Arrow can parse and blocks it cannot (empty or text cells, NaN, a short row, a
    blank line) give the same ids, values and errors as a file the csv module reads whole."""
    names = features_signature["inputs"][0]["names"]
    good = [",".join(f"{feature_row[n] * (1 + i / 10):.6g}" for n in names) for i in range(9)]
    rows = good[:3] + good[3:6] + [good[6].replace(",", ",x", 1), "", good[7],
                                   "nan" + good[8][good[8].index(","):], good[0] + ",1",
                                   good[1].rsplit(",", 1)[0] + ",", good[2]]
    lines = ([",".join(names)] if header else []) + rows
    fast, slow = tmp_path / "fast.csv", tmp_path / "slow.csv"
    fast.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    # a quoted first cell: lines may no longer be rows, so the whole file goes through csv
    slow.write_text("\n".join(['"' + lines[0].split(",", 1)[0] + '",' +
                               lines[0].split(",", 1)[1], *lines[1:]]) + "\n")
    got, want = (_rows(open_source(p, features_signature, chunk_size=3)) for p in (fast, slow))
    assert [(i, e) for i, e, _ in got] == [(i, e) for i, e, _ in want]
    assert np.array_equal(np.array([v for *_, v in got]), np.array([v for *_, v in want]),
                          equal_nan=True)
    errors = [e for _, e, _ in got]
    assert errors[:6] == [None] * 6 and errors[8] is None and errors[12] is None
    assert [bool(e) for e in errors[6:12]] == [True, True, False, False, True, True]
    assert errors[9] is None and np.isnan(got[9][2][0])  # NaN is the handler's to reject
