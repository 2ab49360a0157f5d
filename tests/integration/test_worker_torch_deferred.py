"""An ONNX worker of kiln serve never loads torch: not at start, not for an answer, not for a
bad request (deploy/worker_site/sitecustomize.py; about 140 MiB of PSS per worker)."""

import psutil

from kiln import declaration


def torch_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any("libtorch" in line for line in maps)


def worker_pids(server, name):
    return [int(w["pid"]) for w in server.model_status(name)]


def test_served_onnx_workers_answer_without_torch(server, client):
    for name in server.settings.models:
        example = declaration.get(name).examples[0]
        answer = (client.predict_file(name, example.file) if example.file is not None
                  else client.predict_json(name, example.value))
        assert answer.status == 200, answer.body
        assert client.predict_json(name, "not an input").status == 400
    for name in server.settings.models:
        for pid in worker_pids(server, name):
            assert psutil.Process(pid).is_running()
            assert not torch_mapped(pid), f"{name}'s worker {pid} loaded torch"
