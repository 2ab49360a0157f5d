"""Model versions on gRPC (issue 18): Kiln's plugin serves TorchServe's InferenceAPIsService
behind the front proxy, so that unpinned calls follow the model's route and shadows, a call
pinned to a retired version is NOT_FOUND, and every answer names its version in its metadata,
as REST and OIP answers do in a header."""

import time

import pytest
from test_model_versions import (  # noqa: F401  (fixtures)
    MODEL,
    SEVEN,
    STEADY,
    batches_by_version,
    retire_in_the_file,
    routed,
    two_versions,
    write_route,
)

from kiln.client import Answer, encode_file
from kiln.deploy import lifecycle, shadowing, versions
from kiln.deploy.server import Server
from kiln.grpc_client import GrpcClient

BODY = encode_file(SEVEN)


@pytest.fixture(scope="module")
def stub_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("grpc-stubs")


@pytest.fixture(scope="module")
def rpc(two_versions, stub_cache):  # noqa: F811
    """A client of the front proxy's gRPC port, with an inference key."""
    with GrpcClient(f"127.0.0.1:{two_versions.ports.grpc_inference}",
                    two_versions.keys()["inference"], cache_root=stub_cache) as client:
        yield client


def sync(srv: Server) -> None:
    """The plugin routes by versions.json as written (kiln's admin commands do the same)."""
    lifecycle.Target.of(srv.run_dir, srv.run_dir).sync_routes()


def routed_to(srv: Server, route: dict[str, int]) -> None:
    write_route(srv, route)
    sync(srv)


def test_answers_name_the_version_that_gave_them(rpc):
    """Without a versions file: the default version, as TorchServe's ModelManager says."""
    unpinned = rpc.predict(MODEL, *BODY)
    pinned = rpc.predict(MODEL, *BODY, version="2.0")
    assert (unpinned.status, unpinned.body["label"], unpinned.version) == (200, "7", "1.0")
    assert (pinned.status, pinned.body["label"], pinned.version) == (200, "7", "2.0")
    assert (unpinned.shadowed, pinned.shadowed) == (None, None)


def test_a_handler_error_names_its_version_too(rpc):
    answer = rpc.predict(MODEL, b"hello", "application/octet-stream", version="2.0")
    assert answer == Answer(400, {"error": "not a PNG or JPEG image and not JSON", "code": 400})
    assert answer.version == "2.0"


def test_unpinned_calls_follow_the_route(routed, rpc):  # noqa: F811
    """1.0=0 2.0=100: every unpinned call is 2.0's, by the metadata and by 2.0's own batch
    count (Kiln's handler counts its batches per version)."""
    routed_to(routed, {"1.0": 0, "2.0": 100})
    before = batches_by_version(routed)
    answers = [rpc.predict(MODEL, *BODY) for _ in range(STEADY)]
    after = batches_by_version(routed)
    assert {(a.status, a.body["label"], a.version) for a in answers} == {(200, "7", "2.0")}
    assert after["2.0"] - before.get("2.0", 0) == STEADY
    assert after.get("1.0", 0) == before.get("1.0", 0)


def test_a_routing_key_always_lands_on_the_same_version(routed, rpc):  # noqa: F811
    routed_to(routed, {"1.0": 50, "2.0": 50})
    seen = {key: {rpc.predict(MODEL, *BODY, routing_key=key).version for _ in range(3)}
            for key in (f"user-{i}" for i in range(20))}
    assert all(len(found) == 1 for found in seen.values()), seen
    assert {v for found in seen.values() for v in found} == {"1.0", "2.0"}


def test_a_call_pinned_to_a_retired_version_is_not_found(routed, rpc):  # noqa: F811
    retire_in_the_file(routed, "2.0")
    answer = rpc.predict(MODEL, *BODY, version="2.0")
    assert answer == Answer(404, {
        "code": 404, "type": "NOT_FOUND",
        "message": f"model '{MODEL}' version '2.0' is not served: it is not in the versions "
                   "file (retired)"})
    assert answer.version is None
    # The version the file records is served as before.
    assert rpc.predict(MODEL, *BODY, version="1.0").version == "1.0"


def shadow_figures(srv: Server) -> shadowing.Figures:
    return shadowing.read(srv.url("metrics")).get((MODEL, "2.0"), shadowing.Figures())


def scored(srv: Server, before: shadowing.Figures, count: int) -> shadowing.Figures:
    """2.0's figures once `count` more calls were scored than `before` (each pair is scored
    after its client got its answer)."""
    deadline = time.monotonic() + 30
    while True:
        now = shadow_figures(srv)
        if now.outcomes.get("scored", 0) - before.outcomes.get("scored", 0) >= count:
            return now
        assert time.monotonic() < deadline, f"never scored {count}: {now.outcomes}"
        time.sleep(0.1)


def test_shadowed_calls_are_scored_and_say_so(routed, rpc):  # noqa: F811
    """2.0 shadowing every call routed to 1.0: each answer is 1.0's, marked, and counted in
    the shadow figures REST and OIP feed (the two versions share their weights: all agree)."""
    write_route(routed, None)
    with versions.transaction(routed.run_dir) as state:
        versions.set_shadow(state, MODEL, "2.0", 1.0)
    sync(routed)
    before = shadow_figures(routed)
    n = 12
    answers = [rpc.predict(MODEL, *BODY) for _ in range(n)]
    after = scored(routed, before, n)
    assert {(a.status, a.body["label"], a.version, a.shadowed) for a in answers} == {
        (200, "7", "1.0", "2.0")}
    assert {k: v - before.outcomes.get(k, 0) for k, v in after.outcomes.items()
            if v != before.outcomes.get(k, 0)} == {"scored": n}
    assert (after.rows - before.rows, after.agreed - before.agreed) == (n, n)
    assert after.latency["candidate"][1] - before.latency["candidate"][1] == n


@pytest.mark.parametrize("token", [None, "nope", "management"])
def test_the_internal_port_demands_torchserve_s_inference_token(two_versions, stub_cache,  # noqa: F811
                                                               token):
    """Behind the front proxy, which sends the token; any other local process has none."""
    internal = f"127.0.0.1:{two_versions.settings.internal_ports.kiln_grpc}"
    keys = two_versions.torchserve_keys()
    with GrpcClient(internal, keys.get(token, token), cache_root=stub_cache) as refused:
        assert refused.predict(MODEL, *BODY) == Answer(401, {
            "code": 401, "type": "UNAUTHENTICATED",
            "message": "no valid inference token (authorization: Bearer TOKEN)"})
    with GrpcClient(internal, keys["inference"], cache_root=stub_cache) as allowed:
        assert allowed.predict(MODEL, *BODY).version == "1.0"
