"""Kiln's load test: one FastHttpUser per model on /predictions/NAME, one on the Open
Inference Protocol port, every answer checked against the fixture's known label.

Run by `kiln loadtest` (loadtests/run.py) as a subprocess, never imported by Kiln:
    KILN_TOKEN=... KILN_SHAPE=step locust -f loadtests/locustfile.py --headless \\
        --host http://127.0.0.1:8080 --kiln-models lenet --kiln-oip-host http://127.0.0.1:8085
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, between, events, task

from kiln.loadtests import payloads, shapes, thresholds
from kiln.loadtests.locustfile_path import SHAPE_ENV, TOKEN_ENV

log = logging.getLogger("kiln.loadtest")


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--kiln-models", default="lenet",
                        help="comma-separated models to load (default: lenet)")
    parser.add_argument("--kiln-oip-host", default="",
                        help="Open Inference Protocol base URL; empty: no OIP user")
    parser.add_argument("--kiln-max-fail-ratio", type=float, default=None)
    parser.add_argument("--kiln-max-p95-ms", type=float, default=None)
    parser.add_argument("--kiln-max-p99-ms", type=float, default=None)
    parser.add_argument("--kiln-verdict", default="",
                        help="write the threshold checks to this JSON file")


def _models(options) -> list[str]:
    return [m for m in options.kiln_models.split(",") if m]


@events.init.add_listener
def _keep_wanted_users(environment, **_):
    """Only the chosen models' users, and the OIP user only when it has a host."""
    options = environment.parsed_options
    wanted = set(_models(options))
    keep = [u for u in environment.user_classes
            if (u.model in wanted) or (u is OipUser and options.kiln_oip_host)]
    environment.user_classes[:] = keep


class KilnUser(FastHttpUser):
    abstract = True
    model = ""
    wait_time = between(0.05, 0.15)

    def on_start(self):
        token = os.environ.get(TOKEN_ENV, "")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.cycle = itertools.cycle(payloads.rest_payloads(self.model))

    @task
    def predict(self):
        p = next(self.cycle)
        with self.client.post(f"/predictions/{self.model}", data=p.body, catch_response=True,
                              name=f"/predictions/{self.model}",
                              headers={**self.auth, "Content-Type": p.content_type}) as r:
            _judge(r, lambda body: payloads.rest_problem(body, p.label))


class LenetUser(KilnUser):
    model = "lenet"


class MlpUser(KilnUser):
    model = "mlp"


class RnnUser(KilnUser):
    model = "rnn"


class BinaryUser(KilnUser):
    model = "binary"


class OipUser(FastHttpUser):
    """KServe v2 infer on the OIP port, taking turns over the chosen models."""

    model = "oip"
    wait_time = between(0.05, 0.15)
    host = "http://unset"  # replaced in on_start by --kiln-oip-host

    def on_start(self):
        token = os.environ.get(TOKEN_ENV, "")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.base = self.environment.parsed_options.kiln_oip_host.rstrip("/")
        models = _models(self.environment.parsed_options)
        self.cycle = itertools.cycle([(m, p) for m in models for p in payloads.oip_payloads(m)])

    @task
    def infer(self):
        model, p = next(self.cycle)
        with self.client.post(f"{self.base}/v2/models/{model}/infer", data=p.body,
                              catch_response=True, name=f"/v2/models/{model}/infer",
                              headers={**self.auth, "Content-Type": p.content_type}) as r:
            _judge(r, lambda body: payloads.oip_problem(body, model, p.label))


def _judge(response, problem_of) -> None:
    """Marks the response failed unless it is a 200 with the right JSON answer."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {(response.text or '')[:120]}")
        return
    try:
        body = response.json()
    except ValueError:
        response.failure(f"not JSON: {(response.text or '')[:120]}")
        return
    problem = problem_of(body)
    if problem:
        response.failure(problem)
    else:
        response.success()


class _KilnShape(LoadTestShape):
    """A profile from loadtests/shapes.py on --users, --spawn-rate and --run-time; the one
    whose name is in $KILN_SHAPE is the run's shape (the others stay abstract)."""

    abstract = True
    use_common_options = True
    profile = "constant"

    def tick(self):
        o = self.runner.environment.parsed_options
        p = shapes.Profile(o.num_users or 1, o.spawn_rate or 1.0, float(o.run_time or 60))
        return shapes.users_at(self.profile, p, self.get_run_time())


def _chosen(profile: str) -> bool:
    return os.environ.get(SHAPE_ENV, "constant") == profile


class ConstantShape(_KilnShape):
    abstract = not _chosen("constant")
    profile = "constant"


class StepShape(_KilnShape):
    abstract = not _chosen("step")
    profile = "step"


class SpikeShape(_KilnShape):
    abstract = not _chosen("spike")
    profile = "spike"


@events.quitting.add_listener
def _verdict(environment, **_):
    """The thresholds decide the exit code: 0 when all held, 1 otherwise."""
    o = environment.parsed_options
    total = environment.stats.total
    limits = thresholds.Thresholds(o.kiln_max_fail_ratio, o.kiln_max_p95_ms, o.kiln_max_p99_ms)
    checks = thresholds.evaluate(limits, total.num_requests, total.fail_ratio,
                                 total.get_response_time_percentile(0.95) or float("nan"),
                                 total.get_response_time_percentile(0.99) or float("nan"))
    for c in checks:
        log.info("threshold %s %s: %g (%s)", c.name, c.limit, c.actual,
                 "held" if c.held else "FAILED")
    environment.process_exit_code = 0 if thresholds.passed(checks) else 1
    if o.kiln_verdict:
        Path(o.kiln_verdict).write_text(json.dumps([asdict(c) for c in checks], indent=1))
