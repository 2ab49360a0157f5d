"""KServe's Python SDK as the tests call it, each call in an interpreter of its own.

`import kserve` adds KServe's grpc_predict_v2.proto to protobuf's default descriptor pool, and
`import tritonclient.grpc` adds Triton's grpc_service.proto, which defines the same messages
(inference.ModelInferRequest, ...): one process cannot import both (TypeError: duplicate
symbol 'inference.ServerLiveRequest'), and the tests use both. The functions here run in a
spawned interpreter (call()), so the test process never imports kserve; they take and return
plain values (numpy arrays, lists, tuples)."""

from __future__ import annotations

import asyncio
import multiprocessing


def call(function, *args):
    """function(*args) in a fresh interpreter; its exceptions are raised here."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _inputs(arrays: dict, binary: bool) -> list:
    from kserve import InferInput
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return tensors


def rest_probe(base: str, headers: dict, models: list[str]) -> tuple:
    """(server live, server ready, [each model ready], an unknown model ready)."""
    from kserve import InferenceRESTClient, RESTConfig

    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            return (await client.is_server_live(base, headers=dict(headers)),
                    await client.is_server_ready(base, headers=dict(headers)),
                    [await client.is_model_ready(base, m, headers=dict(headers)) for m in models],
                    await client.is_model_ready(base, "nope", headers=dict(headers)))
        finally:
            await client.close()

    return asyncio.run(run())


def rest_infer(base: str, headers: dict, model: str, arrays: dict, binary: bool,
               model_name: str | None = None):
    """(model_name, {output name: array}) of the SDK's REST answer; (status, JSON body) of an
    HTTP error instead (httpx's exception does not cross processes)."""
    import httpx
    from kserve import InferenceRESTClient, InferRequest, RESTConfig

    request = InferRequest(model_name=model_name or model, infer_inputs=_inputs(arrays, binary))

    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            return await client.infer(base, request, model_name=model, headers=dict(headers))
        finally:
            await client.close()

    try:
        answer = asyncio.run(run())
    except httpx.HTTPStatusError as err:
        return err.response.status_code, err.response.json()
    return answer.model_name, {o.name: o.as_numpy() for o in answer.outputs}


def grpc_probe(target: str, metadata: tuple, models: list[str]) -> tuple:
    """(server live, server ready, [each model ready]) from InferenceGRPCClient."""
    from kserve import InferenceGRPCClient

    async def run():
        client = InferenceGRPCClient(target, retries=0)
        try:
            return (await client.is_server_live(headers=metadata),
                    await client.is_server_ready(headers=metadata),
                    [await client.is_model_ready(m, headers=metadata) for m in models])
        finally:
            await client.close()

    return asyncio.run(run())


def grpc_infer(target: str, metadata: tuple, model: str, arrays: dict, binary: bool,
               request_id: str) -> tuple:
    """(model_name, id, [(output name, array)]) of InferenceGRPCClient's answer."""
    from kserve import InferenceGRPCClient, InferRequest

    request = InferRequest(model_name=model, infer_inputs=_inputs(arrays, binary),
                           request_id=request_id)

    async def run():
        client = InferenceGRPCClient(target, retries=0)
        try:
            return await client.infer(request, headers=metadata)
        finally:
            await client.close()

    answer = asyncio.run(run())
    return answer.model_name, answer.id, [(o.name, o.as_numpy()) for o in answer.outputs]
