"""The llm judge and the LLM claim extractor through the real generation service on Ray Serve.

The served model is a tiny Llama taught (in seconds, here) to answer this test's two judge prompts "Yes" and
"No"; it is pushed to the running service with UpdateWeights, so the verdicts below come from the model's own
first-token probabilities, not from anything the test fakes."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from knowserve.verification.v1 import verification_service_pb2 as pb
from services.generation.client import GenerationClient
from services.verification.core import VerifyItem
from services.verification.llm import JUDGE_PROMPT
from tests.conftest import SERVE_APP
from tests.taught import teach_answers
from tests.verification.conftest import KB

pytestmark = pytest.mark.timeout(900)


async def test_llm_judge_reads_yes_no_from_the_served_model(start_retrieval, start_verification, serve_generation):
    from services.generation.engine import TransformersEngine

    target, root, _ = serve_generation
    retrieval = await start_retrieval()
    await retrieval.client.upsert(KB)
    claims = {"Marie Curie was born in Warsaw.": "Yes", "Marie Curie was born in Berlin.": "No"}
    engine = await asyncio.to_thread(TransformersEngine.from_path, root / "v1", 512)  # its tokenizer and template
    pairs = []
    for claim, answer in claims.items():
        passages = (await retrieval.client.search([claim], top_k=1))[0]
        evidence = "\n".join(f"[{p.title}] {p.text}" for p in passages)
        chat = [{"role": "user", "content": JUDGE_PROMPT.format(evidence=evidence, claim=claim)}]
        pairs.append((engine.apply_chat_template(chat), engine.encode(answer) + [engine.tokenizer.eos_token_id]))
    taught = root / "llm-judge"
    await asyncio.to_thread(teach_answers, root / "v1", pairs, taught, 120)
    async with GenerationClient(target, app_name=SERVE_APP) as gen:
        info = await gen.model_info()
        await gen.update_weights(str(taught), info.weight_version + 1)
        # what the served model returns to the judge: the word, without the end-of-turn token it wrote
        served = await gen.greedy([[{"role": "user", "content": JUDGE_PROMPT.format(
            evidence="\n".join(f"[{p.title}] {p.text}" for p in (await retrieval.client.search([c], top_k=1))[0]),
            claim=c)}] for c in claims], 2)
        assert [t for t, _ in served] == list(claims.values())

    v = await start_verification(retrieval_target=retrieval.server.address, generation_target=target,
                                 generation_app_name=SERVE_APP, llm_extract_max_tokens=32)
    judges = {j.name: j.ready for j in (await v.client.list_judges()).judges}
    assert judges["llm"] is True
    reply = await v.client.verify([VerifyItem(claims=list(claims))], judge="llm", evidence_top_k=1)
    got = [(pb.Label.Name(c.label), c.score) for c in reply.results[0].claims]
    assert [g[0] for g in got] == ["LABEL_SUPPORTED", "LABEL_REFUTED"], got
    assert all(0.5 < score <= 1.0 for _, score in got)  # the probability of the model's greedy first token
    assert reply.results[0].claims[0].evidence_ids[0].startswith("curie")

    # the LLM extractor: the same model is no fact splitter, so each sentence comes back whole (the fallback),
    # with its span; the call itself goes through the generation service
    answer = "Marie Curie was born in Warsaw. She won the Nobel Prize in Physics in 1903."
    request_extractor = await v.client.call("Verify", pb.VerifyRequest(
        items=[pb.VerifyItem(answer=answer)], judge="lexical", extractor=pb.CLAIM_EXTRACTOR_LLM))
    extracted = request_extractor.results[0].claims
    assert len(extracted) >= 2  # at least one claim per sentence
    assert all(0 <= c.start < c.end <= len(answer) for c in extracted)
    shutil.rmtree(taught, ignore_errors=True)
