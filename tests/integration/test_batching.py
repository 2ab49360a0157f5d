"""Server-side batching never punishes a neighbour: concurrent good and bad requests share
batches, and every single answer is checked."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIGITS = {d: (FIXTURES / "digits" / f"{d}.png").read_bytes() for d in "0123456789"}
ROWS = json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())


def lenet_cases():
    """(body, content type, expected status, expected label or error) x 96, interleaved."""
    cases = []
    for i in range(96):
        digit = str(i % 10)
        if i % 4 == 3:
            cases.append((b"not an image %d" % i, "application/octet-stream", 400,
                          "not a PNG or JPEG image and not JSON"))
        elif i % 4 == 2:
            pixels = np.asarray(Image.open(FIXTURES / "digits" / f"{digit}.png")).tolist()
            cases.append((json.dumps(pixels).encode(), "application/json", 200, digit))
        else:
            cases.append((DIGITS[digit], "image/png", 200, digit))
    return cases


def fire(server, client, model, cases, threads=16):
    url = f"{server.url('inference')}/predictions/{model}"

    def one(case):
        body, ctype, _, _ = case
        r = requests.post(url, data=body, timeout=60, headers={
            "Content-Type": ctype, "Authorization": f"Bearer {client.token}"})
        return r.status_code, r.json(), int(r.headers["Kiln-Batch-Size"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, cases))


def check(cases, answers):
    shared_with_bad = 0
    for (_, _, status, expected), (got_status, body, batch) in zip(cases, answers, strict=True):
        assert got_status == status, body
        if status == 200:
            assert body["label"] == expected
        else:
            assert body == {"error": expected, "code": 400}
            shared_with_bad += batch > 1
    return shared_with_bad


def test_mixed_concurrent_requests_each_get_their_own_answer(server, client):
    cases = lenet_cases()
    answers = fire(server, client, "lenet", cases)
    # Batching really happened, and bad requests rode in batches with good ones.
    assert max(batch for _, _, batch in answers) > 1
    assert check(cases, answers) > 0


def test_mixed_concurrent_feature_rows(server, client):
    cases = []
    for i in range(64):
        row = ROWS[i % len(ROWS)]
        if i % 3 == 2:
            bad = dict(zip([f"f{j}" for j in range(30)], row["features"], strict=True))
            cases.append((json.dumps(bad).encode(), "application/json", 400, None))
        else:
            cases.append((json.dumps(row["features"]).encode(), "application/json", 200,
                          row["label"]))
    answers = fire(server, client, "binary", cases)
    for (_, _, status, label), (got, body, _) in zip(cases, answers, strict=True):
        assert got == status, body
        if status == 200:
            assert body["label"] == label
        else:
            assert body["error"].startswith("expected 30 features, got 30: missing 'mean radius'")
    assert max(batch for _, _, batch in answers) > 1


def test_several_inputs_in_one_request_come_back_in_order(server, client):
    order = "9081726354"
    images = [np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png")).tolist() for d in order]
    answer = client.predict_json("lenet", images)
    assert answer.status == 200, answer.body
    assert [a["label"] for a in answer.body] == list(order)
    rows = client.predict_json("binary", [r["features"] for r in ROWS])
    assert [a["label"] for a in rows.body] == [r["label"] for r in ROWS]


def test_npy_body_scores_a_whole_batch(server, client):
    import io

    order = "3141592653"
    stack = np.stack([np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png")) for d in order])
    buf = io.BytesIO()
    np.save(buf, stack)
    answer = client.predict("mlp", buf.getvalue(), "application/x-npy")
    assert answer.status == 200, answer.body
    assert [a["label"] for a in answer.body] == list(order)
