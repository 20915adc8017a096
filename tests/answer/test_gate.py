"""The hallucination-gated swap end to end: the session's Ray Serve generation app samples every user completion
to a real answer service, which verifies it against real retrieval with the lexical judge; the gate reads those
live figures.

The served model `gated` is a tiny Llama taught (in seconds, here) to answer eight questions about fictional
people: once with their true birthplaces, once with wrong ones. Publishing the wrong one with a gate while users
keep asking: its live answers are refuted, the gate rolls the model back by itself and no request fails; the
true one published with a gate is kept; a gate that never gets its answers ends inconclusive and keeps the
version. Nothing is mocked: the verdicts come from what the served model says."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request

import pytest

from knowserve.generation.v1 import generation_service_pb2 as gpb
from services.common.clients import RemoteError
from services.generation.client import GenerationClient
from tests.answer.conftest import PEOPLE, PEOPLE_DOCS
from tests.conftest import SERVE_APP
from tests.taught import teach_answers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "gated"
M = 8  # verified live answers per version the gates wait for


def questions() -> list[list[dict]]:
    return [[{"role": "user", "content": f"Where was {name} born?"}] for name, _ in PEOPLE]


def teach_birthplaces(base, out, shift: int):
    """A tiny LM answering each question with person i's birthplace taken from person i+shift (0: the truth)."""
    from services.generation.engine import TransformersEngine

    engine = TransformersEngine.from_path(base, 512)
    pairs = []
    for i, chat in enumerate(questions()):
        name, city = PEOPLE[i][0], PEOPLE[(i + shift) % len(PEOPLE)][1]
        pairs.append((engine.apply_chat_template(chat), engine.encode(f"{name} was born in {city}.")
                      + [engine.tokenizer.eos_token_id]))
    return teach_answers(base, pairs, out, 80)


async def test_a_worse_version_is_rolled_back_by_the_gate_and_a_better_one_is_kept(
        serve_generation_app, answer_port, start_answer, start_retrieval, start_verification):
    app = serve_generation_app
    root = app.root
    good, bad = root / "gate-good", root / "gate-bad"
    # one after the other: transformers' from_pretrained is not thread-safe (two loads at once in threads can leave
    # one model's parameters on the meta device)
    await asyncio.to_thread(teach_birthplaces, root / "v1", good, 0)
    await asyncio.to_thread(teach_birthplaces, root / "v1", bad, 3)
    retrieval = await start_retrieval(dense=False, default_mode="bm25")
    await retrieval.client.upsert(PEOPLE_DOCS)
    verification = await start_verification(retrieval_target=retrieval.server.address)
    answer = await start_answer(port=answer_port, retrieval_target=retrieval.server.address,
                                verification_target=verification.server.address, generation_target=app.target)

    failures: list[Exception] = []
    served: list[int] = []

    async def ask(gen: GenerationClient) -> list[str]:
        try:
            reply = await gen.generate(questions(), max_tokens=24, temperature=0)
        except Exception as e:  # noqa: BLE001 - counted: a gate must never fail a user's request
            failures.append(e)
            return []
        served.append(reply.weight_version)
        return [c.text for c in reply.completions]

    async def traffic_until(gen, done, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not await done():
            assert time.monotonic() < deadline, "timed out"
            await ask(gen)
            await asyncio.sleep(0.2)

    async with GenerationClient(app.target, app_name=SERVE_APP, model=MODEL) as gen:
        info = await gen.model_info()
        v_good = max(info.weight_version, info.latest_version) + 1
        await gen.update_weights(str(good), v_good)
        assert await ask(gen) == [f"{n} was born in {c}." for n, c in PEOPLE]  # the taught truth, served
        await traffic_until(gen, lambda: _has(answer, v_good, M))
        good_stats = await answer.client.live_stats(MODEL, v_good, M)
        assert good_stats.unsupported_answers == 0, good_stats  # every true birthplace supported

        # a version taught wrong facts, published with a gate, while users keep asking
        v_bad = v_good + 1
        reply = await gen.update_weights(str(bad), v_bad, gate=gpb.HallucinationGate(min_answers=M, margin=0.1,
                                                                                      window_seconds=240))
        assert reply.gate.state == gpb.GATE_STATE_PENDING and reply.gate.previous_version == v_good

        async def decided() -> bool:
            return (await gen.model_info()).gate.state != gpb.GATE_STATE_PENDING

        await traffic_until(gen, decided)
        info = await gen.model_info()
        assert info.gate.state == gpb.GATE_STATE_ROLLED_BACK, info.gate
        assert info.weight_version == v_good and info.latest_version == v_bad
        assert (info.gate.answers, info.gate.unsupported_answers) == (M, M)
        assert info.gate.p_value < 0.05 and f"rolled back to v{v_good}" in info.gate.message
        assert (await ask(gen))[0] == f"{PEOPLE[0][0]} was born in {PEOPLE[0][1]}."  # the old version serves
        assert failures == [] and v_bad in served  # the bad version did serve, and nothing failed

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10).read().decode()
        assert f'knowserve_generation_swaps_total{{model="{MODEL}",result="rolled_back"}} 1.0' in metrics
        assert f'knowserve_generation_gate_decisions_total{{decision="rolled_back",model="{MODEL}"}}' in metrics \
            or f'knowserve_generation_gate_decisions_total{{model="{MODEL}",decision="rolled_back"}} 1.0' in metrics

        # the training publisher reports the decision in its run's progress events
        from training.services_io import BackgroundLoop, PublishResult, WeightPublisher
        from training.config import PublishGate

        io = BackgroundLoop()
        publisher = WeightPublisher(io, app.target, root / "unused", app_name=SERVE_APP, model=MODEL,
                                    gate=PublishGate(min_answers=M))
        publisher.history.append(PublishResult(True, v_bad, str(bad), 0.1))
        events = await asyncio.to_thread(publisher.gate_events)
        assert len(events) == 1 and events[0].startswith(f"gate rolled_back v{v_bad}: rolled back to v{v_good}")
        assert await asyncio.to_thread(publisher.gate_events) == []  # reported once
        await asyncio.to_thread(publisher.close)
        io.close()

        # the truth again, as a new version with a gate: not worse -> kept
        again = root / "gate-good-2"
        shutil.copytree(good, again, dirs_exist_ok=True)
        v_again = v_bad + 1
        await gen.update_weights(str(again), v_again, gate=gpb.HallucinationGate(min_answers=M, window_seconds=240))
        await traffic_until(gen, decided)
        info = await gen.model_info()
        assert info.gate.state == gpb.GATE_STATE_KEPT and info.weight_version == v_again, info.gate

        # no traffic within the window: inconclusive, the new version stays
        v_quiet = v_again + 1
        shutil.copytree(good, root / "gate-quiet", dirs_exist_ok=True)
        await gen.update_weights(str(root / "gate-quiet"), v_quiet,
                                 gate=gpb.HallucinationGate(min_answers=M, window_seconds=1.5))
        for _ in range(40):
            if await decided():
                break
            await asyncio.sleep(0.25)
        info = await gen.model_info()
        assert info.gate.state == gpb.GATE_STATE_INCONCLUSIVE and info.weight_version == v_quiet, info.gate
        assert f"only 0 of {M}" in info.gate.message

        # a bad gate is refused, naming the field
        with pytest.raises(RemoteError) as err:
            await gen.update_weights(str(good), v_quiet + 1, gate=gpb.HallucinationGate(alpha=2.0))
        assert err.value.details.startswith("gate.alpha")
        assert failures == []


async def _has(answer, version: int, n: int) -> bool:
    return (await answer.client.live_stats(MODEL, version)).answers >= n
