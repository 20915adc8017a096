"""The generation core in-process: real tiny models (built here), the real retrieval service for the tool loop.
(The Ray Serve deployment and its gRPC ingress are the next step of issue #6.)"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.generation.core import (TOOL_PROTOCOLS, GenerateParams, GenerationCore, Limits, Prompt, Weights,
                                      WeightSlot)
from services.generation.engine import TransformersEngine
from services.retrieval.core import Document
from tests.taught import teach


def make_core(model_dir, root, search=None, version=1) -> GenerationCore:
    engine = TransformersEngine.from_path(model_dir, max_model_len=512)
    slot = WeightSlot(Weights(engine, version, str(model_dir)), lambda p, like: TransformersEngine.from_path(p, 512, like=like), root)
    return GenerationCore(slot, Limits(max_tokens_limit=64, default_max_tokens=16, max_n=4), search)


async def test_generate_n_samples_with_logprobs_and_version(tiny_model):
    core = make_core(tiny_model, tiny_model.parent)
    out = await core.generate([Prompt(text="Paris is"), Prompt(messages=[{"role": "user", "content": "Hi"}])],
                              GenerateParams(temperature=0.8, max_tokens=6, n=3, seed=7, return_logprobs=True))
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for c in out:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids) == len(c.env_mask)
        assert all(lp <= 0 for lp in c.logprobs) and set(c.env_mask) == {1}
        assert c.weight_version == 1 and c.finish_reason in ("stop", "length")
        assert c.text == core.slot.current.engine.decode(c.token_ids)
    assert out[3].prompt_token_ids != out[0].prompt_token_ids  # the chat template was applied
    greedy = [await core.generate([Prompt(text="Paris is")], GenerateParams(temperature=0, max_tokens=6))
              for _ in range(2)]
    assert greedy[0][0].token_ids == greedy[1][0].token_ids and greedy[0][0].logprobs == []


@pytest.mark.parametrize("prompts, params, field", [
    ([], GenerateParams(), "prompts"),
    ([Prompt(text="  ")], GenerateParams(), "prompts[0].text"),
    ([Prompt(text="x")], GenerateParams(max_tokens=65), "sampling.max_tokens"),
    ([Prompt(text="x")], GenerateParams(max_tokens=-1), "sampling.max_tokens"),
    ([Prompt(text="x")], GenerateParams(temperature=-0.1), "sampling.temperature"),
    ([Prompt(text="x")], GenerateParams(top_p=1.5), "sampling.top_p"),
    ([Prompt(text="x")], GenerateParams(top_p=0.0), "sampling.top_p"),
    ([Prompt(text="x")], GenerateParams(n=5), "sampling.n"),
    ([Prompt(text="x")], GenerateParams(tool_protocol="web"), "tool_protocol"),
    ([Prompt(text="x")], GenerateParams(seed=2**64), "sampling.seed"),
    ([Prompt(text="x")], GenerateParams(stop=("a",) * 17), "sampling.stop"),
    ([Prompt(messages=[{"role": "wizard", "content": "hi"}])], GenerateParams(), "prompts[0].chat.messages[0].role"),
    ([Prompt(messages=[])], GenerateParams(), "prompts[0].chat"),
    ([Prompt(text="word " * 600)], GenerateParams(), "prompts[0]"),
])
async def test_bad_input_names_the_field(tiny_model, prompts, params, field):
    core = make_core(tiny_model, tiny_model.parent)
    with pytest.raises(InvalidArgument) as err:
        await core.generate(prompts, params)
    assert err.value.field == field, str(err.value)


async def test_tool_loop_inserts_retrieved_documents_and_masks_exactly_them(start_retrieval, tiny_model, tmp_path):
    retrieval = await start_retrieval()
    await retrieval.client.upsert([
        Document("eiffel", "Eiffel Tower", "The Eiffel Tower is a wrought-iron tower in Paris, France.", "wiki"),
        Document("fuji", "Mount Fuji", "Mount Fuji is the highest mountain in Japan.", "wiki")])
    protocol = TOOL_PROTOCOLS["r1_searcher"]
    query = "Eiffel Tower city"
    docs = (await retrieval.client.search([query], top_k=1))[0]
    inserted = protocol.format_documents(docs)
    prompt = "Question: Where is the Eiffel Tower?\nAnswer:"
    model_turn_1 = f" {protocol.query_open}{query}{protocol.query_close}"
    model_turn_2 = "<answer>Paris</answer>"
    eos = "<|im_end|>"  # the chat model's end of turn: in token_ids, never in the text
    # a tiny model taught this exact transcript, so greedy decoding reproduces it
    taught = await asyncio.to_thread(teach, tiny_model, [prompt + model_turn_1 + inserted + model_turn_2 + eos],
                                     tmp_path / "taught", 200)

    async def search(queries, top_k):
        return await retrieval.client.search(queries, top_k=top_k)

    core = make_core(taught, tmp_path, search)
    [c] = await core.generate([Prompt(text=prompt)], GenerateParams(
        temperature=0, max_tokens=60, tool_protocol="r1_searcher", max_tool_turns=2, retrieval_top_k=1))
    engine = core.slot.current.engine
    tool_part = engine.decode([t for t, m in zip(c.token_ids, c.env_mask) if m == 0])
    model_part = engine.decode([t for t, m in zip(c.token_ids, c.env_mask) if m == 1])
    assert tool_part == inserted  # exactly the inserted documents are masked out
    assert model_part == model_turn_1 + model_turn_2 + eos and c.tool_turns == 1
    assert c.text == model_turn_1 + inserted + model_turn_2  # what the service returns: no end marker
    assert c.token_ids[-1] in engine.end_ids
    assert c.tool_tokens == len(engine.encode(inserted)) and c.completion_tokens == sum(c.env_mask)
    assert c.finish_reason == "stop"


async def test_swap_is_versioned_and_rejects_bad_checkpoints(tiny_model, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_model, root / "v1")
    core = make_core(root / "v1", root)
    slot = core.slot
    # a newer checkpoint (same architecture, different weights) swaps in; in-flight requests keep theirs
    await asyncio.to_thread(teach, root / "v1", ["hello world"], root / "v2", 5)
    in_flight = asyncio.create_task(core.generate([Prompt(text="Paris is")] * 4,
                                                  GenerateParams(temperature=0, max_tokens=40)))
    await asyncio.sleep(0)
    previous = slot.commit(await asyncio.to_thread(slot.prepare, str(root / "v2"), 2))
    assert previous.version == 1 and slot.current.version == 2
    assert {c.weight_version for c in await in_flight} == {1}
    assert (await core.generate([Prompt(text="x")], GenerateParams(max_tokens=2)))[0].weight_version == 2
    # stale, missing, outside the root, corrupt, wrong architecture: refused, version 2 keeps serving
    with pytest.raises(FailedPrecondition, match="not newer"):
        slot.prepare(str(root / "v2"), 2)
    with pytest.raises(InvalidArgument, match="does not exist"):
        slot.prepare(str(root / "nope"), 3)
    with pytest.raises(InvalidArgument, match="outside the allowed checkpoint root"):
        slot.prepare(str(tiny_model), 3)
    shutil.copytree(root / "v2", root / "corrupt")
    (root / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(FailedPrecondition, match="failed to load"):
        slot.prepare(str(root / "corrupt"), 3)
    gpt2 = root / "gpt2"
    await asyncio.to_thread(_tiny_gpt2, root / "v1", gpt2)
    with pytest.raises(FailedPrecondition, match="GPT2LMHeadModel, the service runs LlamaForCausalLM"):
        slot.prepare(str(gpt2), 3)
    assert slot.current.version == 2
    assert (await core.generate([Prompt(text="x")], GenerateParams(max_tokens=2)))[0].weight_version == 2


def _tiny_gpt2(tokenizer_dir, out):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(out)
    tok.save_pretrained(out)


async def test_concurrent_requests_reach_the_batcher_together(tiny_model):
    """16 concurrent requests must form one 16-prompt engine call: awaiting the batcher through a worker thread
    per request would cap the batch at the default executor's size (6 threads on a 2-core machine)."""
    from services.generation.engine import BatchingEngine

    sizes: list[int] = []
    engine = BatchingEngine(TransformersEngine.from_path(tiny_model, max_model_len=512), max_batch=16,
                            wait_seconds=0.05, observe=sizes.append)
    slot = WeightSlot(Weights(engine, 1, str(tiny_model)), lambda p, like: engine, tiny_model.parent)
    core = GenerationCore(slot, Limits(max_tokens_limit=64, default_max_tokens=16), None)
    outs = await asyncio.gather(*(core.generate([Prompt(text=f"Request {i}")], GenerateParams(max_tokens=4))
                                  for i in range(16)))
    assert all(len(o) == 1 and o[0].token_ids for o in outs)
    assert sizes == [16], sizes
