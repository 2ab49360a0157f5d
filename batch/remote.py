"""--via server: the running TorchServe, several inputs a request (images as {"instances":
[{"b64": ...}, ...]}, raw values as one .npy array, instances as {"instances": [{input name:
value}, ...]}), a bounded number of requests in flight, retries with exponential backoff on
502/503/504, timeouts and refused connections, and a clear BatchError once the retry budget
is spent.

A request with a bad input gets 400 as a whole; its rows are then sent one by one, so that
only the bad row gets the error, with the server's own message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from kiln import client as http
from kiln.batch import columns, scoring
from kiln.batch.chunks import BatchError, Chunk, Scored
from kiln.batch.pipeline import score_chunks
from kiln.batch.scoring import load_instance, read_image
from kiln.handlers import inputs

log = logging.getLogger("kiln.batch")
RETRY_STATUSES = (502, 503, 504)
# TorchServe's answer to the requests a dead worker held (HTTP 507, or 500, while it restarts
# the worker): worth a retry, as inference is idempotent. Any other 5xx is not retried.
WORKER_DIED = "Worker died."


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries in all, the first included
    backoff_s: float = 0.5  # wait after the first failure, doubled after each next one
    max_backoff_s: float = 8.0

    def wait(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))


class ServerScorer:
    def __init__(self, name: str, signature, url: str, token: str | None, batch_size: int,
                 concurrency: int, timeout: float = 30, retry: RetryPolicy | None = None):
        self.name, self.signature, self.url, self.token = name, signature, url, token
        self.layout = columns.layout_for(signature["output"])
        self.request_size = min(batch_size, inputs.MAX_INSTANCES)
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._local = threading.local()

    def score(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, Scored]]:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="kiln-post") as pool:
            yield from score_chunks(chunks, self.request_size, pool, self._score_part,
                                    lambda part, scored: scored, ahead=2 * self.concurrency)

    def close(self) -> None:
        pass

    def _client(self) -> http.Client:
        if not hasattr(self._local, "client"):  # requests.Session is not shared across threads
            self._local.client = http.Client(self.url, self.token, self.timeout)
        return self._local.client

    def _score_part(self, part: Chunk) -> Scored:
        errors = list(part.errors)
        bodies: dict[int, object] = {}  # position -> what one input is sent as
        for i in range(len(part)):
            if errors[i] is not None:
                continue
            if part.paths is not None:
                body, errors[i] = read_image(part.paths[i])
            elif part.instances is not None:
                body, errors[i] = load_instance(part.instances[i])
            else:
                body = part.values[i:i + 1]
            if body is not None:
                bodies[i] = body
        answered: list[dict] = []
        if bodies:
            status, answers = self._post(self._encode(list(bodies.values())))
            if status == 400:  # some input is bad: find out which, one by one
                answers = [self._one(body) for body in bodies.values()]
            elif status != 200:
                raise BatchError(f"{self.url}/predictions/{self.name} answered HTTP {status}: "
                                 f"{str(answers)[:200]}")
            for pos, answer in zip(bodies, answers, strict=True):
                if "error" in answer:
                    errors[pos] = answer["error"]
                else:
                    answered.append(answer)
        positions = [pos for pos in bodies if errors[pos] is None]
        return scoring.scored(part, scoring.Decoded([], positions, errors),
                              columns.from_answers(answered, self.layout), self.layout)

    @staticmethod
    def _encode(items: list) -> tuple[bytes, str]:
        """Several inputs in one body: images, raw values as one .npy array, or instances
        as {"instances": [...]} (each encoded as the client encodes one)."""
        if isinstance(items[0], bytes):
            return http.encode_images(items)
        if isinstance(items[0], dict):
            body = b",".join(http.encode_inputs(item)[0] for item in items)
            return b'{"instances": [' + body + b"]}", "application/json"
        import numpy as np

        return http.encode_npy(np.concatenate(items))

    def _one(self, body) -> dict:
        """One input alone: its answer, or {"error": message} for a 400."""
        if isinstance(body, bytes):
            encoded = http.encode_image(body)
        elif isinstance(body, dict):
            encoded = http.encode_inputs(body)
        else:
            encoded = http.encode_npy(body)
        status, answer = self._post(encoded)
        if status == 400:
            return {"error": answer.get("error", str(answer)) if isinstance(answer, dict)
                    else str(answer)}
        if status != 200:
            raise BatchError(f"{self.url}/predictions/{self.name} answered HTTP {status}: "
                             f"{str(answer)[:200]}")
        return answer[0] if isinstance(answer, list) else answer

    def _post(self, encoded: tuple[bytes, str]):
        """(status, body) of the first answer that is not worth retrying."""
        last = ""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                answer = self._client().predict(self.name, *encoded)
                died = _worker_died(answer)
                if answer.status not in RETRY_STATUSES and not died:
                    return answer.status, answer.body
                last = f"HTTP {answer.status}" + (f" ({WORKER_DIED})" if died else "")
            except (requests.ConnectionError, requests.Timeout) as err:
                last = f"{err.__class__.__name__}: {err}"
            if attempt < self.retry.attempts:
                wait = self.retry.wait(attempt)
                log.warning("%s (try %d of %d); again in %.1f s", last, attempt,
                            self.retry.attempts, wait)
                time.sleep(wait)
        raise BatchError(f"gave up on {self.url}/predictions/{self.name} after "
                         f"{self.retry.attempts} tries: {last[:300]}. Is TorchServe running "
                         "(kiln serve)? Finished chunks are kept: rerun with --resume")


def _worker_died(answer) -> bool:
    return (answer.status in (500, 507) and isinstance(answer.body, dict)
            and answer.body.get("message") == WORKER_DIED)
