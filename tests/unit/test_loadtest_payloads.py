"""Load-test payloads and answer checks from declarations, the models' default choice, and the
flags of `kiln loadtest`, `bench` and `tune`: any declared model, a user's included."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from kiln import declaration
from kiln.declaration import DeclarationError
from kiln.loadtests import arguments, bench_arguments, declared, payloads, run

FEATURES = """
[model]
file = "model.py"
[weights]
state_dict = "weights.pt"
[[inputs]]
name = "x"
kind = "features"
names = ["b", "a"]
[output]
kind = "binary"
labels = ["no", "yes"]
[[examples]]
value = {a = 1.5, b = 2}
expect = "yes"
[[examples]]
file = "row.json"
"""
IMAGE = """
[model]
file = "model.py"
[weights]
state_dict = "weights.pt"
[[inputs]]
name = "pixels"
kind = "image"
size = [2, 3]
[output]
kind = "multiclass"
labels = ["dark", "light"]
[[examples]]
file = "two.png"
expect = "light"
[[examples]]
value = [[0, 255, 7], [1, 2, 3]]
"""
TENSOR = """
[model]
file = "model.py"
[weights]
state_dict = "weights.pt"
[[inputs]]
name = "ids"
kind = "tensor"
dtype = "int64"
shape = [3]
[output]
kind = "raw"
[[examples]]
value = [1, 2, 3]
"""
PIXELS = np.array([[0, 128, 255], [9, 8, 7]], dtype=np.uint8)


@pytest.fixture
def user_models(tmp_path):
    """A user's folder of three declared models, none of them Kiln's."""
    (tmp_path / "model.py").write_text("")
    (tmp_path / "weights.pt").write_bytes(b"")
    (tmp_path / "row.json").write_text("[3, 4]")
    Image.fromarray(PIXELS).save(tmp_path / "two.png")
    for name, text in (("rows", FEATURES), ("shades", IMAGE), ("ids", TENSOR)):
        (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def oip_input(payload):
    return json.loads(payload.body)["inputs"]


def test_rest_payloads_are_the_examples_with_their_labels(user_models):
    rows = declaration.get("rows", [user_models])
    assert payloads.rest_payloads(rows) == [
        payloads.Payload(b'{"a": 1.5, "b": 2}', "application/json", "yes"),
        payloads.Payload(b"[3, 4]", "application/json", None)]
    shades = declaration.get("shades", [user_models])
    assert [(p.body, p.content_type, p.label) for p in payloads.rest_payloads(shades)] == [
        ((user_models / "two.png").read_bytes(), "image/png", "light"),
        (b"[[0, 255, 7], [1, 2, 3]]", "application/json", None)]
    assert payloads.first_payload(shades).label == "light"


def test_oip_features_follow_the_declared_names(user_models):
    oip = payloads.oip_payloads(declaration.get("rows", [user_models]))
    assert [(oip_input(p), p.label) for p in oip] == [
        ([{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [2.0, 1.5]}], "yes"),
        ([{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [3.0, 4.0]}], None)]


def test_oip_images_are_whole_pixels(user_models):
    oip = payloads.oip_payloads(declaration.get("shades", [user_models]))
    assert [oip_input(p) for p in oip] == [
        [{"name": "pixels", "shape": [1, 2, 3], "datatype": "UINT8",
          "data": PIXELS.ravel().tolist()}],
        [{"name": "pixels", "shape": [1, 2, 3], "datatype": "UINT8",
          "data": [0, 255, 7, 1, 2, 3]}]]


def test_a_tensor_model_gets_rest_payloads_and_no_oip_user(user_models):
    ids = declaration.get("ids", [user_models])
    assert payloads.rest_payloads(ids) == [
        payloads.Payload(b"[1, 2, 3]", "application/json", None)]
    assert payloads.oip_payloads(ids) == []


def test_kiln_models_send_their_declared_examples():
    for name in declaration.default_set():
        decl = declaration.get(name)
        assert [(p.body, p.label) for p in payloads.rest_payloads(decl)] == [
            (e.body(), e.expect) for e in decl.examples]
        if payloads.oip_input(decl) is not None:
            assert [p.label for p in payloads.oip_payloads(decl)] == [
                e.expect for e in decl.examples]


def test_a_model_without_examples_is_refused(user_models):
    text = TENSOR[:TENSOR.index("[[examples]]")]
    (user_models / "bare.toml").write_text(text)
    with pytest.raises(DeclarationError, match=r"no \[\[examples\]\]"):
        payloads.rest_payloads(declaration.get("bare", [user_models]))


def test_answers_are_judged_by_label():
    assert payloads.rest_problem({"label": "7", "probability": 0.99}, "7") is None
    assert payloads.rest_problem({"label": "1", "probability": 0.6}, "7") == (
        "label '1', expected '7'")
    assert payloads.rest_problem({"label": "7", "probability": 1.5}, "7") == (
        "probability 1.5 is not in [0, 1]")
    assert payloads.rest_problem({"error": "x"}, "7").startswith("expected a JSON object")
    good = {"model_name": "m", "outputs": [{"name": "probabilities", "data": [1.0]},
                                           {"name": "label", "data": ["7"]}]}
    assert payloads.oip_problem(good, "m", "7") is None
    assert payloads.oip_problem(good, "m", "3") == "label ['7'], expected ['3']"
    assert payloads.oip_problem(good, "n", "7").startswith("expected an answer for 'n'")


def test_without_expect_any_json_object_will_do():
    assert payloads.rest_problem({"output": [[0.5]]}, None) is None
    assert payloads.rest_problem([0.5], None) == "expected a JSON object, got [0.5]"
    assert payloads.oip_problem({"model_name": "m", "outputs": [{"name": "output"}]},
                                "m", None) is None
    assert payloads.oip_problem({"model_name": "m", "outputs": []}, "m", None).startswith(
        "no outputs")


def test_defaults_come_from_the_default_set_by_place_and_input_kind():
    default = declaration.default_set()
    assert declared.default_name() == default[0]
    for kind in ("image", "features"):
        first = [n for n in default
                 if declared.input_kind(declaration.get(n)) == kind][:1]
        assert [declared.default_name(kind)] == first
    with pytest.raises(DeclarationError, match="no model with one audio input"):
        declared.default_name("audio")


def test_studies_take_any_declared_model(user_models):
    parser = argparse.ArgumentParser()
    declared.add_model_argument(parser)
    args = parser.parse_args(["--model", "rows", "--models-dir", str(user_models)])
    assert declared.chosen(parser, args).name == "rows"
    assert declared.chosen(parser, parser.parse_args([])).name == declared.default_name()
    with pytest.raises(SystemExit):
        declared.chosen(parser, parser.parse_args(["--model", "nope"]))


@pytest.mark.parametrize("add", [arguments.add_arguments, bench_arguments.add_bench_arguments,
                                 bench_arguments.add_tune_arguments])
def test_commands_take_any_name_and_models_dirs(add, tmp_path):
    parser = argparse.ArgumentParser()
    add(parser)
    flags = ["--p99-ms", "9"] if add is bench_arguments.add_tune_arguments else []
    args = parser.parse_args(["anything", "--models-dir", str(tmp_path), *flags])
    assert (args.name, args.models_dirs) == ("anything", [tmp_path])


def loadtest_args(*argv):
    parser = argparse.ArgumentParser()
    arguments.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_an_undeclared_model_cannot_be_load_tested(caplog):
    assert run.run(loadtest_args("nope")) == run.CANNOT_RUN
    assert "unknown model 'nope'" in caplog.text


def test_locust_gets_the_declared_name_and_its_folders(user_models, tmp_path):
    args = loadtest_args(str(user_models / "rows.toml"))
    run.resolve_name(args)
    assert (args.name, args.models_dirs) == ("rows", [user_models])
    target = run.Target("http://h:1", "http://h:2", "http://h:3", None, None)
    command = run.locust_command(args, target, run.limits(args), tmp_path)
    at = command.index("--kiln-models")
    assert command[at:at + 4] == ["--kiln-models", "rows", "--kiln-models-dirs",
                                  str(user_models.resolve())]
