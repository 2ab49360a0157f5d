"""The pure parts of `kiln tune`: the sweep, the selection rule, the model-config.yaml."""

import json
import shutil
import zipfile

import yaml

from kiln.loadtests import declared
from kiln.loadtests.tune import Trial, Variant, choose, markdown, model_config_yaml, sweep
from kiln.model_store import archive


def trial(backend, bs, delay, workers, rps, p99, one_p50, one_p99=None, errors=0):
    return Trial(Variant(backend, bs, delay, workers), rps, one_p50 * 2, p99, one_p50,
                 one_p99 if one_p99 is not None else one_p50 * 2, errors)


def test_sweep_is_the_full_grid():
    variants = sweep(["onnx", "torchscript"], [(1, 0), (8, 2)], [1, 2])
    assert len(variants) == 8
    assert variants[0] == Variant("onnx", 1, 0, 1)
    assert variants[-1].name == "torchscript_b8_d2_w2"


def test_the_fastest_variant_under_the_bound_wins():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 2, 1, 900, 60, 7),
              trial("onnx", 16, 5, 1, 1200, 120, 9)]
    assert choose(trials, 100).variant == Variant("onnx", 8, 2, 1)


def test_one_client_p99_must_meet_the_bound_too():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 50, 1, 900, 60, 52, 101)]
    assert choose(trials, 100).variant == Variant("onnx", 1, 0, 1)


def test_errors_disqualify():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 2, 1, 900, 60, 7, errors=1)]
    assert choose(trials, 100).variant == Variant("onnx", 1, 0, 1)


def test_a_tie_goes_to_the_lower_one_client_p50():
    trials = [trial("onnx", 8, 5, 1, 1000, 60, 9), trial("torchscript", 8, 2, 2, 970, 70, 6),
              trial("onnx", 1, 0, 2, 800, 50, 3)]
    assert choose(trials, 100).variant == Variant("torchscript", 8, 2, 2)


def test_none_qualifies():
    assert choose([trial("onnx", 1, 0, 1, 300, 140, 5)], 100) is None


def test_report_marks_the_pick_and_shows_its_one_client_p50():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 2, 1, 900, 60, 7)]
    pick = choose(trials, 100)
    text = markdown("m", trials, pick, 100, 16, 3)
    assert "| onnx_b8_d2_w1 | onnx | 8 | 2 | 1 | 900 | 14.00 | 60.00 | 7.00 | 14.00 | 0 " \
           "| **pick** |" in text.splitlines()
    assert "Pick: **onnx_b8_d2_w1**: 900 req/s at 16 clients (p99 60.00 ms), 7.00 ms p50 " \
           "at 1 client." in text.splitlines()


def exported(model_dir, folder):
    """A copy of a tiny exported model whose signature records a passed parity gate."""
    shutil.copytree(model_dir, folder)
    signature = json.loads((folder / "signature.json").read_text())
    signature["parity"] = {"onnx": {"max_abs_diff": 0.0, "top1_agreement": 1.0}}
    (folder / "signature.json").write_text(json.dumps(signature))
    return folder


def test_model_config_is_what_kiln_archive_writes(tmp_path, features_model_dir):
    variant = Variant("onnx", 8, 2, 2)
    written = yaml.safe_load(model_config_yaml(variant))
    assert written == {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 2,
                       "responseTimeout": 30, "handler": {"top_k": 3, "intra_op_threads": "auto",
                                                          "require_gpu": False}}
    mar = archive.build(declared.default_name("features"), "onnx", variant.serving_config(),
                        artifacts=exported(features_model_dir, tmp_path / "artifacts"),
                        store=tmp_path / "store")
    with zipfile.ZipFile(mar) as z:
        assert yaml.safe_load(z.read("model-config.yaml")) == written
