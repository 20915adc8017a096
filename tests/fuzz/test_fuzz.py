"""Fuzz suite: every RPC of every service, as running processes (generation through Ray Serve's gRPC proxy).

* ``KNOWSERVE_FUZZ_REQUESTS`` (default 1,000) malformed and hostile requests per RPC (:mod:`tests.fuzz.hostile`):
  no INTERNAL, UNKNOWN or DEADLINE_EXCEEDED; every service SERVING afterwards; nothing written by a rejected request
  (the index stats after each rejected write, the run list, the live stats, the served weight version and the
  checkpoint store); each service's resident memory grown by at most 10% over the run, after a warm-up pass.
* ``KNOWSERVE_FUZZ_EXAMPLES`` (default 20) well-formed requests per RPC drawn by hypothesis from the protos
  (:mod:`tests.fuzz.strategies`), and Generate properties on a tiny model: a valid request is answered with one
  completion per prompt and sample, within its token budget.

A larger run: ``KNOWSERVE_FUZZ_REQUESTS=20000 KNOWSERVE_FUZZ_EXAMPLES=500 pytest tests/fuzz``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knowserve.answer.v1 import answer_service_pb2 as apb
from knowserve.common.v1 import common_pb2 as cpb
from knowserve.generation.v1 import generation_service_pb2 as gpb
from knowserve.retrieval.v1 import retrieval_service_pb2 as rpb
from knowserve.reward.v1 import reward_service_pb2 as wpb
from knowserve.training.v1 import training_service_pb2 as tpb
from knowserve.verification.v1 import verification_service_pb2 as vpb
from services.common.procs import free_port, rss_bytes, serve_pids
from services.stack import isolated_env
from tests.conftest import GENERATION_TOKEN, ROOT, GenerationApp
from tests.fuzz import driver, hostile, strategies

REQUESTS = int(os.environ.get("KNOWSERVE_FUZZ_REQUESTS", "1000"))
EXAMPLES = int(os.environ.get("KNOWSERVE_FUZZ_EXAMPLES", "20"))
SEED = int(os.environ.get("KNOWSERVE_FUZZ_SEED", "0"))
WARMUP = max(50, REQUESTS // 10)
PLAIN = ("retrieval", "verification", "reward", "training", "answer")
MAX_RSS_GROWTH = 0.10
RSS_NOISE_BYTES = 16 << 20  # what a small service's RSS swings between identical fuzz rounds
# RPCs whose accepted well-formed requests would change what later tests of this module read (a swap, a rollback)
SWAPS = {"UpdateWeights", "RollbackWeights"}


def knowserve(env, *args):
    out = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"knowserve {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out


class Stack:
    def __init__(self, env, run: Path, ports: dict[str, int], generation: GenerationApp):
        self.env, self.run, self.ports, self.generation = env, run, ports, generation

    def target(self, service: str) -> str:
        return self.generation.target if service == "generation" else f"127.0.0.1:{self.ports[service]}"

    def metadata(self, service: str) -> tuple:
        if service == "generation":
            return (("application", self.generation.app_name), ("authorization", f"Bearer {GENERATION_TOKEN}"))
        return ()

    def pids(self, service: str) -> list[int]:
        """The service's processes: its own, or for generation the Serve proxy and replicas of its Ray head."""
        if service != "generation":
            import json

            return [json.loads((self.run / "stack.json").read_text())[service]["pid"]]
        return serve_pids(self.generation.proc.pid)

    def rss(self, service: str) -> int:
        return sum(rss_bytes(p) for p in self.pids(service))

    def serving(self, service: str) -> bool:
        with grpc.insecure_channel(self.target(service)) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10,
                                                         metadata=self.metadata(service) or None)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def unary(self, service: str, rpc: str, request, response_cls):
        with driver.channel(self.target(service)) as ch:
            m = next(m for m in driver.methods(service) if m.name == rpc)
            raw = ch.unary_unary(driver.path(m))(request.SerializeToString(), timeout=30,
                                                 metadata=self.metadata(service))
        return response_cls.FromString(raw)

    def log(self, service: str) -> str:
        path = self.generation.log_path if service == "generation" else self.run / "logs" / f"{service}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from services.common.models import tiny_lm_folder

    root = tmp_path_factory.mktemp("fuzz-generation")
    shutil.copytree(tiny_lm_folder(ROOT / ".cache/models"), root / "v1")
    token = root / "token"
    token.write_text(GENERATION_TOKEN)
    # its own generation app: fuzzed swaps and rollbacks must not touch the session's shared one
    generation = GenerationApp(root, None, app_name="knowserve-fuzz", max_tokens_limit=32, default_max_tokens=8,
                               auth_token_file=token, replicas=1, replica_num_cpus=0.5,
                               models=[{"name": "tiny", "path": str(root / "v1"), "replicas": 1,
                                        "replica_num_cpus": 0.5}]).start()
    run = tmp_path_factory.mktemp("fuzz-stack") / "run"
    ports = {name: free_port() for name in PLAIN}
    env = isolated_env(run, ports, RETRIEVAL_DENSE="false", RETRIEVAL_DEFAULT_MODE="bm25",
                       VERIFICATION_DEFAULT_JUDGE="lexical", VERIFICATION_GENERATION_TARGET="",
                       REWARD_GENERATION_TARGET="", GENERATION_PORT=str(generation.port),
                       ANSWER_GENERATION_APP_NAME=generation.app_name,
                       TRAINING_GENERATION_APP_NAME=generation.app_name, TOKEN_FILE=str(token),
                       TRAINING_DEFAULT_MODEL=str(root / "v1"))
    env["OMP_NUM_THREADS"] = "1"
    try:
        knowserve(env, "up", "--services", ",".join(PLAIN))
        s = Stack(env, run, ports, generation)
        s.unary("retrieval", "UpsertDocuments", rpb.UpsertDocumentsRequest(documents=[cpb.Document(
            id=f"d{i}", title=f"City {i}", text=f"City {i} lies on the river {i}.") for i in range(20)]),
                rpb.UpsertDocumentsResponse)
        yield s
    finally:
        subprocess.run([sys.executable, "-m", "services.cli", "down"], cwd=ROOT, env=env, capture_output=True,
                       timeout=120)
        generation.stop()


SERVICES = (*PLAIN, "generation")


def _index(stack) -> tuple:
    r = stack.unary("retrieval", "GetIndexStats", rpb.GetIndexStatsRequest(), rpb.GetIndexStatsResponse)
    return r.documents, r.passages, r.edit_documents


def _generation_state(stack) -> tuple:
    r = stack.unary("generation", "ListModels", gpb.ListModelsRequest(), gpb.ListModelsResponse)
    files = sorted(str(p.relative_to(stack.generation.root)) for p in stack.generation.root.rglob("*")
                   if p.name not in ("generation.log",) and "metrics" not in p.parts)
    return str(r).replace(" ", ""), tuple(files)


def _real_work(stack) -> None:
    """One well-formed request per service that does its real work (the judge's parsers, the grader, the model)."""
    claim = "City 3 lies on the river 3."
    stack.unary("retrieval", "Search", rpb.SearchRequest(queries=["river 3"], top_k=3), rpb.SearchResponse)
    stack.unary("verification", "Verify", vpb.VerifyRequest(items=[vpb.VerifyItem(answer=claim)]),
                vpb.VerifyResponse)
    stack.unary("reward", "Score", wpb.ScoreRequest(recipe="knowrl", items=[wpb.ScoreItem(
        prompt="Which river?", completion=f"<think>{claim}</think><answer>river 3</answer>",
        gold_answers=["river 3"])]), wpb.ScoreResponse)
    stack.unary("answer", "Answer", apb.AnswerRequest(question="Which river does City 3 lie on?", max_tokens=8),
                apb.AnswerResponse)
    stack.unary("generation", "Generate", gpb.GenerateRequest(prompts=[gpb.Prompt(text="City 3 lies on")],
                                                              sampling=gpb.SamplingParams(max_tokens=8)),
                gpb.GenerateResponse)


def test_malformed_requests_are_rejected_without_harm(stack):
    tally = driver.Tally()
    before_runs = stack.unary("training", "ListRuns", tpb.ListRunsRequest(), tpb.ListRunsResponse)
    before_live = stack.unary("answer", "GetLiveStats", apb.GetLiveStatsRequest(), apb.GetLiveStatsResponse)
    before_generation = _generation_state(stack)

    def fuzz(service: str, n: int, seed: int, sink: driver.Tally) -> None:
        for m in driver.methods(service):
            payloads = hostile.malformed(m.input_type, n, seed=seed)
            check = None
            if m.name in ("UpsertDocuments", "DeleteDocuments"):
                last = [_index(stack)]

                def check(kind, payload, code, last=last):
                    now = _index(stack)
                    assert code == grpc.StatusCode.OK or now == last[0], (
                        f"a rejected {m.name} ({kind}, {code.name}) changed the index: {last[0]} -> {now}")
                    last[0] = now
            workers = 4 if service == "generation" else 8
            driver.send(stack.target(service), m, payloads, sink, metadata=stack.metadata(service), check=check,
                        workers=workers)

    started = time.monotonic()
    _real_work(stack)  # warm-up: each service's models and parsers loaded, every code path taken once
    for service in SERVICES:
        fuzz(service, WARMUP, SEED + 1, driver.Tally())
    _real_work(stack)
    rss_before = {service: stack.rss(service) for service in SERVICES}
    for service in SERVICES:
        fuzz(service, REQUESTS, SEED, tally)
    rss_after = {service: stack.rss(service) for service in SERVICES}
    elapsed = time.monotonic() - started

    lines = [f"{rpc}: {dict(codes)}" for rpc, codes in tally.codes.items()]
    print(f"\n{sum(sum(c.values()) for c in tally.codes.values())} requests in {elapsed:.0f} s\n" + "\n".join(lines))
    for rpc in (driver.path(m) for s in SERVICES for m in driver.methods(s)):
        assert tally.sent(rpc) == REQUESTS, rpc
    assert not tally.bad, "forbidden status codes:\n" + "\n".join(map(str, tally.bad[:20])) + "\n" + "\n".join(
        f"--- {s}\n{stack.log(s)}" for s in {b[0].split('.')[1] for b in tally.bad[:5]})
    for service in SERVICES:
        assert stack.serving(service), f"{service} is not SERVING after the fuzz run:\n{stack.log(service)}"
        assert rss_before[service] > 0
        growth = rss_after[service] / rss_before[service] - 1
        print(f"{service}: RSS {rss_before[service] / 2**20:.0f} -> {rss_after[service] / 2**20:.0f} MiB "
              f"({growth:+.1%})")
        # a leak of even 1 kB per request shows as 20+ MiB here; below that, glibc and pymalloc keep or return
        # the buffers of multi-MB requests as they please. With glibc's dynamic mmap threshold, identical rounds
        # against training drifted 72 -> 90 MiB (one CI run: +23 MiB in the measured round); with the allocator
        # settings it now has (services.common.procs.tune_allocator) they stay within 65-71 MiB
        allowed = max(MAX_RSS_GROWTH * rss_before[service], RSS_NOISE_BYTES)
        assert rss_after[service] - rss_before[service] <= allowed, (
            f"{service}: resident memory grew {growth:.1%} over the fuzz run")

    start_ok = tally.ok("/knowserve.training.v1.TrainingService/StartRun")
    after_runs = stack.unary("training", "ListRuns", tpb.ListRunsRequest(), tpb.ListRunsResponse)
    assert len(after_runs.runs) == len(before_runs.runs) + start_ok, "a rejected StartRun left a run behind"
    assert not list((stack.run / "runs").glob("*")) or start_ok, list((stack.run / "runs").glob("*"))
    observed_ok = tally.ok("/knowserve.answer.v1.AnswerService/ObserveGeneration")
    after_live = stack.unary("answer", "GetLiveStats", apb.GetLiveStatsRequest(), apb.GetLiveStatsResponse)
    assert after_live.answers - before_live.answers <= observed_ok
    swapped = sum(tally.ok(f"/knowserve.generation.v1.GenerationService/{rpc}") for rpc in SWAPS)
    assert swapped or _generation_state(stack) == before_generation, "a rejected swap changed the served model"


@pytest.mark.parametrize("service", SERVICES)
def test_well_formed_requests_never_fail_internally(stack, service):
    def check(method) -> int:
        tally = driver.Tally()

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategies.messages(method.input_type))
        def prop(msg):
            driver.send(stack.target(service), method, [("hypothesis", msg.SerializeToString())], tally,
                        metadata=stack.metadata(service), workers=1)
            assert not tally.bad, tally.bad

        prop()
        return tally.sent(driver.path(method))

    for m in driver.methods(service):
        if service == "generation" and m.name in SWAPS:
            continue  # a well-formed rollback to a kept version is a real swap: the malformed run covers these
        assert check(m) >= 1, m.name
    assert stack.serving(service)


# text a tokenizer keeps something of (letters, digits, punctuation, symbols; any script)
prompts = st.lists(st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=40)
                   .filter(str.strip), min_size=1, max_size=2)


def test_a_prompt_that_encodes_to_no_tokens_is_invalid_argument(stack):
    """Found by the property below: control characters alone encode to nothing, and a forward pass over nothing
    used to fail INTERNAL."""
    with pytest.raises(grpc.RpcError) as err:
        stack.unary("generation", "Generate", gpb.GenerateRequest(prompts=[gpb.Prompt(text="ok"), gpb.Prompt(
            text="\x16")]), gpb.GenerateResponse)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts[1]" in err.value.details()


@settings(max_examples=max(5, EXAMPLES), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(prompts=prompts, max_tokens=st.integers(1, 8), n=st.integers(1, 2),
       temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]), top_p=st.floats(0.05, 1.0),
       top_k=st.integers(0, 50), seed=st.integers(0, 2**31))
def test_generate_properties_on_a_tiny_model(stack, prompts, max_tokens, n, temperature, top_p, top_k, seed):
    request = gpb.GenerateRequest(prompts=[gpb.Prompt(text=p) for p in prompts], sampling=gpb.SamplingParams(
        max_tokens=max_tokens, n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))
    reply = stack.unary("generation", "Generate", request, gpb.GenerateResponse)
    got = sorted((c.prompt_index, c.sample_index) for c in reply.completions)
    assert got == [(p, s) for p in range(len(prompts)) for s in range(n)]
    for c in reply.completions:
        assert 1 <= len(c.token_ids) <= max_tokens, (len(c.token_ids), max_tokens)
        assert c.finish_reason, c
