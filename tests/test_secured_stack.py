"""`knowserve up --auth --tls`: the local stack with a generated bearer token and mTLS between every service and its
clients (generation plaintext behind Serve's proxy, its token enforced), then the chain a user runs — an edit,
Search, Verify with retrieved evidence, Score with factuality (reward → verification → retrieval, each hop sending
the token over mTLS), Generate, Generate with retrieval inside (a tiny model taught to search: generation's replica
calls retrieval with the token over mTLS and inserts what it finds), a GRPO step through the training service that
hot-swaps its weights into generation, and `knowserve eval` — and the same calls refused without a token, health
answering.
"""

from __future__ import annotations

import json
import os
import stat
import time
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from knowserve.retrieval.v1 import retrieval_service_pb2 as rpb
from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as rpb_grpc
from knowserve.reward.v1 import reward_service_pb2 as wpb
from knowserve.reward.v1 import reward_service_pb2_grpc as wpb_grpc
from knowserve.generation.v1 import generation_service_pb2 as gpb
from knowserve.generation.v1 import generation_service_pb2_grpc as gpb_grpc
from knowserve.training.v1 import training_service_pb2 as tpb
from knowserve.training.v1 import training_service_pb2_grpc as tpb_grpc
from knowserve.verification.v1 import verification_service_pb2 as vpb
from knowserve.verification.v1 import verification_service_pb2_grpc as vpb_grpc
from services.stack import isolated_env
from tests.conftest import ROOT, free_port, reserved_port
from tests.taught import teach


def knowserve(env, *args, check=True):
    out = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert not check or out.returncode == 0, f"knowserve {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out


# (service, stub, an RPC with an empty request) for the refusal checks
CALLS = [
    ("retrieval", rpb_grpc.RetrievalServiceStub, "GetIndexStats", rpb.GetIndexStatsRequest),
    ("verification", vpb_grpc.VerificationServiceStub, "ListJudges", vpb.ListJudgesRequest),
    ("reward", wpb_grpc.RewardServiceStub, "ListRecipes", wpb.ListRecipesRequest),
    ("training", tpb_grpc.TrainingServiceStub, "ListRuns", tpb.ListRunsRequest),
]


SEARCH_PROMPT = "Question: In which city is the Orlen Tower?\nAnswer:"
SEARCH_QUERY = " <|begin_of_query|>Orlen Tower city<|end_of_query|>"
STACK = ("retrieval", "verification", "reward", "generation", "training")


@pytest.fixture(scope="module")
def secured_stack(tmp_path_factory):
    from services.common.models import tiny_lm_folder

    run = tmp_path_factory.mktemp("secured") / "run"
    # ports bound seconds later (Ray's proxies) come from outside the ephemeral range, as the session's app does
    ports = {name: reserved_port() if name == "generation" else free_port() for name in STACK}
    model = str(tiny_lm_folder(ROOT / ".cache/models"))
    # a second model that emits one search, so generation's own retrieval client is exercised on the secured path
    searcher = teach(Path(model), [SEARCH_PROMPT + SEARCH_QUERY + " <|begin_of_documents|>x<|end_of_documents|>"
                                   "<answer>Brasko</answer><|im_end|>"], run.parent / "searcher", 200)
    # the CLI sends what the environment names before the stack's own secrets: the session's token (another
    # test's generation app sets KNOWSERVE_TOKEN_FILE) must not leak in
    inherited = {k: v for k, v in os.environ.items() if k != "KNOWSERVE_TOKEN_FILE" and
                 not k.startswith("KNOWSERVE_TLS_")}
    env = isolated_env(run, ports, base=inherited, RETRIEVAL_DENSE="false", RETRIEVAL_DEFAULT_MODE="bm25",
                       VERIFICATION_DEFAULT_JUDGE="lexical",
                       # generation: one tiny Llama; plaintext (Serve's proxy has no TLS) with its token enforced
                       GENERATION_MODELS=json.dumps([
                           {"name": "tiny", "path": model, "replicas": 1, "replica_num_cpus": 0.5},
                           {"name": "searcher", "path": str(searcher), "replicas": 1, "replica_num_cpus": 0.25}]),
                       GENERATION_HTTP_PORT=str(reserved_port()), GENERATION_DASHBOARD_PORT=str(reserved_port()),
                       GENERATION_LIVE_SAMPLE_RATE="0", GENERATION_ANSWER_TARGET="",
                       TRAINING_DEFAULT_MODEL=model, TRAINING_TRAINER_THREADS="1")
    env.update(OMP_NUM_THREADS="1", COLUMNS="200")
    try:
        up = knowserve(env, "up", "--auth", "--tls", "--services", ",".join(STACK))
        assert up.stdout.count("SERVING") >= len(STACK), up.stdout + up.stderr
        yield env, run, ports
    finally:
        knowserve(env, "down", check=False)


def _channel(run, port: int, client_cert: bool = True) -> grpc.Channel:
    sec = run / "security"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(sec / "ca.pem").read_bytes(),
        private_key=(sec / "node-key.pem").read_bytes() if client_cert else None,
        certificate_chain=(sec / "node.pem").read_bytes() if client_cert else None)
    return grpc.secure_channel(f"localhost:{port}", creds)


def test_generated_secrets_are_private(secured_stack):
    _, run, _ = secured_stack
    sec = run / "security"
    for name in ("token", "node-key.pem"):
        assert stat.S_IMODE((sec / name).stat().st_mode) == 0o600, name
    assert len((sec / "token").read_text().strip()) >= 32


def test_the_chain_succeeds_with_token_and_mtls(secured_stack):
    env, _, ports = secured_stack
    # the CLI finds the stack's token and certificates itself (or --token-file / --tls-* / KNOWSERVE_TOKEN_FILE)
    ret = ["--target", f"localhost:{ports['retrieval']}"]
    knowserve(env, "edit", "add", "--id", "ks-fact-1", "--title", "Vellmar Bridge",
              "--text", "The Vellmar Bridge is 812 metres long and opened in 1931.", *ret)
    found = knowserve(env, "search", "Vellmar Bridge length", "--top-k", "1", *ret)
    assert "812 metres" in found.stdout

    verified = knowserve(env, "verify", "The Vellmar Bridge is 812 metres long.",
                         "--target", f"localhost:{ports['verification']}")
    assert "SUPPORTED" in verified.stdout and "ks-fact-1" in verified.stdout, verified.stdout  # retrieved evidence
    refuted = knowserve(env, "verify", "The Vellmar Bridge is 640 metres long.",
                        "--target", f"localhost:{ports['verification']}")
    assert "REFUTED" in refuted.stdout, refuted.stdout

    scored = knowserve(env, "score", "--recipe", "knowrl", "--prompt", "How long is the Vellmar Bridge?",
                       "--completion", "<think>The Vellmar Bridge is 812 metres long.</think>"
                                       "<answer>812 metres</answer>",
                       "--gold", "812 metres", "--target", f"localhost:{ports['reward']}")
    factuality = [line for line in scored.stdout.splitlines() if line.strip().startswith("factuality")]
    # reward → verification → retrieval answered: the think section's claim was checked against the edit
    assert factuality and "1/1 claims supported" in factuality[0], scored.stdout


def test_without_the_token_every_service_refuses_and_health_answers(secured_stack):
    env, run, ports = secured_stack
    token = (run / "security" / "token").read_text().strip()
    for service, stub_cls, rpc, request in CALLS:
        with _channel(run, ports[service]) as ch:
            call = getattr(stub_cls(ch), rpc)
            for metadata in (None, (("authorization", "Bearer wrong-token"),), (("authorization", token),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(request(), timeout=10, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (service, metadata, err.value)
            call(request(), timeout=10, metadata=(("authorization", f"Bearer {token}"),))  # the right one passes
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, service
        # mTLS: a client without a certificate never gets to send a request, token or not
        with _channel(run, ports[service], client_cert=False) as ch:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub_cls(ch), rpc)(request(), timeout=10,
                                           metadata=(("authorization", f"Bearer {token}"),))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (service, err.value)
        # plaintext is refused too
        with grpc.insecure_channel(f"127.0.0.1:{ports[service]}") as ch:
            with pytest.raises(grpc.RpcError):
                getattr(stub_cls(ch), rpc)(request(), timeout=10, metadata=(("authorization", f"Bearer {token}"),))


def test_the_cli_with_a_wrong_token_file_is_refused(secured_stack, tmp_path):
    env, _, ports = secured_stack
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    out = knowserve(env, "--token-file", str(wrong), "search", "bridge",
                    "--target", f"localhost:{ports['retrieval']}", check=False)
    assert out.returncode != 0 and "UNAUTHENTICATED" in (out.stdout + out.stderr).upper(), out.stderr
    # the stack remembers it was started secured: a plain `up` on it is refused rather than silently weakened
    assert json.loads((secured_stack[1] / "security" / "stack.json").read_text()) == {"auth": True, "tls": True}
    again = knowserve(env, "up", "--services", "retrieval", check=False)
    assert again.returncode != 0 and "knowserve down" in again.stderr, again.stderr


def test_the_health_check_probes_that_the_token_is_enforced(secured_stack, tmp_path):
    """What the chart's `helm test` pod runs when auth is on: health, then the read-only RPC refused without the
    token and answered with it."""
    env, run, ports = secured_stack
    sec = run / "security"
    tls = ["--tls-ca", str(sec / "ca.pem"), "--tls-cert", str(sec / "node.pem"), "--tls-key", str(sec / "node-key.pem")]

    def probe(service, token_file):
        how = ["--application", "knowserve-generation"] if service == "generation" else tls  # plaintext, routed
        return subprocess.run([sys.executable, "-m", "services.common.healthcheck", "--host", "localhost", "--port",
                               str(ports[service]), "--auth-probe", service, "--token-file", str(token_file), *how],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    for service in ports:
        ok = probe(service, sec / "token")
        assert ok.returncode == 0 and "token enforced and accepted" in ok.stdout, (service, ok.stdout, ok.stderr)
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    bad = probe("reward", wrong)
    assert bad.returncode == 1 and "the token was refused: UNAUTHENTICATED" in bad.stderr, bad.stderr


def _generation_metadata(run, token: bool = True) -> tuple:
    md = (("application", "knowserve-generation"),)
    return md + ((("authorization", f"Bearer {(run / 'security' / 'token').read_text().strip()}"),) if token else ())


def test_retrieval_inside_generation_sends_the_token_over_mtls(secured_stack):
    env, run, ports = secured_stack
    knowserve(env, "edit", "add", "--id", "ks-fact-2", "--title", "Orlen Tower",
              "--text", "The Orlen Tower stands in the city of Brasko.", "--target", f"localhost:{ports['retrieval']}")
    with grpc.insecure_channel(f"127.0.0.1:{ports['generation']}") as ch:
        reply = gpb_grpc.GenerationServiceStub(ch).Generate(gpb.GenerateRequest(
            prompts=[gpb.Prompt(text=SEARCH_PROMPT)], sampling=gpb.SamplingParams(max_tokens=48, temperature=0),
            model="searcher", tool_protocol=gpb.TOOL_PROTOCOL_R1_SEARCHER, max_tool_turns=1, retrieval_top_k=1),
            timeout=120, metadata=_generation_metadata(run))
    c = reply.completions[0]
    assert c.tool_turns == 1 and c.text.startswith(SEARCH_QUERY), c.text
    # the documents generation inserted came from the secured retrieval service: the edit made a moment ago
    assert "<|begin_of_documents|>" in c.text and "city of Brasko" in c.text, c.text


def test_generate_a_grpo_step_with_a_hot_swap_and_an_eval_through_the_secured_stack(secured_stack, tmp_path):
    env, run, ports = secured_stack
    with grpc.insecure_channel(f"127.0.0.1:{ports['generation']}") as ch:
        gen = gpb_grpc.GenerationServiceStub(ch)
        reply = gen.Generate(gpb.GenerateRequest(prompts=[gpb.Prompt(text="The Vellmar Bridge")],
                                                 sampling=gpb.SamplingParams(max_tokens=4)), timeout=60,
                             metadata=_generation_metadata(run))
        assert reply.completions and reply.completions[0].token_ids
        with pytest.raises(grpc.RpcError) as err:
            gen.Generate(gpb.GenerateRequest(prompts=[gpb.Prompt(text="x")]), timeout=30,
                         metadata=_generation_metadata(run, token=False))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10,
                                                      metadata=_generation_metadata(run, token=False))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        before = gen.GetModelInfo(gpb.GetModelInfoRequest(), timeout=30, metadata=_generation_metadata(run))

    # one GRPO step: the trainer process calls generation (token) and reward (token over mTLS), reward calls
    # verification, verification calls retrieval; the step's weights are published and hot-swapped
    token = (run / "security" / "token").read_text().strip()
    with _channel(run, ports["training"]) as ch:
        training = tpb_grpc.TrainingServiceStub(ch)
        md = (("authorization", f"Bearer {token}"),)
        started = training.StartRun(tpb.StartRunRequest(
            recipe="knowrl", dataset="halueval_qa", run_id="secured", hyperparameters=tpb.Hyperparameters(
                max_steps=1, group_size=2, batch_size=2, sync_every=1, max_completion_tokens=8, seed=1),
            options=tpb.RunOptions(dataset_limit=4)), timeout=120, metadata=md).run
        deadline = time.monotonic() + 400
        while True:
            got = training.GetRun(tpb.GetRunRequest(run_id=started.run_id), timeout=30, metadata=md).run
            if got.state in (tpb.RUN_STATE_SUCCEEDED, tpb.RUN_STATE_FAILED, tpb.RUN_STATE_STOPPED):
                break
            assert time.monotonic() < deadline, "the GRPO step did not finish"
            time.sleep(2)
    trainer_log = next(run.rglob("trainer.log"), None)
    assert got.state == tpb.RUN_STATE_SUCCEEDED, (got.error, trainer_log.read_text()[-3000:] if trainer_log else "")
    with grpc.insecure_channel(f"127.0.0.1:{ports['generation']}") as ch:
        after = gpb_grpc.GenerationServiceStub(ch).GetModelInfo(gpb.GetModelInfoRequest(), timeout=30,
                                                                metadata=_generation_metadata(run))
    assert after.weight_version > before.weight_version  # swapped in by the run, through the token check

    # an eval: generation with the token, verification over mTLS with the token (the CLI finds both itself)
    out = knowserve(env, "eval", "--dataset", "halueval_qa", "--limit", "3", "--max-tokens", "8", "--model", "tiny",
                    "--generation", f"127.0.0.1:{ports['generation']}",
                    "--verification", f"localhost:{ports['verification']}", "--out", str(tmp_path / "eval"))
    assert "results:" in out.stdout, out.stdout + out.stderr
