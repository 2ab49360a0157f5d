"""Kiln's load test: one FastHttpUser per model on /predictions/NAME, one on the Open
Inference Protocol port, every answer checked against the model's declared examples.

Run by `kiln loadtest` (loadtests/run.py) as a subprocess, never imported by Kiln:
    KILN_TOKEN=... KILN_SHAPE=step locust -f loadtests/locustfile.py --headless \\
        --host http://127.0.0.1:8080 --kiln-models NAME --kiln-oip-host http://127.0.0.1:8085
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, between, events, task

from kiln import declaration
from kiln.loadtests import declared, payloads, shapes, thresholds
from kiln.loadtests.locustfile_path import SHAPE_ENV, TOKEN_ENV

log = logging.getLogger("kiln.loadtest")
CANNOT_RUN = 2  # as run.py reports a run that could not start


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--kiln-models", default="",
                        help="comma-separated declared models to load (default: the first of "
                             "Kiln's default set)")
    parser.add_argument("--kiln-models-dirs", default="",
                        help=f"more folders of model declarations, {os.pathsep!r}-separated")
    parser.add_argument("--kiln-oip-host", default="",
                        help="Open Inference Protocol base URL; empty: no OIP user")
    parser.add_argument("--kiln-max-fail-ratio", type=float, default=None)
    parser.add_argument("--kiln-max-p95-ms", type=float, default=None)
    parser.add_argument("--kiln-max-p99-ms", type=float, default=None)
    parser.add_argument("--kiln-verdict", default="",
                        help="write the threshold checks to this JSON file")


def _declarations(options) -> list[declaration.Declaration]:
    dirs = [Path(d) for d in options.kiln_models_dirs.split(os.pathsep) if d]
    names = [m for m in options.kiln_models.split(",") if m] or [declared.default_name()]
    return [declaration.get(name, dirs) for name in names]


@events.init.add_listener
def _users_of_the_chosen_models(environment, **_):
    """A user class per chosen model, made from its declaration; the OIP user only when it
    has a host and a chosen model takes raw arrays."""
    options = environment.parsed_options
    try:
        decls = _declarations(options)
        users = [_rest_user(d.name, payloads.rest_payloads(d)) for d in decls]
        oip = [(d.name, p) for d in decls for p in payloads.oip_payloads(d)]
    except (ValueError, OSError) as err:  # DeclarationError is a ValueError
        log.error("%s", err)
        raise SystemExit(CANNOT_RUN) from None
    if options.kiln_oip_host and oip:
        OipUser.bodies = oip
        users.append(OipUser)
    environment.user_classes[:] = users


class KilnUser(FastHttpUser):
    abstract = True
    model = ""
    bodies: list[payloads.Payload] = []
    wait_time = between(0.05, 0.15)

    def on_start(self):
        token = os.environ.get(TOKEN_ENV, "")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.cycle = itertools.cycle(self.bodies)

    @task
    def predict(self):
        p = next(self.cycle)
        with self.client.post(f"/predictions/{self.model}", data=p.body, catch_response=True,
                              name=f"/predictions/{self.model}",
                              headers={**self.auth, "Content-Type": p.content_type}) as r:
            _judge(r, lambda body: payloads.rest_problem(body, p.label))


def _rest_user(model: str, bodies: list[payloads.Payload]) -> type[KilnUser]:
    return type(f"{model}_user", (KilnUser,), {"model": model, "bodies": bodies})


class OipUser(FastHttpUser):
    """KServe v2 infer on the OIP port, taking turns over the chosen models."""

    bodies: list[tuple[str, payloads.Payload]] = []  # (model, payload), set at init
    wait_time = between(0.05, 0.15)
    host = "http://unset"  # replaced in on_start by --kiln-oip-host

    def on_start(self):
        token = os.environ.get(TOKEN_ENV, "")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.base = self.environment.parsed_options.kiln_oip_host.rstrip("/")
        self.cycle = itertools.cycle(self.bodies)

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
