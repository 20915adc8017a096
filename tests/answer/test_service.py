"""The answer service through its real gRPC server: bad input, faults of its upstreams, and the live monitor's
bounded queue, per-version figures and label pruning (the monitor's core, without a model: nothing here needs
generation to answer)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from services.answer.core import SUPPORTED, LiveMonitor, Sample
from services.common.clients import RemoteError
from services.common.errors import Unavailable
from tests.answer.conftest import PEOPLE_DOCS
from tests.conftest import free_port


def sample_value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_bad_input_is_invalid_argument_naming_the_field(start_answer):
    answer = await start_answer(retrieval_target=f"127.0.0.1:{free_port()}",
                                verification_target=f"127.0.0.1:{free_port()}")
    cases = [(dict(question=""), "question"), (dict(question="x" * 2001), "question"),
             (dict(question="q?", top_k=11), "top_k"), (dict(question="q?", top_k=-1), "top_k"),
             (dict(question="q?", support_threshold=1.5), "support_threshold"),
             (dict(question="q?", support_threshold=float("nan")), "support_threshold"),
             (dict(question="q?", max_tokens=257), "max_tokens"),
             (dict(question="q?", conversation=[{"role": "system", "content": "x"}]), "conversation[0].role")]
    for kwargs, field in cases:
        question = kwargs.pop("question")
        with pytest.raises(RemoteError) as err:
            await answer.client.answer(question, **kwargs)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, err.value.details)
        assert err.value.details.startswith(field), (field, err.value.details)
    with pytest.raises(RemoteError) as err:
        await answer.client.live_stats("m", 1, last=-1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "last" in err.value.details
    with pytest.raises(RemoteError) as err:
        await answer.client.observe("m", -1, "q", "a")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "weight_version" in err.value.details
    with pytest.raises(RemoteError) as err:  # a stream validates before it generates
        async for _ in answer.client.answer_stream("q?", max_tokens=10_000):
            pass
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in err.value.details


async def test_retrieval_down_is_unavailable_naming_retrieval(start_answer):
    answer = await start_answer(retrieval_target=f"127.0.0.1:{free_port()}",
                                verification_target=f"127.0.0.1:{free_port()}", upstream_timeout_seconds=5)
    with pytest.raises(Unavailable) as err:
        await answer.client.answer("Where was Orla Veynd born?")
    assert "retrieval" in str(err.value)


async def test_sampled_traffic_is_verified_off_the_request_path_and_counted_per_version(
        start_answer, start_retrieval, start_verification):
    retrieval = await start_retrieval(dense=False, default_mode="bm25")
    await retrieval.client.upsert(PEOPLE_DOCS)
    verification = await start_verification(retrieval_target=retrieval.server.address)
    answer = await start_answer(retrieval_target=retrieval.server.address,
                                verification_target=verification.server.address)
    model = "live-test-model"
    samples = [("Where was Orla Veynd born?", "Orla Veynd was born in Marrowick."),  # supported
               ("Where was Orla Veynd born?", "Orla Veynd was born in Saltgrove."),  # refuted
               # a bare answer is checked as "Tamsin Quarrel: Ashcombe." (the question's names and the answer): not
               # in a passage about her, so unsupported, but with no relation word left to refute it by: NOT_ENOUGH_INFO
               ("Where was Tamsin Quarrel born?", "<think>I recall it.</think><answer>Ashcombe</answer>"),
               ("Where was Tamsin Quarrel born?", "I don't know."),  # declined: not counted as an answer
               ("Where was Bram Ostrova born?", "Kestrelmoor")]  # a bare answer, checked after its question
    for question, completion in samples:
        assert await answer.client.observe(model, 3, question, completion) is True

    async def verified() -> int:
        return (await answer.client.live_stats(model, 3)).answers

    for _ in range(100):
        if await verified() >= 4:
            break
        await asyncio.sleep(0.1)
    stats = await answer.client.live_stats(model, 3)
    assert (stats.answers, stats.unsupported_answers) == (4, 2), stats
    assert stats.refuted_claims == 1 and stats.claims >= 4
    assert sample_value("knowserve_live_answers_total", model=model, weight_version="3", outcome="declined") == 1
    assert sample_value("knowserve_live_unsupported_answers_total", model=model, weight_version="3") == 2
    assert sample_value("knowserve_live_claims_total", model=model, weight_version="3", verdict="refuted") == 1
    assert (await answer.client.live_stats(model, 3, last=1)).answers == 1
    assert (await answer.client.live_stats(model, 99)).answers == 0


async def test_a_full_queue_drops_and_counts_without_blocking_and_pruning_removes_old_versions():
    release = asyncio.Event()
    seen: list[str] = []

    async def slow_verify(text, evidence, topic):
        await release.wait()
        seen.append(text)
        return [(text, 0, len(text), SUPPORTED, 0.9, ["p#0"])]

    monitor = LiveMonitor(slow_verify, queue_size=2, window=10, threshold=0.5)
    monitor.start()
    before = sample_value("knowserve_live_dropped_samples_total", model="m", reason="queue_full")
    offered = [monitor.offer(Sample("m", 1, "q", f"claim {i}.", None)) for i in range(5)]
    # the worker took one sample and waits in verify; two more fit in the queue; the rest are dropped at once
    assert offered.count(True) in (2, 3) and offered[:2] == [True, True]
    dropped = sample_value("knowserve_live_dropped_samples_total", model="m", reason="queue_full") - before
    assert dropped == offered.count(False)
    release.set()
    for _ in range(50):
        if monitor.stats("m", 1)[0] == offered.count(True):
            break
        await asyncio.sleep(0.02)
    assert monitor.stats("m", 1)[:2] == (offered.count(True), 0)
    monitor.record(Sample("m", 2, "q", "x", None), [("x", 0, 1, SUPPORTED, 1.0, [])])
    assert sample_value("knowserve_live_answers_total", model="m", weight_version="1", outcome="answered") > 0
    removed = monitor.prune({"m": {2}})  # generation keeps only v2 now: v1's series and history go
    assert removed == [("m", "1")]
    assert REGISTRY.get_sample_value("knowserve_live_answers_total",
                                     {"model": "m", "weight_version": "1", "outcome": "answered"}) is None
    assert monitor.stats("m", 1)[0] == 0 and monitor.stats("m", 2)[0] == 1
    await monitor.stop()


async def test_the_live_monitor_tracks_a_bounded_number_of_series():
    """Samples naming ever new models or versions (a caller of ObserveGeneration) cannot grow memory or metric
    labels: past ``max_series`` they are dropped and counted under one label; pruning frees their places."""
    from services.answer.core import OTHER_SERIES, LiveMonitor, Sample

    async def verify(text, evidence, topic):
        return [(text, 0, len(text), SUPPORTED, 0.9, ["p#0"])]

    monitor = LiveMonitor(verify, queue_size=100, window=10, threshold=0.5, max_series=3)
    before = sample_value("knowserve_live_dropped_samples_total", model=OTHER_SERIES, reason="too_many_series")
    offered = [monitor.offer(Sample(f"model-{i}", 1, "q", "claim.", None)) for i in range(10)]
    assert offered == [True] * 3 + [False] * 7
    assert monitor.offer(Sample("model-0", 1, "q", "again.", None))  # a tracked series still takes samples
    assert sample_value("knowserve_live_dropped_samples_total", model=OTHER_SERIES,
                        reason="too_many_series") - before == 7
    monitor.prune({"model-0": {1}})  # generation serves only model-0: the others' places are free again
    assert monitor.offer(Sample("model-5", 1, "q", "claim.", None))
