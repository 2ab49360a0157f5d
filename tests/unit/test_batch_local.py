"""--via local end to end on tiny exported models: error rows, order, summary, and the same
answers whichever batch and chunk size."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.batch import job, scoring
from kiln.batch.chunks import Chunk
from kiln.batch.writers import read_output
from kiln.handlers.answers import NON_FINITE_ANSWER

REPO = Path(__file__).resolve().parents[2]


def _run(model_dir, name, inp, out, **kw):
    settings = job.JobSettings(name=name, input=inp, output=out, artifacts=model_dir,
                               progress=False, **kw)
    return job.run(settings), read_output(out)


def _image_dir(tmp_path, light_square_png):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "sub" / "square.png").write_bytes(light_square_png)
    (folder / "sub" / "broken.png").write_bytes(light_square_png[:40])
    return folder


def test_images_with_a_broken_file(tmp_path, image_model_dir, light_square_png):
    folder = _image_dir(tmp_path, light_square_png)
    summary, rows = _run(image_model_dir, "tinydigits", folder, tmp_path / "out.jsonl",
                         chunk_size=3, batch_size=2)
    assert [r["id"] for r in rows] == ["0.png", "1.png", "2.png", "3.png", "4.png",
                                       "sub/broken.png", "sub/square.png"]
    assert rows[5]["error"] == "PNG image could not be decoded (truncated or corrupt)"
    assert [r["error"] is None and r["label"] is not None for r in rows] == [True] * 5 + [
        False, True]
    assert (summary.rows, summary.failed, summary.rows_this_run) == (7, 1, 7)
    assert not (tmp_path / "out.jsonl.parts").exists()


def test_answers_do_not_depend_on_batch_or_chunk_size(tmp_path, image_model_dir,
                                                      light_square_png):
    folder = _image_dir(tmp_path, light_square_png)
    _, one = _run(image_model_dir, "tinydigits", folder, tmp_path / "a.csv",
                  chunk_size=100, batch_size=64)
    _, other = _run(image_model_dir, "tinydigits", folder, tmp_path / "b.csv",
                    chunk_size=2, batch_size=1)
    assert one == other


def test_feature_rows_with_bad_values(tmp_path, features_model_dir, features_signature,
                                      feature_row):
    names = features_signature["inputs"][0]["names"]
    good = ",".join(str(feature_row[n]) for n in names)
    nan = ",".join(["nan"] + [str(feature_row[n]) for n in names[1:]])
    text = ",".join(names) + "\n" + "\n".join([good, nan, good.replace("1.0", "x", 1), good])
    path = tmp_path / "rows.csv"
    path.write_text(text + "\n")
    summary, rows = _run(features_model_dir, "tinycancer", path, tmp_path / "out.csv",
                         chunk_size=3)
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[1]["error"] == "feature at [0, 0] is not a finite number: nan"
    assert rows[2]["error"] == "column 'mean radius' is not a number: 'x'"
    assert rows[0] == {**rows[3], "id": "0"}
    assert rows[0]["label"] in ("malignant", "benign") and rows[0]["probability"] >= 0.5
    assert (summary.rows, summary.failed) == (4, 2)


def test_a_bad_row_among_thousands_fails_alone(features_signature, feature_row):
    """A part's rows are decoded in one pass; one bad row sends it back to slices of 512
    and row by row, with the same rows for the others."""
    names = features_signature["inputs"][0]["names"]
    row = np.array([feature_row[n] for n in names], dtype=np.float64)
    values = np.tile(row, (1500, 1)) * np.linspace(0.5, 1.5, 1500)[:, None]
    clean = scoring.decode_chunk(Chunk(0, [str(i) for i in range(1500)], values=values),
                                 features_signature)
    assert len(clean.parts) == 1 and clean.positions == list(range(1500))
    values[1000, 3] = 1e39
    bad = scoring.decode_chunk(Chunk(0, [str(i) for i in range(1500)], values=values),
                               features_signature)
    assert bad.positions == [i for i in range(1500) if i != 1000]
    assert bad.errors[1000].startswith(f"value for '{names[3]}' is 1e+39")
    assert bad.errors.count(None) == 1499
    rows = np.concatenate([part[0] for part in bad.parts])
    np.testing.assert_array_equal(rows, np.delete(clean.parts[0][0], 1000, axis=0))


class NanAboveOne:
    """A binary model that has no answer (NaN) where its first standardised input is > 1."""

    def run(self, batch):
        x = batch[0] if isinstance(batch, list) else batch
        p = 1 / (1 + np.exp(-x[:, :1].astype(np.float32)))
        return np.where(x[:, :1] > 1, np.float32("nan"), p).astype(np.float32)


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_a_row_without_a_finite_answer_fails_alone(features_signature, feature_row,
                                                   batch_size):
    """The server answers such a row with a 400 and its neighbours with theirs; a batch job
    records that row's error, with the server's words, and scores the others."""
    names = features_signature["inputs"][0]["names"]
    row = np.array([feature_row[n] for n in names], dtype=np.float64)
    values = np.tile(row, (7, 1))
    values[:, 0] = [0.5, 5.0, 0.2, 9.0, 9.0, 0.9, 1.5]  # standardised: x - 0 over 1
    chunk = Chunk(0, [str(i) for i in range(7)], values=values,
                  errors=[None] * 6 + ["read error"])
    decoded = scoring.decode_chunk(chunk, features_signature)
    got = scoring.score(NanAboveOne(), chunk, decoded, batch_size, features_signature)
    assert got.errors == [None, NON_FINITE_ANSWER, None, NON_FINITE_ANSWER,
                          NON_FINITE_ANSWER, None, "read error"]
    labels, probabilities = got.answers
    assert [label is None for label in labels] == [e is not None for e in got.errors]
    expected = 1 / (1 + np.exp(-np.float32([0.5, 0.2, 0.9])))
    kept = [p for p in probabilities if p is not None]
    np.testing.assert_allclose([max(p, 1 - p) for p in kept],
                               [max(p, 1 - p) for p in expected], rtol=1e-6)


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_decoding_workers_die_with_a_killed_job(tmp_path, image_model_dir, light_square_png):
    """SIGKILL gives a job no chance to stop its process pool: the workers must notice."""
    folder = _image_dir(tmp_path, light_square_png)
    script = ("from pathlib import Path\nfrom kiln.batch import job\n"
              f"job.run(job.JobSettings(name='t', input=Path({str(folder)!r}), "
              f"output=Path({str(tmp_path / 'out.csv')!r}), "
              f"artifacts=Path({str(image_model_dir)!r}), chunk_size=1, progress=False, "
              "chunk_delay_s=5))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    manifest = tmp_path / "out.csv.parts" / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while (not manifest.exists() or len(manifest.read_text().splitlines()) < 2) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2  # the pool's workers (and multiprocessing's resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]


def test_many_images_come_out_once_each_in_order(tmp_path, image_model_dir):
    """More parts than the pool and the read-ahead hold at once: none lost, none repeated."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(45):
        Image.fromarray(np.full((28, 28), (i * 37) % 256, dtype=np.uint8)).save(
            folder / f"{i:03d}.png")
    summary, rows = _run(image_model_dir, "tinydigits", folder, tmp_path / "out.csv",
                         chunk_size=4, batch_size=3)
    _, serial = _run(image_model_dir, "tinydigits", folder, tmp_path / "one.csv",
                     chunk_size=45, batch_size=45)
    assert [r["id"] for r in rows] == [f"{i:03d}.png" for i in range(45)]
    assert rows == serial
    assert (summary.rows, summary.failed, summary.rows_this_run) == (45, 0, 45)


def _as_exported(model_dir, tmp_path, forms=("model.onnx", "model.ts")):
    """The fixture's exports under the names kiln export gives them (its TorchScript file is
    model.pt, as an archive's model folder holds it)."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    shutil.copy(model_dir / "signature.json", folder)
    for form in forms:
        shutil.copy(model_dir / ("model.pt" if form == "model.ts" else form), folder / form)
    return folder


def test_torchscript_export_answers_as_the_onnx_one(tmp_path, image_model_dir,
                                                    light_square_png):
    folder = _image_dir(tmp_path, light_square_png)
    artifacts = _as_exported(image_model_dir, tmp_path)
    answers = {backend: _run(artifacts, "tinydigits", folder, tmp_path / f"{backend}.csv",
                             backend=backend, batch_size=3)[1]
               for backend in ("onnx", "torchscript")}
    onnx, torchscript = answers["onnx"], answers["torchscript"]
    assert [(r["id"], r["label"], r["error"]) for r in torchscript] == [
        (r["id"], r["label"], r["error"]) for r in onnx]
    assert sum(r["error"] is None for r in onnx) == 6
    # Two runtimes' float32 sums may differ in the last bit; export's parity gate allows 1e-4.
    np.testing.assert_allclose([r["probability"] for r in torchscript if r["error"] is None],
                               [r["probability"] for r in onnx if r["error"] is None],
                               atol=1e-6)


def test_a_form_that_was_not_exported_is_named(tmp_path, image_model_dir, light_square_png):
    folder = _image_dir(tmp_path, light_square_png)
    artifacts = _as_exported(image_model_dir, tmp_path, forms=("model.onnx",))
    with pytest.raises(job.BatchError) as err:
        _run(artifacts, "tinydigits", folder, tmp_path / "out.csv", backend="torchscript")
    assert str(err.value) == (f"{artifacts / 'model.ts'} is missing: kiln export tinydigits "
                              "writes it (a model that form cannot export has none; its "
                              "signature's parity says which forms passed)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "images"]


def test_a_backend_is_refused_for_a_server_job(tmp_path, image_model_dir, light_square_png):
    folder = _image_dir(tmp_path, light_square_png)
    with pytest.raises(job.BatchError) as err:
        _run(image_model_dir, "tinydigits", folder, tmp_path / "out.csv", via="server",
             backend="onnx", url="http://127.0.0.1:9")
    assert str(err.value) == ("--backend picks the export of --via local or ray; the server "
                              "runs the form its archive holds (kiln archive --backend)")
