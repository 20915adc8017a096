"""The generation service on real Ray Serve (a local head started for this module with explicit ports and
CPUs, stopped by PID — never `ray stop`), called through the gRPC stubs and grpcurl via Serve's gRPC proxy."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request

import grpc
import pytest

from knowserve.generation.v1 import generation_service_pb2 as pb
from knowserve.generation.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import GENERATION_TOKEN, ROOT, SERVE_APP, SERVE_META, run_tool, tool
from tests.taught import teach

pytestmark = pytest.mark.timeout(900)
META = SERVE_META  # the application and the session app's bearer token


async def test_generate_through_serve_grpc_proxy_and_grpcurl(serve_generation):
    target, _, _ = serve_generation
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        reply = await stub.Generate(pb.GenerateRequest(
            prompts=[pb.Prompt(text="Paris is"), pb.Prompt(chat=pb.ChatConversation(messages=[
                pb.ChatMessage(role="user", content="Hi")]))],
            sampling=pb.SamplingParams(temperature=0.7, max_tokens=5, n=2, seed=3), return_logprobs=True),
            metadata=META, timeout=120)
        assert len(reply.completions) == 4 and reply.weight_version == 1
        for c in reply.completions:
            assert len(c.token_ids) == len(c.logprobs) == len(c.env_mask) and c.weight_version == 1
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=META, timeout=30)
        assert (info.engine, info.architecture, info.replicas) == ("transformers", "LlamaForCausalLM", 2)
        assert info.model == "tiny" and info.is_default and info.parameters > 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(text="x")],
                                                   sampling=pb.SamplingParams(max_tokens=65)), metadata=META)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.max_tokens" in err.value.details()
        chunks = [m async for m in stub.GenerateStream(pb.GenerateStreamRequest(
            prompt=pb.Prompt(text="Paris is"), sampling=pb.SamplingParams(temperature=0, max_tokens=6)),
            metadata=META, timeout=60)]
        assert chunks[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        greedy = await stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(text="Paris is")], sampling=pb.SamplingParams(
            temperature=0, max_tokens=6)), metadata=META, timeout=60)
        assert [t for m in chunks for t in m.token_ids] == list(greedy.completions[0].token_ids)
    out = await run_tool(tool("grpcurl"), "-plaintext", "-import-path", str(ROOT / "protos"), "-proto",
                         "knowserve/generation/v1/generation_service.proto", "-rpc-header", f"application: {SERVE_APP}",
                         "-rpc-header", f"authorization: Bearer {GENERATION_TOKEN}",
                         "-d", '{"prompts": [{"text": "Hello"}], "sampling": {"max_tokens": 3}}', target,
                         "knowserve.generation.v1.GenerationService/Generate")
    assert out.returncode == 0 and '"weightVersion": "1"' in out.stdout, out.stdout + out.stderr


async def test_hot_swap_under_load_has_no_failures_and_no_stale_version_after_ack(serve_generation):
    target, root, metrics_port = serve_generation
    await asyncio.to_thread(teach, root / "v1", ["a different model"], root / "v2", 3)
    failures, versions_after_ack, ack = [], [], {}
    stop = asyncio.Event()

    async def client(ch):
        stub = pb_grpc.GenerationServiceStub(ch)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = await stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(text="Paris is")],
                                                           sampling=pb.SamplingParams(max_tokens=4)),
                                        metadata=META, timeout=120)
            except grpc.aio.AioRpcError as e:
                failures.append(e.code())
                continue
            if "at" in ack and sent > ack["at"]:
                versions_after_ack.append(r.weight_version)

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        load = [asyncio.create_task(client(ch)) for _ in range(4)]
        await asyncio.sleep(2)
        t0 = time.monotonic()
        reply = await stub.UpdateWeights(pb.UpdateWeightsRequest(checkpoint_uri=str(root / "v2"), version=2),
                                         metadata=META, timeout=300)
        ack["at"] = time.monotonic()
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*load)
        assert (reply.version, reply.previous_version) == (2, 1)
        print(f"swap acknowledged in {ack['at'] - t0:.2f}s; {len(versions_after_ack)} responses after the ack")
        assert failures == []
        assert versions_after_ack and set(versions_after_ack) == {2}
        # a corrupt checkpoint, a stale version and a path outside the root are refused; v2 keeps serving
        shutil.copytree(root / "v2", root / "corrupt")
        (root / "corrupt" / "model.safetensors").write_bytes(b"\0" * 32)
        for uri, version, code in ((root / "corrupt", 3, grpc.StatusCode.FAILED_PRECONDITION),
                                   (root / "v2", 2, grpc.StatusCode.FAILED_PRECONDITION),
                                   (ROOT, 3, grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UpdateWeights(pb.UpdateWeightsRequest(checkpoint_uri=str(uri), version=version),
                                         metadata=META, timeout=120)
            assert err.value.code() == code, err.value.details()
        r = await stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(text="x")]), metadata=META, timeout=60)
        assert r.weight_version == 2
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    versions = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("knowserve_generation_weight_version{") and 'model="tiny"' in line]
    assert versions and set(versions) == {2.0}  # every live replica reports version 2
    assert 'knowserve_generation_swaps_total{model="tiny",result="ok"}' in text
    assert "knowserve_generation_batch_size_bucket" in text
    assert 'knowserve_generation_requests_total{code="OK",method="Generate",model="tiny"}' in text
    check = await run_tool(tool("promtool"), "check", "metrics", input=text)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_named_models_are_isolated_and_roll_back_to_kept_versions(serve_generation_app, capsys):
    """A swap or rollback naming `second` never touches `tiny`; RollbackWeights returns to a kept version (and
    forward again) with no failed request; a version that is not kept, an unknown model and a corrupt body are
    refused with the precise code."""
    from services.generation.client import GenerationClient

    app = serve_generation_app
    root = app.root
    async with GenerationClient(app.target, app_name=SERVE_APP, model="second") as gen:
        models = {m.model: m for m in await gen.list_models()}
        assert list(models) == ["tiny", "second", "gated"] and models["tiny"].is_default
        assert not models["second"].is_default
        tiny_before, second = models["tiny"], models["second"]
        assert second.model_name == "tiny-llama-h128-l2-s0" and second.replicas == 1
        start = second.weight_version
        base = second.checkpoint_uri
        shutil.copytree(base, root / "second-a")
        await asyncio.to_thread(teach, base, ["a taught text for the second model"], root / "second-b", 3)
        a = await gen.update_weights(str(root / "second-a"), start + 1)
        b = await gen.update_weights(str(root / "second-b"), start + 2)
        assert (a.version, b.version, b.previous_version) == (start + 1, start + 2, start + 1)
        info = await gen.model_info()
        assert [k.version for k in info.kept_versions][-3:] == [start, start + 1, start + 2]
        assert info.model_name == "second-b"  # the name comes from what is served, not the start-up model

        failures, served = [], []
        stop = asyncio.Event()

        async def load():
            while not stop.is_set():
                try:
                    r = await gen.generate(["Paris is"], max_tokens=3)
                    served.append(r.weight_version)
                except Exception as e:  # noqa: BLE001 - counted
                    failures.append(e)

        clients = [asyncio.create_task(load()) for _ in range(3)]
        await asyncio.sleep(1)
        t0 = time.monotonic()
        back = await gen.rollback_weights(start + 1)
        rollback_ack = time.monotonic() - t0
        after = await gen.generate(["Paris is"], max_tokens=3)
        stop.set()
        await asyncio.gather(*clients)
        assert failures == [] and served
        assert (back.version, back.previous_version) == (start + 1, start + 2)
        assert after.weight_version == start + 1
        print(f"rollback acknowledged in {rollback_ack:.2f}s")
        info = await gen.model_info()
        assert (info.weight_version, info.latest_version) == (start + 1, start + 2)
        forward = await gen.rollback_weights(start + 2)  # and forward again
        assert forward.version == start + 2

        with pytest.raises(Exception) as err:
            await gen.rollback_weights(start + 7)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and f"{start + 1}" in str(err.value)
        # `knowserve rollback` says the same in one line (no traceback) and exits 1
        from services.cli import main

        code = await asyncio.to_thread(main, ["rollback", "second", str(start + 7), "--target", app.target,
                                              "--generation-app", SERVE_APP])
        err_text = capsys.readouterr().err
        assert code == 1 and "not kept" in err_text and "FAILED_PRECONDITION" in err_text, err_text
        assert "Traceback" not in err_text
        with pytest.raises(Exception) as err:  # a publish must be above the latest, not the serving, version
            await gen.update_weights(str(root / "second-a"), start + 2)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(Exception) as err:
            await gen.generate(["x"], model="no-such-model")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "tiny" in str(err.value) and "second" in str(err.value)

        tiny_after = await gen.model_info(model="tiny")  # untouched by every call above
        assert (tiny_after.weight_version, tiny_after.checkpoint_uri) == (tiny_before.weight_version,
                                                                          tiny_before.checkpoint_uri)

    # a body that does not parse is INVALID_ARGUMENT (Serve's proxy would answer UNKNOWN "Unexpected DecodeError")
    async with grpc.aio.insecure_channel(app.target) as ch:
        for method in ("Generate", "UpdateWeights", "RollbackWeights", "ListModels", "GetModelInfo"):
            call = ch.unary_unary(f"/knowserve.generation.v1.GenerationService/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"\xff\xff\xff\x07garbage", metadata=META, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())


async def test_every_rpc_and_the_http_routes_require_the_token(serve_generation_app):
    """Auth on (the session app runs with a token): no token or a wrong one is UNAUTHENTICATED on every RPC of
    Serve's gRPC proxy and 401 in OpenAI's shape on the HTTP routes, with nothing about valid tokens; health
    answers without one."""
    import json
    import urllib.error

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    app = serve_generation_app
    requests = {"Generate": pb.GenerateRequest(prompts=[pb.Prompt(text="x")]),
                "GetModelInfo": pb.GetModelInfoRequest(), "ListModels": pb.ListModelsRequest(),
                "UpdateWeights": pb.UpdateWeightsRequest(checkpoint_uri="/nonexistent", version=99),
                "RollbackWeights": pb.RollbackWeightsRequest(version=1)}
    async with grpc.aio.insecure_channel(app.target) as ch:
        for metadata in ((("application", SERVE_APP),),
                         (("application", SERVE_APP), ("authorization", "Bearer wrong")),
                         (("application", SERVE_APP), ("authorization", GENERATION_TOKEN))):  # no "Bearer "
            for method, request in requests.items():
                call = ch.unary_unary(f"/knowserve.generation.v1.GenerationService/{method}",
                                      request_serializer=type(request).SerializeToString)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(request, metadata=metadata, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, err.value.details())
                assert GENERATION_TOKEN not in err.value.details()
            stream = pb_grpc.GenerationServiceStub(ch).GenerateStream(
                pb.GenerateStreamRequest(prompt=pb.Prompt(text="x")), metadata=metadata, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [m async for m in stream]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          metadata=(("application", SERVE_APP),), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    for path, body in (("/v1/models", None), ("/v1/chat/completions",
                                              {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})):
        req = urllib.request.Request(f"http://127.0.0.1:{app.http_port}{path}",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 401
        assert json.loads(err.value.read())["error"]["type"] == "authentication_error"
