"""The shared runtime, through an example service: health, reflection, errors, auth, TLS, metrics, drain."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from knowserve.retrieval.v1 import retrieval_service_pb2 as pb
from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from services.common.clients import ClientOptions, RemoteError, ServiceClient
from services.common.errors import Unavailable
from services.common.server import GrpcServer
from tests.common.example_service import ExampleApp, ExampleSettings
from tests.conftest import ROOT, free_port, tool

SERVICE = "knowserve.retrieval.v1.RetrievalService"


async def start(ready: bool = True, **settings) -> GrpcServer:
    cfg = ExampleSettings(**{"port": 0, "metrics_port": 0, **settings})
    server = GrpcServer(cfg, ExampleApp(cfg).bindings)
    await server.start()
    if ready:
        await server.set_ready()
    return server


async def health_status(channel: grpc.aio.Channel, service: str = "") -> str:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_health_not_serving_until_ready_then_serving():
    server = await start(ready=False)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            assert await health_status(ch) == "NOT_SERVING"
            assert await health_status(ch, SERVICE) == "NOT_SERVING"
            await server.set_ready()
            assert await health_status(ch) == "SERVING"
            assert await health_status(ch, SERVICE) == "SERVING"
    finally:
        await server.stop(0)


async def test_grpcurl_lists_services_and_checks_health():
    server = await start()
    try:
        grpcurl = tool("grpcurl")
        listed = await asyncio.to_thread(
            subprocess.run, [grpcurl, "-plaintext", server.address, "list"], capture_output=True, text=True, check=True
        )
        names = listed.stdout.split()
        assert SERVICE in names and "grpc.health.v1.Health" in names
        assert "knowserve.training.v1.TrainingService" in names
        check = await asyncio.to_thread(
            subprocess.run, [grpcurl, "-plaintext", server.address, "grpc.health.v1.Health/Check"],
            capture_output=True, text=True, check=True,
        )
        assert json.loads(check.stdout)["status"] == "SERVING"
        search = await asyncio.to_thread(
            subprocess.run,
            [grpcurl, "-plaintext", "-d", '{"queries": ["capital France"], "top_k": 2}', server.address,
             f"{SERVICE}/Search"],
            capture_output=True, text=True, check=True,
        )
        assert json.loads(search.stdout)["results"][0]["passages"][0]["text"] == "Paris is the capital of France."
    finally:
        await server.stop(0)


async def test_bad_field_gets_invalid_argument_naming_it():
    server = await start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.RetrievalServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(pb.SearchRequest(queries=["Paris"], top_k=0))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "top_k" in err.value.details() and "between 1 and 10" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(pb.SearchRequest(queries=["ok", "   "], top_k=1))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "queries[1]" in err.value.details()
            # the server keeps serving after bad input
            assert await health_status(ch) == "SERVING"
    finally:
        await server.stop(0)


async def test_unknown_error_is_internal_with_generic_message(caplog):
    server = await start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.RetrievalServiceStub(ch).Search(pb.SearchRequest(queries=["boom"], top_k=1))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "secret internal detail" not in err.value.details()
        assert any("secret internal detail" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    finally:
        await server.stop(0)


async def test_default_deadline_applies_when_client_sends_none():
    server = await start(default_deadline_seconds=0.2)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.RetrievalServiceStub(ch).Search(pb.SearchRequest(queries=["sleep:2"], top_k=1))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(0)


async def test_max_message_size_is_enforced():
    server = await start(max_message_bytes=4096)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.RetrievalServiceStub(ch).Search(pb.SearchRequest(queries=["x" * 10000], top_k=1))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)


async def test_too_many_repeated_elements_are_refused_before_the_handler_runs():
    server = await start(max_request_elements=50)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.RetrievalServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # "boom" would be INTERNAL had the handler run
                await stub.Search(pb.SearchRequest(queries=["boom"] * 51, top_k=1))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("queries:") and "above the limit of 50" in err.value.details()
            assert "max_request_elements" in err.value.details()
            reply = await stub.Search(pb.SearchRequest(queries=["Paris"] * 50, top_k=1))  # at the limit: served
            assert len(reply.results) == 50
    finally:
        await server.stop(0)


async def test_auth_token_required_but_health_open(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server = await start(auth_token_file=token_file)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.RetrievalServiceStub(ch)
            request = pb.SearchRequest(queries=["Paris"], top_k=1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(request)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(request, metadata=(("authorization", "Bearer wrong"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.Search(request, metadata=(("authorization", "Bearer s3cret"),))
            assert reply.results[0].passages
            assert await health_status(ch) == "SERVING"  # probes carry no token
        client = ServiceClient("example", server.address, pb_grpc.RetrievalServiceStub, ClientOptions(token="s3cret"))
        async with client:
            assert (await client.call("Search", request)).results[0].passages
    finally:
        await server.stop(0)


async def test_tls_refuses_plaintext_and_mtls_needs_client_cert(tls_material):
    t = tls_material
    server = await start(tls_cert_file=t["server_pem"], tls_key_file=t["server_key"], tls_client_ca_file=t["ca_pem"])
    request = pb.SearchRequest(queries=["Paris"], top_k=1)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.RetrievalServiceStub(ch).Search(request, timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        no_cert = ServiceClient("example", server.address, pb_grpc.RetrievalServiceStub,
                                ClientOptions(tls_ca_file=t["ca_pem"], retries=0, timeout_seconds=3))
        async with no_cert:
            with pytest.raises(Unavailable):
                await no_cert.call("Search", request)
        mtls = ServiceClient("example", server.address, pb_grpc.RetrievalServiceStub,
                             ClientOptions(tls_ca_file=t["ca_pem"], tls_cert_file=t["client_pem"],
                                           tls_key_file=t["client_key"]))
        async with mtls:
            assert (await mtls.call("Search", request)).results[0].passages
    finally:
        await server.stop(0)


async def test_server_streaming_maps_errors_and_counts_calls(tmp_path):
    from knowserve.training.v1 import training_service_pb2 as tpb
    from knowserve.training.v1 import training_service_pb2_grpc as tpb_grpc

    token_file = tmp_path / "token"
    token_file.write_text("tok")
    server = await start(auth_token_file=token_file)
    auth = (("authorization", "Bearer tok"),)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = tpb_grpc.TrainingServiceStub(ch)
            steps = [m.step async for m in stub.StreamRunProgress(tpb.StreamRunProgressRequest(run_id="steps:3"),
                                                                  metadata=auth)]
            assert steps == [1, 2, 3]
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for m in stub.StreamRunProgress(tpb.StreamRunProgressRequest(run_id="fail-after:2"),
                                                      metadata=auth):
                    received.append(m.step)
            assert received == [1, 2]
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "mid-stream" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.StreamRunProgress(tpb.StreamRunProgressRequest(run_id="steps:1")):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client = ServiceClient("example", server.address, tpb_grpc.TrainingServiceStub, ClientOptions(token="tok"))
        async with client:
            got = [m.step async for m in client.stream("StreamRunProgress",
                                                       tpb.StreamRunProgressRequest(run_id="steps:2"))]
            assert got == [1, 2]
            with pytest.raises(RemoteError) as remote:
                async for _ in client.stream("StreamRunProgress", tpb.StreamRunProgressRequest(run_id="nope")):
                    pass
            assert remote.value.code == grpc.StatusCode.NOT_FOUND and "'nope' does not exist" in str(remote.value)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
        for code in ("OK", "NOT_FOUND", "UNAUTHENTICATED"):
            assert f'knowserve_rpc_requests_total{{code="{code}",method="StreamRunProgress",service="example"}}' in text
    finally:
        await server.stop(0)


def test_settings_reject_half_tls_with_the_fix(tls_material):
    with pytest.raises(ValueError, match="KNOWSERVE_EXAMPLE_TLS_KEY_FILE"):
        ExampleSettings(tls_cert_file=tls_material["server_pem"])
    with pytest.raises(ValueError, match="does not exist"):
        ExampleSettings(auth_token_file="/nonexistent/token")


def test_settings_read_from_env(monkeypatch):
    monkeypatch.setenv("KNOWSERVE_EXAMPLE_PORT", "50999")
    monkeypatch.setenv("KNOWSERVE_EXAMPLE_MAX_TOP_K", "3")
    cfg = ExampleSettings()
    assert (cfg.port, cfg.max_top_k) == (50999, 3)


async def test_metrics_pass_promtool_and_count_calls():
    server = await start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.RetrievalServiceStub(ch)
            await stub.Search(pb.SearchRequest(queries=["Paris"], top_k=1))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Search(pb.SearchRequest(queries=["Paris"], top_k=0))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        text = body.decode()
        assert 'knowserve_rpc_requests_total{code="OK",method="Search",service="example"}' in text
        assert 'knowserve_rpc_requests_total{code="INVALID_ARGUMENT",method="Search",service="example"}' in text
        assert "knowserve_rpc_duration_seconds_bucket" in text and "knowserve_build_info{" in text
        check = subprocess.run([tool("promtool"), "check", "metrics"], input=body, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        await server.stop(0)


async def test_client_wait_healthy_names_missing_service():
    client = ServiceClient("retrieval", f"127.0.0.1:{free_port()}", pb_grpc.RetrievalServiceStub)
    async with client:
        with pytest.raises(Unavailable) as err:
            await client.wait_healthy(timeout=0.5)
    assert "retrieval" in str(err.value) and "knowserve up" in str(err.value)


async def test_client_retries_unavailable_until_server_appears():
    port = free_port()
    client = ServiceClient("example", f"127.0.0.1:{port}", pb_grpc.RetrievalServiceStub,
                           ClientOptions(retries=8, backoff_initial_seconds=0.1))

    async def late_start() -> GrpcServer:
        await asyncio.sleep(0.4)
        return await start(port=port)

    starter = asyncio.create_task(late_start())
    async with client:
        reply = await client.call("Search", pb.SearchRequest(queries=["Paris"], top_k=1))
    assert reply.results[0].passages
    await (await starter).stop(0)


def test_sigterm_drains_in_flight_calls_and_exits_zero(subprocess_env):
    port = free_port()
    env = dict(subprocess_env, KNOWSERVE_EXAMPLE_PORT=str(port), KNOWSERVE_EXAMPLE_GRACE_SECONDS="10",
               KNOWSERVE_EXAMPLE_SHUTDOWN_DELAY_SECONDS="0.5", KNOWSERVE_EXAMPLE_MALLOC_ARENA_MAX="2",
               KNOWSERVE_EXAMPLE_MALLOC_MMAP_THRESHOLD_BYTES=str(1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "tests.common.example_service"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async def scenario() -> tuple[list, list[str]]:
            client = ServiceClient("example", f"127.0.0.1:{port}", pb_grpc.RetrievalServiceStub)
            await client.wait_healthy(timeout=30)
            calls = [asyncio.create_task(client.call("Search", pb.SearchRequest(queries=["sleep:1.5"], top_k=1)))
                     for _ in range(4)]
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            seen = []
            for _ in range(10):  # health flips to NOT_SERVING while the calls are still running
                await asyncio.sleep(0.05)
                seen.append(await client.check_health(timeout=0.5))
            results = await asyncio.gather(*calls, return_exceptions=True)
            await client.close()
            return results, seen

        results, seen = asyncio.run(scenario())
        assert all(isinstance(r, pb.SearchResponse) for r in results), results
        assert "NOT_SERVING" in seen, seen  # during the shutdown delay, while the calls still run
        assert proc.wait(timeout=20) == 0
        log = proc.stdout.read().decode()
        assert '"msg": "draining"' in log and '"msg": "stopped"' in log
        tuned = next(json.loads(line) for line in log.splitlines() if '"msg": "malloc tuned"' in line)
        assert (tuned["arena_max"], tuned["mmap_threshold_bytes"]) == (2, 1 << 20)  # glibc's mallopt took both
    finally:
        if proc.poll() is None:
            proc.kill()
