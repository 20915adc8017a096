"""Grounded answers end to end through real services: SmolLM2-135M-Instruct on Ray Serve (from its wheel), real
tantivy retrieval, the lexical judge, the answer service on its real gRPC server — and `knowserve ask`.

A question the knowledge base answers comes back `answered` with a citation to the right passage; one it cannot
answer comes back `abstained` with a refusal that cites what was found (whatever the model made up); a
knowledge edit changes the very next Answer; AnswerStream streams the same text, then the verdicts."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from knowserve.answer.v1 import answer_service_pb2 as pb
from services.retrieval.core import Document
from tests.conftest import FACTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EDIT = Document("dremoria", "Dremoria", "The capital of the Republic of Dremoria is Kelvara, a port city on the "
                "Amber Coast.", "edit")


async def test_answered_abstained_and_a_knowledge_edit_change_the_next_answer(
        smollm2_app, start_answer, start_retrieval, start_verification, capsys):
    app = smollm2_app
    retrieval = await start_retrieval(dense=False, default_mode="bm25")
    await retrieval.client.upsert(FACTS)
    verification = await start_verification(retrieval_target=retrieval.server.address)
    answer = await start_answer(retrieval_target=retrieval.server.address,
                                verification_target=verification.server.address, generation_target=app.target,
                                generation_app_name=app.app_name, default_max_tokens=48)
    client = answer.client

    known = await client.answer("What is the capital of Japan?")
    assert known.outcome == pb.OUTCOME_ANSWERED, known
    assert "Tokyo" in known.answer and known.answer == known.generated.strip() and known.verified
    assert known.support == 1.0 and [c.verdict for c in known.claims] == [pb.VERDICT_SUPPORTED] * len(known.claims)
    assert [c.passage_id for c in known.citations] == ["tokyo"] and known.citations[0].title == "Tokyo"
    assert known.citations[0].claim_indexes == list(range(len(known.claims)))
    claim = known.claims[0]
    assert known.generated[claim.start:claim.end] == claim.text  # spans point into the generated answer
    assert known.model == "smollm2-135m-instruct" and known.weight_version >= 1
    assert set(known.timings) == {"retrieval", "generation", "verification"}

    unknown = await client.answer("Who won the 2031 Zorblax Prize for hyperspace cooking?")
    assert unknown.outcome == pb.OUTCOME_ABSTAINED, unknown
    assert unknown.answer.startswith("I don't know") and "Closest passages" in unknown.answer
    assert unknown.support < 0.5 and not unknown.citations
    assert unknown.generated  # what the model said is kept beside the refusal

    question = "What is the capital of the Republic of Dremoria?"
    before = await client.answer(question)
    assert before.outcome == pb.OUTCOME_ABSTAINED and "Kelvara" not in before.answer
    await retrieval.client.upsert([EDIT])  # the knowledge edit: visible to the very next Answer
    after = await client.answer(question)
    assert after.outcome == pb.OUTCOME_ANSWERED and "Kelvara" in after.answer, after
    assert [c.passage_id for c in after.citations] == ["dremoria"]

    # a per-request threshold above the support turns the same kind of answer into an abstention
    strict = await client.answer(question, support_threshold=1.0, top_k=1)
    assert strict.outcome in (pb.OUTCOME_ANSWERED, pb.OUTCOME_ABSTAINED)
    assert (strict.outcome == pb.OUTCOME_ANSWERED) == (strict.support == 1.0)

    # the stream: the same greedy text token by token, then the verdicts
    deltas, final = [], None
    async for chunk in client.answer_stream("What is the capital of Japan?"):
        if chunk.HasField("result"):
            final = chunk.result
        else:
            deltas.append(chunk.text_delta)
    assert len(deltas) > 1 and "".join(deltas) == known.generated
    assert final is not None and final.outcome == pb.OUTCOME_ANSWERED and final.citations[0].passage_id == "tokyo"

    # every Answer was counted live, by the model and version that answered
    version = str(known.weight_version)
    answered = REGISTRY.get_sample_value("knowserve_live_answers_total", {
        "model": "smollm2-135m-instruct", "weight_version": version, "outcome": "answered"})
    assert answered is not None and answered >= 3
    stats = await client.live_stats("smollm2-135m-instruct", known.weight_version)
    assert stats.answers >= 5 and stats.unsupported_answers >= 2  # the made-up prize and the stale capital

    # `knowserve ask` prints the same grounded answer
    from services.cli import main

    code = await asyncio.to_thread(main, ["ask", "What is the capital of Japan?", "--target", answer.server.address])
    out = capsys.readouterr().out
    assert code == 0 and "Tokyo" in out and "[answered]" in out and "[tokyo] Tokyo" in out
