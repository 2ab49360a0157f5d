import importlib
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from ts.context import Context, RequestProcessor
from ts.utils.util import list_classes_from_module

from kiln.handlers import answers, backends, oip, payload_log, rest
from kiln.handlers import handler as kiln_handler
from kiln.model_store import archive

CUDA_IN_ORT = "CUDAExecutionProvider" in ort.get_available_providers()


def make_context(model_dir, serialized, model_yaml_config=None, gpu=None, version="1.0"):
    """TorchServe's own Context, filled in as its model loader fills it in."""
    manifest = {
        "model": {
            "modelName": model_dir.name,
            "serializedFile": serialized,
            "handler": "handler.py",
            "modelVersion": version,
        }
    }
    return Context(
        model_dir.name,
        str(model_dir),
        manifest,
        4,
        gpu,
        "0.12.0",
        limit_max_image_pixels=True,
        metrics=None,
        model_yaml_config=model_yaml_config or {},
    )


def loaded_handler(context):
    handler = kiln_handler.KilnHandler()
    handler.initialize(context)
    return handler


def serve(handler, context, requests):
    """One TorchServe batch: a fresh RequestProcessor per request, as the worker sets them."""
    context.request_processor = [RequestProcessor({}) for _ in requests]
    return handler.handle(requests, context)


def diagonal_pixels():
    return [[255 if row == col else 0 for col in range(28)] for row in range(28)]


def direct_answers(backend, signature, bodies, top_k=3):
    """What the backend answers for the good bodies, scored together as the handler must."""
    batch = np.stack([rest.decode_request(body, signature) for body in bodies])
    rows = backend.run(batch)
    return [answers.answers([row], signature["output"], top_k)[0] for row in rows]


def test_archive_entry_module_defines_exactly_one_handler_class(tmp_path, monkeypatch):
    (tmp_path / f"{archive.ENTRY_MODULE}.py").write_text(archive.ENTRY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.import_module(archive.ENTRY_MODULE)
    classes = list_classes_from_module(entry)
    assert [cls.__name__ for cls in classes] == ["Handler"]
    assert issubclass(classes[0], kiln_handler.KilnHandler)


def test_image_batch_answers_each_request_in_order(
    image_model_dir, image_signature, light_square_png
):
    context = make_context(image_model_dir, "model.onnx")
    handler = loaded_handler(context)
    requests = [{"body": light_square_png}, {"body": b""}, {"data": diagonal_pixels()}]

    answers = serve(handler, context, requests)

    backend = backends.load_backend(str(image_model_dir / "model.onnx"))
    good = direct_answers(backend, image_signature, [light_square_png, diagonal_pixels()])
    assert len(answers) == 3
    assert [json.loads(a) for a in answers] == [
        good[0],
        {"error": "empty body", "code": 400},
        good[1],
    ]
    assert good[0] != good[1]
    assert [context.get_response_status(i) for i in range(3)] == [
        (200, None),
        (400, "Bad Request"),
        (200, None),
    ]
    assert [context.get_response_content_type(i) for i in range(3)] == ["application/json"] * 3


def test_features_batch_on_torchscript(features_model_dir, features_signature, feature_row):
    context = make_context(features_model_dir, "model.pt")
    handler = loaded_handler(context)
    as_list = [-v for v in feature_row.values()]
    bad = {**feature_row, "mean area": float("nan")}
    requests = [{"body": json.dumps(feature_row).encode()}, {"body": bad}, {"body": as_list}]

    answers = serve(handler, context, requests)

    backend = backends.load_backend(str(features_model_dir / "model.pt"))
    good = direct_answers(backend, features_signature, [feature_row, as_list])
    assert [json.loads(a) for a in answers] == [
        good[0],
        {"error": "value for 'mean area' is not a finite number: NaN", "code": 400},
        good[1],
    ]
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 400, 200]


def test_every_answer_says_the_archives_version(features_model_dir, feature_row):
    context = make_context(features_model_dir, "model.onnx", version="2.0")
    handler = loaded_handler(context)
    answers = serve(handler, context, [{"body": json.dumps(feature_row)}, {"body": "[1, 2]"}])
    assert [json.loads(a).get("code", 200) for a in answers] == [200, 400]
    assert [context.get_response_headers(i)[kiln_handler.VERSION_HEADER] for i in (0, 1)] == [
        "2.0", "2.0"]


def test_oip_answers_carry_the_version_in_the_body(image_model_dir):
    context = make_context(image_model_dir, "model.onnx", version="2.0")
    handler = loaded_handler(context)
    body = {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                        "data": [diagonal_pixels()]}]}
    context.request_processor = [RequestProcessor({oip.PROTOCOL_HEADER: oip.PROTOCOL})]
    (answer,) = handler.handle([{"body": json.dumps(body)}], context)
    assert json.loads(answer)["model_version"] == "2.0"


def test_oip_bodies_are_checked_against_the_model_and_version_reached(image_model_dir,
                                                                       tmp_path):
    # Served as "digits" (make_context names the model after its folder), its signature's
    # name being "tinydigits": the route's name is what a body must say.
    served = shutil.copytree(image_model_dir, tmp_path / "digits")
    context = make_context(served, "model.onnx", version="2.0")
    handler = loaded_handler(context)
    tensor = {"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
              "data": [diagonal_pixels()]}
    bodies = [{"model_name": "digits", "model_version": "2.0"},
              {"model_name": "tinydigits"}, {"model_version": "1.0"}, {"model_version": "1.0"}]
    oip_mark = {oip.PROTOCOL_HEADER: oip.PROTOCOL}
    context.request_processor = [RequestProcessor(oip_mark), RequestProcessor(oip_mark),
                                 RequestProcessor(oip_mark),
                                 RequestProcessor({**oip_mark, payload_log.COPY_HEADER: "1"})]
    answers = handler.handle([{"body": json.dumps({**b, "inputs": [tensor]})} for b in bodies],
                             context)
    assert [context.get_response_status(i)[0] for i in range(4)] == [200, 400, 400, 200]
    assert json.loads(answers[1])["error"] == (
        '"model_name" in the infer request is "tinydigits", but it reached model "digits"')
    assert json.loads(answers[2])["error"] == (
        '"model_version" in the infer request is "1.0", but version "2.0" of "digits" answers '
        'it; pin a version in the path: /v2/models/NAME/versions/VERSION/infer')
    assert json.loads(answers[0])["outputs"] == json.loads(answers[3])["outputs"]


def test_all_bad_batch_never_calls_the_model(features_model_dir):
    context = make_context(features_model_dir, "model.onnx")
    handler = loaded_handler(context)
    answers = serve(handler, context, [{"body": "[1, 2]"}, {}])
    assert [json.loads(a)["error"] for a in answers] == [
        "expected 30 features, got 2",
        "empty body",
    ]
    assert [context.get_response_status(i) for i in range(2)] == [(400, "Bad Request")] * 2


def test_top_k_comes_from_model_config(image_model_dir, image_signature):
    context = make_context(image_model_dir, "model.onnx", {"handler": {"top_k": 5}})
    handler = loaded_handler(context)
    (answer,) = serve(handler, context, [{"body": diagonal_pixels()}])
    backend = backends.load_backend(str(image_model_dir / "model.onnx"))
    assert json.loads(answer) == direct_answers(backend, image_signature, [diagonal_pixels()], 5)[0]
    assert len(json.loads(answer)["top_k"]) == 5


@pytest.mark.parametrize(
    "model_dir_fixture, shape",
    [("image_model_dir", (6, 1, 32, 32)), ("features_model_dir", (6, 30))],
)
def test_onnx_and_torchscript_agree(model_dir_fixture, shape, request):
    model_dir = request.getfixturevalue(model_dir_fixture)
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    onnx = backends.load_backend(str(model_dir / "model.onnx")).run(batch)
    torchscript = backends.load_backend(str(model_dir / "model.pt")).run(batch)
    assert onnx.dtype == torchscript.dtype == np.float32
    assert onnx.shape == torchscript.shape == (shape[0], 10 if len(shape) == 4 else 1)
    assert np.abs(onnx - torchscript).max() <= 1e-5


@pytest.mark.parametrize("serialized", ["model.onnx", "model.pt"])
def test_model_failure_answers_500_and_the_handler_returns(
    serialized, image_model_dir, tmp_path
):
    # A signature promising 28x28 inputs to a model built for 32x32: the model call raises.
    model_dir = tmp_path / "mismatched"
    model_dir.mkdir()
    shutil.copy(image_model_dir / serialized, model_dir / serialized)
    signature = json.loads((image_model_dir / "signature.json").read_text())
    signature["inputs"][0].update(pad=0, shape=[-1, 1, 28, 28])
    (model_dir / "signature.json").write_text(json.dumps(signature))
    context = make_context(model_dir, serialized)
    handler = loaded_handler(context)

    answers = serve(handler, context, [{"body": diagonal_pixels()}, {"body": "x"}, {"body": []}])

    failed = {"error": "the model failed on this batch", "code": 500}
    assert [json.loads(a) for a in answers] == [
        failed,
        {"error": "not a PNG or JPEG image and not JSON", "code": 400},
        {
            "error": "pixel array has shape [0], expected [28, 28]",
            "code": 400,
        },
    ]
    assert [context.get_response_status(i) for i in range(3)] == [
        (500, "Internal Server Error"),
        (400, "Bad Request"),
        (400, "Bad Request"),
    ]


@pytest.mark.parametrize("config", [None, {}, {"handler": None}, {"minWorkers": 2}])
def test_handler_options_default(config):
    assert kiln_handler.read_handler_options(config) == {
        "top_k": None,  # the signature's output.top_k
        "intra_op_threads": "auto",
        "require_gpu": False,
    }


@pytest.mark.parametrize(
    "handler_config, message",
    [
        (
            {"topk": 3},
            "unknown handler option(s) ['topk'] in model-config.yaml; "
            "known: ['intra_op_threads', 'require_gpu', 'top_k']",
        ),
        ({"top_k": 0}, "handler.top_k must be a whole number >= 1, got 0"),
        ({"top_k": True}, "handler.top_k must be a whole number >= 1, got True"),
        (
            {"intra_op_threads": "2"},
            "handler.intra_op_threads must be a whole number >= 1 or \"auto\", got '2'",
        ),
        ({"require_gpu": "yes"}, "handler.require_gpu must be true or false, got 'yes'"),
        (["top_k"], "handler in model-config.yaml must be a mapping, got ['top_k']"),
    ],
)
def test_bad_handler_options_fail_the_model_load(handler_config, message, image_model_dir):
    context = make_context(image_model_dir, "model.onnx", {"handler": handler_config})
    with pytest.raises(ValueError) as caught:
        loaded_handler(context)
    assert str(caught.value) == message


def test_require_gpu_without_an_assigned_gpu_fails_the_model_load(image_model_dir):
    context = make_context(image_model_dir, "model.onnx", {"handler": {"require_gpu": True}})
    with pytest.raises(RuntimeError) as caught:
        loaded_handler(context)
    assert str(caught.value) == (
        "handler.require_gpu is true but TorchServe assigned no GPU to this worker "
        "(gpu_id is None): give the model GPUs or set require_gpu to false"
    )


@pytest.mark.skipif(CUDA_IN_ORT, reason="this onnxruntime has CUDA")
def test_onnx_backend_reports_the_cpu_it_really_got(image_model_dir):
    backend = backends.load_backend(str(image_model_dir / "model.onnx"), gpu_id=0)
    assert backend.providers == ["CPUExecutionProvider"]
    assert backend.description == (
        f"onnxruntime {ort.__version__} on CPU, providers ['CPUExecutionProvider'], "
        "1 intra-op thread(s)"
    )
    with pytest.raises(RuntimeError) as caught:
        backends.load_backend(
            str(image_model_dir / "model.onnx"), gpu_id=0, require_gpu=True
        )
    assert str(caught.value) == (
        "CUDA device 0 was requested but onnxruntime has ['CPUExecutionProvider'], "
        "and handler.require_gpu is true"
    )


def test_torchscript_backend_runs_on_cpu_without_a_gpu(features_model_dir):
    import torch

    backend = backends.load_backend(str(features_model_dir / "model.pt"), intra_op_threads=2)
    assert backend.description == (
        f"torch {torch.__version__} TorchScript on cpu, 2 intra-op thread(s)"
    )


def test_unknown_model_file_is_refused(tmp_path):
    with pytest.raises(ValueError) as caught:
        backends.load_backend(str(tmp_path / "model.pkl"))
    assert str(caught.value) == (
        "cannot serve 'model.pkl': expected a file ending in one of "
        "('.onnx', '.pt', '.ts', '.torchscript')"
    )
