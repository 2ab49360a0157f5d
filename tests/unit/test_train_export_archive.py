"""Training --dry-run, --resume, the export parity gate and the archive, on real (tiny) runs."""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from kiln import declaration, layout, workspace
from kiln.model_store import archive, archived_digest, build
from kiln.training import export, train


def run_train(name, out, log_dir, *extra):
    return train.train(train.config_for(
        [name, "--out", str(out), "--log-dir", str(log_dir), *extra]))


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """A one-batch model each for an image and a features model: fixed weights (seed 0)."""
    root = tmp_path_factory.mktemp("workspace") / "artifacts"  # a workspace's exports
    for name in ("lenet", "binary"):
        run_train(name, root / name, root / "runs", "--dry-run")
    return root


@pytest.mark.parametrize("name", ["lenet", "binary"])
def test_dry_run_writes_loadable_weights_and_meta(dry_runs, name):
    state = torch.load(dry_runs / name / "state_dict.pt", weights_only=True)
    model = declaration.get(name).build()
    model.load_state_dict(state)  # strict: every key, every shape
    meta = json.loads((dry_runs / name / "meta.json").read_text())
    assert meta["name"] == name and meta["seed"] == 0
    assert meta["hyperparameters"]["dry_run"] is True
    assert len(meta["history"]) == 1
    assert 0.0 <= meta["metrics"]["test_accuracy"] <= 1.0
    assert meta["split_sizes"]["test"] == (1000 if name == "lenet" else 114)
    assert list((dry_runs / "runs" / name).iterdir())  # TensorBoard wrote an event folder


def test_training_is_reproducible_with_a_seed(tmp_path):
    a = run_train("binary", tmp_path / "a", tmp_path / "runs", "--epochs", "2")
    b = run_train("binary", tmp_path / "b", tmp_path / "runs", "--epochs", "2")
    sa = torch.load(tmp_path / "a" / "state_dict.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "state_dict.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    flags = ["--epochs", "4", "--optimizer", "sgd", "--lr", "0.01"]
    straight = run_train("binary", tmp_path / "straight", tmp_path / "runs", *flags)

    real_save = torch.save

    def save_then_crash_after_epoch_2(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if str(path).endswith("checkpoint.pt") and obj["epoch"] == 2:
            raise KeyboardInterrupt  # the run dies right after its epoch-2 checkpoint

    monkeypatch.setattr(train.torch, "save", save_then_crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_train("binary", tmp_path / "crashed", tmp_path / "runs", *flags)
    monkeypatch.setattr(train.torch, "save", real_save)
    assert not (tmp_path / "crashed" / "state_dict.pt").exists()

    resumed = run_train("binary", tmp_path / "crashed", tmp_path / "runs", *flags, "--resume")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    a = torch.load(tmp_path / "straight" / "state_dict.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "state_dict.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed["metrics"]["test_accuracy"] == straight["metrics"]["test_accuracy"]


def test_a_dry_run_never_replaces_trained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.ENV, str(tmp_path))
    trained = tmp_path / "artifacts" / "binary"
    run_train("binary", trained, tmp_path / "runs", "--epochs", "1")
    weights = {f: (trained / f).read_bytes() for f in ("state_dict.pt", "meta.json")}

    assert train.main(["binary", "--dry-run", "--log-dir", str(tmp_path / "runs")]) == 0
    smoke = json.loads((trained / "dry-run" / "meta.json").read_text())
    assert smoke["hyperparameters"]["dry_run"] is True
    with pytest.raises(SystemExit, match="holds the weights of a full run"):
        run_train("binary", trained, tmp_path / "runs", "--dry-run")
    assert {f: (trained / f).read_bytes() for f in weights} == weights


@pytest.mark.parametrize("name", ["lenet", "binary"])
def test_export_passes_parity_and_writes_the_signature(dry_runs, name):
    sig = export.export(name, dry_runs / name)
    (graph_input,) = sig["inputs"]
    assert sig["signature_version"] == 2
    if name == "lenet":
        assert {k: v for k, v in graph_input.items() if k not in ("mean", "std")} == {
            "name": "input", "kind": "image", "dtype": "float32", "shape": [-1, 1, 32, 32],
            "channels": 1, "size": [28, 28], "resize": "mnist", "pad": 2, "pixel_max": 255}
        assert sig["output"] == {"name": "probabilities", "dtype": "float32", "shape": [-1, 10],
                                 "kind": "multiclass", "labels": list("0123456789"),
                                 "top_k": 3}
    else:
        assert graph_input["shape"] == [-1, 30] and len(graph_input["names"]) == 30
        assert sig["output"] == {"name": "probabilities", "dtype": "float32", "shape": [-1, 1],
                                 "kind": "binary", "labels": ["malignant", "benign"],
                                 "threshold": 0.5}
    for form in ("onnx", "torchscript"):
        p = sig["parity"][form]
        assert p["max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
        assert p["samples"] == (1000 if name == "lenet" else 114) + 1 + export.RANDOM_ROWS
    # The training split's reference statistics, for the handler's drift scores.
    reference = sig["reference"]
    stats = reference["inputs"]["input"]
    if name == "lenet":
        assert reference["rows"] == 3500 and list(stats) == ["intensity", "ink"]
        assert list(reference["labels"]) == list("0123456789")
    else:
        assert reference["rows"] == 398 and list(stats) == graph_input["names"]
        assert reference["labels"] == {"malignant": 149 / 398, "benign": 249 / 398}
    assert all(len(s["ratios"]) == len(s["edges"]) + 1 for s in stats.values())
    assert (dry_runs / name / "model.onnx").stat().st_size > 0
    assert not (dry_runs / name / "model.onnx.data").exists()  # weights inside the file
    assert json.loads((dry_runs / name / "signature.json").read_text()) == sig


def test_parity_gate_refuses_a_drifting_export(dry_runs, monkeypatch, tmp_path):
    folder = tmp_path / "binary"
    folder.mkdir()
    for f in ("state_dict.pt", "meta.json"):
        (folder / f).write_bytes((dry_runs / "binary" / f).read_bytes())
    real = export.run_onnx
    monkeypatch.setitem(export.RUNNERS, "onnx", lambda path, xs, names: real(path, xs, names)
                        + 2e-4)
    with pytest.raises(export.ParityError, match=r"onnx: max \|diff\| 0\.0002"):
        export.export("binary", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "state_dict.pt"]


def test_compare_reports_exact_figures():
    ref = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).numpy()
    cand = torch.tensor([[0.4, 0.6], [0.2, 0.8]]).numpy()
    p = export.compare({"kind": "multiclass"}, ref, cand)
    assert (p.max_abs_diff, p.top1_agreement, p.samples) == (pytest.approx(0.5), 0.5, 2)
    assert not p.passed


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_archive_is_self_describing(dry_runs, tmp_path, backend):
    export.export("binary", dry_runs / "binary")
    cfg = archive.ArchiveConfig(response_timeout_s=45, top_k=2)
    mar = archive.build("binary", backend, cfg, dry_runs / "binary", tmp_path)
    assert mar == tmp_path / "binary.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
        labels = json.loads(z.read("index_to_name.json"))
        metadata = json.loads(z.read("oip-metadata.json"))
    serialized = export.FORMS[backend]
    # Of Kiln only what a worker imports: the root's __init__ and the serving core, laid out
    # as installed; nothing of training, batch, loadtests, deploy, cli or the root's modules.
    core = layout.package_folder("kiln.handlers")
    handlers = {f"kiln/handlers/{p.name}" for p in core.glob("*.py")}
    assert names == {"kiln_handler.py", "signature.json", "binary.py", serialized,
                     "model-config.yaml", "index_to_name.json", "MAR-INF/MANIFEST.json",
                     "oip-metadata.json", "kiln/__init__.py", *handlers}
    assert {"kiln/handlers/handler.py", "kiln/handlers/rest.py"} <= handlers
    assert manifest["model"]["serializedFile"] == serialized
    assert manifest["model"]["handler"] == "kiln_handler.py"
    assert manifest["model"]["modelFile"] == "binary.py"
    # Workers and batching are kiln serve's: TorchServe would let any here win over it.
    # The sha256 of the exported graph and weights: a (name, version) is one model.
    digest = hashlib.sha256((dry_runs / "binary" / serialized).read_bytes()).hexdigest()
    assert config == {"responseTimeout": 45, "handler": {"top_k": 2, "intra_op_threads": "auto",
                                                         "require_gpu": False},
                      "kiln": {"weights_digest": digest}}
    assert archived_digest(mar) == digest
    assert labels == {"0": "malignant", "1": "benign"}
    # What the OIP plugin serves, built once here from the signature (the plugin builds none).
    assert metadata == {"platform": "kiln",
                        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
                        "outputs": [{"name": "probabilities", "datatype": "FP32",
                                     "shape": [-1, 2]},
                                    {"name": "label", "datatype": "BYTES", "shape": [-1]}]}



def test_ensure_built_rebuilds_an_archive_shipping_more_of_kiln(dry_runs, tmp_path,
                                                                 monkeypatch):
    export.export("binary", dry_runs / "binary")
    monkeypatch.setenv(workspace.ENV, str(dry_runs.parent))
    mar = archive.build("binary", "onnx", artifacts=dry_runs / "binary", store=tmp_path)
    with zipfile.ZipFile(mar, "a") as z:  # as archives were built before: the whole root
        z.writestr("kiln/training/train.py", "")
    # Newer than every input, so only what it ships can make it stale.
    assert build.ensure_built("binary", "onnx", tmp_path) == mar
    with zipfile.ZipFile(mar) as z:
        shipped = {name for name in z.namelist() if name.startswith("kiln/")}
    assert "kiln/training/train.py" not in shipped
    assert shipped == set(layout.worker_files())


def test_ensure_built_rebuilds_an_archive_without_oip_metadata(dry_runs, tmp_path, monkeypatch):
    """An archive from before the plugin read its metadata from the archive would get 404s."""
    export.export("binary", dry_runs / "binary")
    monkeypatch.setenv(workspace.ENV, str(dry_runs.parent))
    mar = archive.build("binary", "onnx", artifacts=dry_runs / "binary", store=tmp_path)
    with zipfile.ZipFile(mar) as z:
        kept = {name: z.read(name) for name in z.namelist() if name != "oip-metadata.json"}
    with zipfile.ZipFile(mar, "w") as z:  # the same archive, less the file
        for name, data in kept.items():
            z.writestr(name, data)
    assert build.ensure_built("binary", "onnx", tmp_path) == mar
    with zipfile.ZipFile(mar) as z:
        assert json.loads(z.read("oip-metadata.json"))["inputs"] == [
            {"name": "input", "datatype": "FP32", "shape": [-1, 30]}]


def test_ensure_built_rebuilds_an_archive_without_a_weights_digest(dry_runs, tmp_path,
                                                                   monkeypatch):
    """An archive from before the digest could not tell a deploy which weights it holds."""
    export.export("binary", dry_runs / "binary")
    monkeypatch.setenv(workspace.ENV, str(dry_runs.parent))
    mar = archive.build("binary", "onnx", artifacts=dry_runs / "binary", store=tmp_path)
    with zipfile.ZipFile(mar) as z:
        kept = {name: z.read(name) for name in z.namelist()}
    config = yaml.safe_load(kept["model-config.yaml"])
    del config["kiln"]
    kept["model-config.yaml"] = yaml.safe_dump(config)
    with zipfile.ZipFile(mar, "w") as z:  # the same archive, as built before the digest
        for name, data in kept.items():
            z.writestr(name, data)
    assert archived_digest(mar) is None
    assert build.ensure_built("binary", "onnx", tmp_path) == mar
    assert archived_digest(mar) == archive.weights_digest(dry_runs / "binary" / "model.onnx")


def test_ensure_built_exports_again_a_signature_without_reference(dry_runs, tmp_path,
                                                                  monkeypatch):
    """An export from before the reference statistics would serve without drift scores."""
    export.export("binary", dry_runs / "binary")
    monkeypatch.setenv(workspace.ENV, str(dry_runs.parent))
    path = dry_runs / "binary" / "signature.json"
    signature = json.loads(path.read_text())
    del signature["reference"]
    path.write_text(json.dumps(signature))  # newer than every input: only its content says
    build.ensure_built("binary", "onnx", tmp_path)
    assert json.loads(path.read_text())["reference"]["rows"] == 398


def test_a_versioned_archive_sits_beside_the_default_one(dry_runs, tmp_path, monkeypatch):
    export.export("binary", dry_runs / "binary")
    monkeypatch.setenv(workspace.ENV, str(dry_runs.parent))
    default = build.ensure_built("binary", "onnx", tmp_path)
    versioned = build.ensure_built("binary", "onnx", tmp_path, version="2.0")
    assert (default.name, versioned.name) == ("binary.mar", "binary-2.0.mar")
    with zipfile.ZipFile(versioned) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    # The model keeps its name: TorchServe serves both as versions of one model.
    assert (manifest["model"]["modelName"], manifest["model"]["modelVersion"]) == ("binary",
                                                                                   "2.0")
    assert archived_digest(versioned) == archived_digest(default)


def test_ensure_built_keeps_what_kiln_archive_chose(dry_runs, tmp_path, monkeypatch, caplog):
    export.export("binary", dry_runs / "binary")
    monkeypatch.setenv(workspace.ENV, str(dry_runs.parent))
    options = {"top_k": 2, "intra_op_threads": 1, "require_gpu": True}
    decl = declaration.get("binary")
    chosen = archive.config_for(decl, response_timeout_s=45, **options)
    mar = archive.build("binary", "torchscript", chosen, dry_runs / "binary", tmp_path)
    built_at = mar.stat().st_mtime_ns

    # A plain kiln serve: nothing it is made from changed, so it is served as it is.
    assert build.ensure_built("binary", None, tmp_path) == mar
    assert mar.stat().st_mtime_ns == built_at
    digests = {form: archive.weights_digest(dry_runs / "binary" / f)
               for form, f in export.FORMS.items()}
    assert build.archive_manifest(mar)[:2] == (
        "torchscript", archive.model_config(chosen, digests["torchscript"]))

    # Older than its inputs: rebuilt with its backend and handler options; the response
    # timeout is the declaration's again.
    os.utime(mar, ns=(0, 0))
    build.ensure_built("binary", None, tmp_path)
    kept = archive.config_for(decl, **options)
    assert kept.response_timeout_s != 45
    assert build.archive_manifest(mar)[:2] == ("torchscript",
                                               archive.model_config(kept, digests["torchscript"]))

    # kiln serve --backend onnx: rebuilt with it, said in one line.
    caplog.clear()
    build.ensure_built("binary", "onnx", tmp_path)
    assert build.archive_manifest(mar)[:2] == ("onnx", archive.model_config(kept,
                                                                           digests["onnx"]))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"binary: {mar} holds the torchscript export; rebuilding it with --backend onnx"]


def test_archive_refuses_an_export_outside_the_gate(dry_runs, tmp_path):
    folder = tmp_path / "binary"
    folder.mkdir()
    for f in ("model.onnx", "signature.json"):
        (folder / f).write_bytes((dry_runs / "binary" / f).read_bytes())
    export.export("binary", dry_runs / "binary")
    sig = json.loads((dry_runs / "binary" / "signature.json").read_text())
    sig["parity"]["onnx"]["top1_agreement"] = 0.99
    (folder / "signature.json").write_text(json.dumps(sig))
    with pytest.raises(archive.ArchiveError, match="failed the parity gate"):
        archive.build("binary", "onnx", artifacts=folder, store=tmp_path / "store")
    assert not (tmp_path / "store" / "binary.mar").exists()


# Run in a virtual environment that has Kiln's dependencies but not Kiln: the worker finds
# `kiln` and its serving core inside the model folder, nothing from the checkout, and no
# other part of Kiln at all.
SERVE_FROM_ARCHIVE = textwrap.dedent("""
    import importlib.util, json, sys
    model_dir = sys.argv[1]
    sys.path.insert(0, model_dir)  # what TorchServe does for a worker
    from ts.context import Context, RequestProcessor
    import kiln_handler
    origins = {name: importlib.util.find_spec(name).origin for name in ("kiln", "kiln.handlers")}
    manifest = json.load(open(model_dir + "/MAR-INF/MANIFEST.json"))
    context = Context("binary", model_dir, manifest, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor({})]
    handler = kiln_handler.Handler()
    handler.initialize(context)
    row = json.load(open(sys.argv[2]))
    answer = json.loads(handler.handle([{"body": json.dumps(row).encode()}], context)[0])
    parts = ("kiln.training", "kiln.batch", "kiln.loadtests", "kiln.deploy", "kiln.cli")
    print(json.dumps({
        "answer": answer, "origins": origins,
        "imported": sorted(name for name in sys.modules if name.split(".")[0] == "kiln"),
        "findable": [name for name in parts if importlib.util.find_spec(name) is not None],
    }))
""")


def test_archive_serves_in_a_venv_without_kiln(dry_runs, tmp_path):
    export.export("binary", dry_runs / "binary")
    mar = archive.build("binary", "onnx", artifacts=dry_runs / "binary", store=tmp_path)
    model_dir = tmp_path / "model"
    with zipfile.ZipFile(mar) as z:
        z.extractall(model_dir)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # A path line in a .pth adds the folder but runs none of its own .pth files, so Kiln's
    # editable-install hook in the project's site-packages stays off.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import kiln"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert "No module named 'kiln'" in probe.stderr
    fixture = Path(__file__).parents[1] / "fixtures" / "breast_cancer" / "benign.json"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", SERVE_FROM_ARCHIVE,
                           str(model_dir), str(fixture)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(seen["answer"]) == {"label", "probability"}
    assert seen["origins"] == {"kiln": str(model_dir / "kiln" / "__init__.py"),
                               "kiln.handlers": str(model_dir / "kiln/handlers/__init__.py")}
    assert seen["findable"] == []
    # Every module of Kiln the archive ships is imported to answer, and no other.
    shipped = sorted(str(p.relative_to(model_dir).with_suffix("")).replace("/", ".")
                     .removesuffix(".__init__") for p in (model_dir / "kiln").rglob("*.py"))
    assert seen["imported"] == shipped
