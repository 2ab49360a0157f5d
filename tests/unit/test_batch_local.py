"""--via local end to end on tiny exported models: error rows, order, summary, and the same
answers whichever batch and chunk size."""

import numpy as np
from PIL import Image

from batch import job
from batch.writers import read_output


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
    names = features_signature["preprocess"]["feature_names"]
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
