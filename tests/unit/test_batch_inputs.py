"""Batch jobs for any declared model: one column per input (tensor ids and mask, an image and
features), every output kind's columns, and each row scored exactly once with the handler's
own answer, by --via local and --via server alike, a resumed job included."""

import base64
import csv
import io
import json
import shutil
import warnings

import numpy as np
import pytest
from conftest import _export_model_dir, features_signature_dict
from PIL import Image
from test_handler import loaded_handler, make_context
from test_inputs_and_answers import TEXT_SIGNATURE, serve, text_model_dir  # noqa: F401

from kiln import client as http
from kiln.batch import job, remote
from kiln.batch.chunks import BatchError
from kiln.batch.readers import open_source
from kiln.batch.store import ChunkStore
from kiln.batch.writers import read_output

CHUNK, BATCH = 5, 3  # parts of 3, 2, 3, 2... rows: padding differs from part to part


def run_job(model_dir, inp, out, **kw):
    settings = job.JobSettings(name=model_dir.name, input=inp, output=out,
                               artifacts=model_dir, progress=False, chunk_size=CHUNK,
                               batch_size=BATCH, **kw)
    return job.run(settings), read_output(out)


def parts(n):
    """The rows of each model call of a job of n rows: parts of BATCH rows within chunks."""
    for chunk in range(0, n, CHUNK):
        for start in range(chunk, min(chunk + CHUNK, n), BATCH):
            yield range(start, min(start + BATCH, chunk + CHUNK, n))


def handler_records(model_dir, instances, errors, to_record):
    """What the handler answers for the same rows, sent in the same groups as the job scores
    them (so that variable lengths are padded alike): the expected output records."""
    context = make_context(model_dir, "model.onnx")
    handler = loaded_handler(context)
    records = [None] * len(instances)
    for rows in parts(len(instances)):
        good = [i for i in rows if errors[i] is None]
        if good:
            got = serve(handler, context, [{"body": {"instances": [instances[i] for i in good]}}])
            for i, answer in zip(good, got[0], strict=True):
                records[i] = {"id": str(i), **to_record(answer), "error": None}
    for i, error in enumerate(errors):
        if error is not None:
            records[i] = {"id": str(i), **to_record(None), "error": error}
    return records


def handler_error(model_dir, instance):
    context = make_context(model_dir, "model.onnx")
    (answer,) = serve(loaded_handler(context), context, [{"body": instance}])
    return answer["error"]


def write_table(path, header, rows):
    """rows of cells as CSV (JSON values as JSON text), JSON Lines or Parquet."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r, strict=True))) + "\n"
                                for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({h: [r[k] for r in rows] for k, h in enumerate(header)}), path)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([c if isinstance(c, str) else json.dumps(c) for c in r]
                             for r in rows)
    return path


# --- two tensor inputs, variable length ------------------------------------------------


def text_rows():
    """(instances, cells for the table, the reader's errors): good rows of lengths 1 to 8,
    some masked, and rows the reader or the handler refuses."""
    rng = np.random.default_rng(3)
    instances = []
    for i in range(13):
        length = 1 + i % 8
        ids = rng.integers(1, 20, length).tolist()
        mask = [1] * length if i % 3 else [1] * (length - length // 2) + [0] * (length // 2)
        instances.append({"input_ids": ids, "attention_mask": mask})
    instances.insert(4, {"input_ids": [1, 20], "attention_mask": [1, 1]})  # above max
    instances.insert(9, {"input_ids": list(range(9)), "attention_mask": [1] * 9})  # too long
    cells = [[inst["input_ids"], inst["attention_mask"]] for inst in instances]
    cells.insert(11, ["[1, 2", [1, 1]])  # not JSON: the reader's error
    instances.insert(11, None)
    reader = {11: "column 'input_ids' is not valid JSON: Expecting ',' delimiter at column 6"}
    return instances, cells, reader


def multilabel(answer):
    return ({"labels": None, "probabilities": None} if answer is None else
            {"labels": answer["labels"], "probabilities": answer["probabilities"]})


@pytest.fixture(scope="module")
def text_expected(text_model_dir):  # noqa: F811
    instances, cells, reader = text_rows()
    errors = [reader.get(i) or (handler_error(text_model_dir, inst)
                                if i in (4, 9) else None)
              for i, inst in enumerate(instances)]
    return cells, handler_records(text_model_dir, instances, errors, multilabel)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_two_tensor_inputs_every_row_once_with_the_handlers_answer(
        tmp_path, text_model_dir, text_expected, suffix):  # noqa: F811
    cells, expected = text_expected
    rows = [[f"row {i}", *c] for i, c in enumerate(cells)]  # other columns are ignored
    inp = write_table(tmp_path / f"rows{suffix}", ["note", "input_ids", "attention_mask"], rows)
    summary, got = run_job(text_model_dir, inp, tmp_path / "out.csv")
    assert got == expected
    assert (summary.rows, summary.failed) == (16, 3)
    assert [r["error"] for r in got if r["error"]] == [
        "input 'input_ids': value at [0, 1] is 20, above its maximum 19",
        "input 'input_ids': array has shape [9], expected [L] with L <= 8",
        "column 'input_ids' is not valid JSON: Expecting ',' delimiter at column 6"]
    header = (tmp_path / "out.csv").read_text().splitlines()[0]
    assert header == "id,labels,probabilities,error"


def test_output_formats_hold_the_same_records(tmp_path, text_model_dir, text_expected):  # noqa: F811
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
    cells, expected = text_expected
    inp = write_table(tmp_path / "rows.csv", ["input_ids", "attention_mask"], cells)
    for suffix in (".jsonl", ".parquet"):
        assert run_job(text_model_dir, inp, tmp_path / f"out{suffix}")[1] == expected
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert isinstance(first["labels"], list) and isinstance(first["probabilities"], dict)


def test_parquet_list_columns(tmp_path, text_model_dir, text_expected):  # noqa: F811
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
    cells, expected = text_expected
    good = [cells[i] for i, r in enumerate(expected) if r["error"] is None]
    inp = write_table(tmp_path / "rows.parquet", ["input_ids", "attention_mask"], good)
    _, got = run_job(text_model_dir, inp, tmp_path / "out.jsonl")
    instances = [{"input_ids": ids, "attention_mask": mask} for ids, mask in good]
    assert got == handler_records(text_model_dir, instances, [None] * len(good), multilabel)


def test_a_resumed_job_scores_every_row_exactly_once(
        tmp_path, text_model_dir, text_expected, monkeypatch):  # noqa: F811
    cells, expected = text_expected
    inp = write_table(tmp_path / "rows.csv", ["input_ids", "attention_mask"], cells)
    out = tmp_path / "out.jsonl"
    write_chunk = ChunkStore.write_chunk

    def crash_after_two(store, index, scored):
        if len(store.done) == 2:
            raise KeyboardInterrupt  # the job is stopped between two chunks
        return write_chunk(store, index, scored)

    monkeypatch.setattr(ChunkStore, "write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_job(text_model_dir, inp, out)
    assert not out.exists()
    monkeypatch.setattr(ChunkStore, "write_chunk", write_chunk)
    summary, got = run_job(text_model_dir, inp, out, resume=True)
    assert (summary.rows, summary.rows_this_run) == (16, 16 - 2 * CHUNK)
    assert got == expected


class HandlerClient:
    """kiln.client.Client's predict, answered by the handler in this process."""

    def __init__(self, model_dir):
        self.context = make_context(model_dir, "model.onnx")
        self.handler = loaded_handler(self.context)
        self.bodies = []

    def predict(self, name, body, content_type):
        self.bodies.append(json.loads(body))
        (answer,) = serve(self.handler, self.context, [{"body": body}])
        return http.Answer(self.context.get_response_status(0)[0], answer)


def test_via_server_sends_instances_and_answers_as_local(
        tmp_path, text_model_dir, text_expected, monkeypatch):  # noqa: F811
    cells, expected = text_expected
    inp = write_table(tmp_path / "rows.csv", ["input_ids", "attention_mask"], cells)
    fake = HandlerClient(text_model_dir)
    monkeypatch.setattr(remote.ServerScorer, "_client", lambda self: fake)
    summary, got = run_job(text_model_dir, inp, tmp_path / "out.csv", via="server",
                           url="http://kiln.invalid", concurrency=1)
    assert got == expected
    assert fake.bodies[0] == {"instances": [
        {"input_ids": c[0], "attention_mask": c[1]} for c in cells[:BATCH]]}
    assert summary.failed == 3


# --- an image and features -------------------------------------------------------------

SCAN_SIGNATURE = {
    "signature_version": 2,
    "name": "tinyscan",
    "inputs": [
        {"name": "image", "kind": "image", "dtype": "float32", "shape": [-1, 1, 4, 4],
         "channels": 1, "size": [4, 4], "resize": "exact", "pad": 0, "pixel_max": 255,
         "mean": [0.5], "std": [0.25]},
        {"name": "vitals", "kind": "features", "dtype": "float32", "shape": [-1, 3],
         "names": ["age", "pulse", "weight"], "mean": [50.0, 70.0, 80.0],
         "std": [10.0, 5.0, 20.0]},
    ],
    "output": {"name": "probabilities", "kind": "binary", "dtype": "float32",
               "shape": [-1, 1], "labels": ["no", "yes"], "threshold": 0.5},
}  # fmt: skip


@pytest.fixture(scope="module")
def scan_model_dir(tmp_path_factory):
    import torch

    class Scan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(19, 1)
            with torch.no_grad():
                self.out.weight.copy_(torch.sin(torch.arange(19.0)).reshape(1, 19))
                self.out.bias.fill_(-0.2)

        def forward(self, image, vitals):
            return torch.sigmoid(self.out(torch.cat([image.flatten(1), vitals], dim=1)))

    directory = tmp_path_factory.mktemp("models") / "tinyscan"
    directory.mkdir()
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(Scan().eval(), (torch.zeros(2, 1, 4, 4), torch.zeros(2, 3)),
                          str(directory / "model.onnx"), dynamo=True, external_data=False,
                          verbose=False, dynamic_shapes=({0: batch}, {0: batch}),
                          input_names=["image", "vitals"], output_names=["probabilities"])
    (directory / "signature.json").write_text(json.dumps(SCAN_SIGNATURE))
    return directory


def png_bytes(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (4, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def labelled(answer):
    return ({"label": None, "probability": None} if answer is None else
            {"label": answer["label"], "probability": answer["probability"]})


def test_image_paths_base64_and_features_objects(tmp_path, scan_model_dir):
    (tmp_path / "scans").mkdir()
    raws = [png_bytes(seed) for seed in range(6)]
    for k, raw in enumerate(raws):
        (tmp_path / "scans" / f"{k}.png").write_bytes(raw)
    (tmp_path / "scans" / "broken.png").write_bytes(raws[0][:30])
    vitals = [{"age": 40 + k, "pulse": 60 + 3 * k, "weight": 70.5 + k} for k in range(6)]
    rows = [[f"scans/{k}.png", json.dumps(v)] for k, v in enumerate(vitals)]
    rows[2][1] = json.dumps(list(vitals[2].values()))  # a list in names order
    rows[3][0] = base64.b64encode(raws[3]).decode()  # the image's bytes, not a path
    rows += [["scans/missing.png", json.dumps(vitals[0])],
             ["scans/broken.png", json.dumps(vitals[0])],
             ["scans/0.png", json.dumps({"age": 1})]]
    inp = write_table(tmp_path / "rows.csv", ["image", "vitals"], rows)
    _, got = run_job(scan_model_dir, inp, tmp_path / "out.csv")
    instances = [{"image": {"b64": base64.b64encode(raws[k]).decode()}, "vitals": vitals[k]}
                 for k in range(6)]
    errors = [None] * 6 + [
        "column 'image': no file 'scans/missing.png' (paths are relative to the table's "
        "folder), and not base64",
        "input 'image': PNG image could not be decoded (truncated or corrupt)",
        "input 'vitals': expected 3 features, got 1: missing 'pulse', 'weight'"]
    assert got == handler_records(scan_model_dir, instances + [None] * 3, errors, labelled)
    assert [r["label"] for r in got[:6]] == ["no", "no", "yes", "yes", "yes", "yes"]


def test_tables_of_instances_need_one_column_per_input(tmp_path, scan_model_dir, text_model_dir):  # noqa: F811
    sig = json.loads((scan_model_dir / "signature.json").read_text())
    inp = write_table(tmp_path / "rows.csv", ["image", "age"], [["a.png", "1"]])
    with pytest.raises(BatchError, match="rows.csv: no column 'vitals'; tinyscan takes one "
                                         "column per input, named after it: 'image', 'vitals'"):
        open_source(inp, sig, 10)
    np.save(tmp_path / "rows.npy", np.zeros((2, 19)))
    with pytest.raises(BatchError, match="a .npy file holds one array of rows, and tinyscan "
                                         r"takes 2 inputs \('image', 'vitals'\), one column"):
        open_source(tmp_path / "rows.npy", sig, 10)
    with pytest.raises(BatchError, match="is a folder of images but tinytags takes 2 inputs"):
        open_source(tmp_path, TEXT_SIGNATURE, 10)


# --- regression and raw outputs --------------------------------------------------------


def regression_signature(kind):
    sig = features_signature_dict()
    sig["name"] = f"tiny{kind}"
    sig["output"] = ({"name": "values", "kind": "regression", "dtype": "float32",
                      "shape": [-1, 2], "names": ["price", "area"], "units": ["EUR", None]}
                     if kind == "regression" else
                     {"name": "values", "kind": "raw", "dtype": "float32", "shape": [-1, 2]})
    return sig


@pytest.fixture(scope="module")
def regression_dirs(tmp_path_factory):
    import torch

    linear = torch.nn.Linear(30, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.cos(torch.arange(60.0)).reshape(2, 30))
        linear.bias.copy_(torch.tensor([100.0, -3.0]))
    root = tmp_path_factory.mktemp("models")
    first = _export_model_dir(root / "tinyregression", linear.eval(), torch.zeros(2, 30),
                              regression_signature("regression"))
    raw = root / "tinyraw"
    raw.mkdir()
    shutil.copy(first / "model.onnx", raw / "model.onnx")
    (raw / "signature.json").write_text(json.dumps(regression_signature("raw")))
    return {"regression": first, "raw": raw}


@pytest.mark.parametrize("kind", ["regression", "raw"])
def test_features_job_with_a_regression_or_raw_output(tmp_path, regression_dirs, kind,
                                                      feature_row):
    model_dir = regression_dirs[kind]
    names = list(feature_row)
    rows = [[feature_row[n] * (1 + i / 7) for n in names] for i in range(6)]
    instances = [dict(zip(names, r, strict=True)) for r in rows]
    rows[4][3] = "x"
    inp = write_table(tmp_path / "rows.csv", names, [[str(v) for v in r] for r in rows])
    summary, got = run_job(model_dir, inp, tmp_path / "out.csv")

    def to_record(answer):
        if kind == "raw":
            return {"output": None if answer is None else answer["output"]}
        return answer["values"] if answer else {"price": None, "area": None}

    errors = [None] * 4 + ["column 'mean area' is not a number: 'x'", None]
    assert got == handler_records(model_dir, instances, errors, to_record)
    header = (tmp_path / "out.csv").read_text().splitlines()[0]
    assert header == ("id,price,area,error" if kind == "regression" else "id,output,error")
    assert summary.failed == 1


def test_regression_names_must_not_be_output_columns(tmp_path):
    sig = regression_signature("regression")
    sig["output"]["names"] = ["price", "error"]
    with pytest.raises(BatchError, match="has regression outputs named 'error'"):
        open_source(tmp_path, sig, 10)
