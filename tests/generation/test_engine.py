"""The transformers engine's own sampler and logprobs against the model's raw distribution (a real tiny model).

The engine samples by inverse CDF inside a logits processor instead of ``generate``'s ``torch.multinomial``
(20x cheaper on CPU); these tests check that it still draws from the distribution the request asked for.
"""

from __future__ import annotations

import math

import pytest

from services.generation.engine import Sampling, TransformersEngine


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine.from_path(tiny_model, max_model_len=512)


def next_token_logits(engine, ids):
    import torch

    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # [vocab]


def test_first_token_frequencies_match_the_warped_softmax(engine):
    import torch

    ids = engine.encode("The capital of France is")
    # the untrained tiny model is nearly uniform; a low temperature makes its top 5 clearly unequal
    temperature, top_k, rows = 0.05, 5, 1200
    logits = next_token_logits(engine, ids)
    top = torch.topk(logits, top_k)
    expected = torch.softmax(top.values / temperature, -1)  # [top_k]
    outs = engine.generate([ids] * rows, [Sampling(temperature=temperature, top_k=top_k, max_tokens=1, seed=11,
                                                   logprobs=False)] * rows)
    drawn = [o.token_ids[0] for o in outs]
    assert set(drawn) <= set(top.indices.tolist()), "a token outside top_k was drawn"
    observed = torch.tensor([drawn.count(int(t)) for t in top.indices], dtype=torch.float) / rows
    # 4.5 standard errors per token: fails on a wrong temperature, a missing top-k or a biased draw
    se = (expected * (1 - expected) / rows).sqrt()
    assert expected.max() - expected.min() > 0.2, "the check needs an uneven distribution to mean something"
    assert torch.all((observed - expected).abs() <= 4.5 * se + 1e-3), (observed, expected)


def test_top_p_keeps_only_the_nucleus(engine):
    import torch

    ids = engine.encode("Water boils at")
    probs = torch.softmax(next_token_logits(engine, ids), -1)
    sorted_p, order = probs.sort(descending=True)
    keep = int((sorted_p.cumsum(0) < 0.5).sum()) + 1  # the smallest set whose mass reaches 0.5
    outs = engine.generate([ids] * 300, [Sampling(temperature=1.0, top_p=0.5, max_tokens=1, seed=3,
                                                  logprobs=False)] * 300)
    assert {o.token_ids[0] for o in outs} <= set(order[:keep].tolist())


def test_seeds_reproduce_and_differ(engine):
    ids = engine.encode("Shakespeare wrote")
    run = lambda seed: [o.token_ids for o in engine.generate([ids] * 4, [Sampling(max_tokens=8, seed=seed)] * 4)]
    assert run(5) == run(5)
    assert run(5) != run(6)
    assert len({tuple(t) for t in run(5)}) > 1, "rows of one seeded batch must not share one draw"


def test_logprobs_are_the_raw_log_softmax_of_the_chosen_tokens(engine):
    import torch

    ids = engine.encode("Mount Everest is")
    out = engine.generate([ids], [Sampling(temperature=1.5, max_tokens=6, seed=1)])[0]
    assert len(out.logprobs) == len(out.token_ids) >= 1
    full = torch.tensor([ids + out.token_ids])
    with torch.inference_mode():
        logp = engine.model(input_ids=full).logits[0].float().log_softmax(-1)  # [seq, vocab]
    expected = [float(logp[len(ids) - 1 + t, tok]) for t, tok in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)  # before temperature: the policy's own logprob
    skipped = engine.generate([ids], [Sampling(temperature=1.5, max_tokens=6, seed=1, logprobs=False)])[0]
    assert skipped.token_ids == out.token_ids and all(math.isnan(x) for x in skipped.logprobs)


def test_top_k_1_sampling_is_greedy(engine):
    ids = engine.encode("The largest planet is")
    greedy = engine.generate([ids], [Sampling(temperature=0, max_tokens=10)])[0]
    top1 = engine.generate([ids], [Sampling(temperature=1.3, top_k=1, max_tokens=10, seed=9)])[0]
    assert top1.token_ids == greedy.token_ids


def test_a_checkpoint_with_the_same_tokenizer_files_reuses_the_serving_tokenizer(engine, tiny_model, tmp_path):
    import json
    import shutil

    same = shutil.copytree(tiny_model, tmp_path / "same")
    reused = TransformersEngine.from_path(same, 512, like=engine)
    assert reused.tokenizer is engine.tokenizer and reused.model is not engine.model

    other = shutil.copytree(tiny_model, tmp_path / "other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 123
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    fresh = TransformersEngine.from_path(other, 512, like=engine)
    assert fresh.tokenizer is not engine.tokenizer and fresh.tokenizer.model_max_length == 123
