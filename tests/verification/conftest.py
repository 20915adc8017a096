"""Verification fixtures: a cross-encoder trained by the real `train-verifier` recipe (once per session, cached by
recipe hash) and the hand-made fact fixture (start_verification lives in tests/conftest.py)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from services.retrieval.core import Document
from tests.conftest import ROOT

# The hand-made fixture: one passage per subject; claims below are checked against it.
KB = [
    Document("curie", "Marie Curie", "Marie Curie was a Polish physicist and chemist. She was born in Warsaw in 1867. "
             "She won the Nobel Prize in Physics in 1903 and the Nobel Prize in Chemistry in 1911.", "wiki"),
    Document("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level. Its height is "
             "8,849 metres. It lies in the Himalayas on the border between Nepal and China.", "wiki"),
    Document("danube", "Danube", "The Danube is the second-longest river in Europe. It flows through Vienna, "
             "Budapest and Belgrade into the Black Sea.", "wiki"),
]
SUPPORTED_CLAIMS = ["Marie Curie was born in Warsaw.", "Mount Everest is 8,849 metres high.",
                    "The Danube flows into the Black Sea."]
REFUTED_CLAIMS = ["Marie Curie was born in 1871.", "Marie Curie was born in Berlin.",
                  "Mount Everest is 7,200 metres high.", "The Danube flows into the Caspian Sea."]
UNVERIFIABLE_CLAIMS = ["Marie Curie played the violin in an orchestra.", "Mount Everest has a ski resort.",
                       "The Danube is home to a rare blue frog."]


@pytest.fixture(scope="session")
def verifier_model(tmp_path_factory):
    """A CPU-trained cross-encoder from `train_verifier` (the `knowserve train-verifier` recipe).

    500 steps with the word embeddings frozen (~5 min with its data on a fresh clone; 950 steps of the whole model
    took ~11 min of the CI's 40) on VitaminC + FEVER + contrastive edits of the Wikipedia demo corpus (the edits
    alone where BIG-bench cannot be had), cached under .cache/test-verifier/<hash of the recipe and its code>, so a
    re-run reuses it.
    Measured on 2026-12-07: 7/10 fixture claims right with seeds 0 and 1, the same 7 as the 950-step recipe.
    """
    from services.retrieval.demo_corpus import build_wiki_corpus
    from services.verification import nli

    corpus = ROOT / ".knowserve/data/wiki.jsonl"
    if not corpus.exists():
        build_wiki_corpus(corpus, ROOT / ".cache/packages")
    cfg = nli.TrainVerifierConfig(
        out_dir=Path("unset"), layers=3, vitaminc_examples=4000, fever_examples=1000, synthetic_examples=30000,
        corpus_jsonl=corpus, heldout_examples=500,
        max_steps=500, freeze_embeddings=True, time_budget_seconds=float(os.environ.get(
            "KNOWSERVE_TEST_VERIFIER_SECONDS", "1500")), learning_rate=2e-4, batch_size=16, max_length=56,
        threads=2, cache=ROOT / ".cache",
    )
    code = (ROOT / "services/verification/nli.py").read_bytes()
    key = hashlib.sha256(repr(sorted((k, str(v)) for k, v in asdict(cfg).items() if k != "out_dir")).encode()
                         + code).hexdigest()[:12]
    out = ROOT / ".cache/test-verifier" / key
    if not (out / "knowserve_verifier.json").exists():
        cfg.out_dir = out
        nli.train_verifier(cfg, progress=False)
    return nli.CrossEncoder(out)


@pytest.fixture(scope="session")
def feature_judge_dir() -> Path:
    """The feature judge made by `train_judge` with the `knowserve train-judge` defaults (~30-60 s on 2 cores),
    cached under .cache/test-judge/<hash of the code it depends on>, so a re-run reuses it."""
    from services.verification import learned

    code = b"".join((ROOT / "services/verification" / f).read_bytes()
                    for f in ("learned.py", "judges.py", "normalise.py", "contrastive.py", "nli.py"))
    out = ROOT / ".cache/test-judge" / hashlib.sha256(code).hexdigest()[:12]
    if not (out / learned.META_FILE).exists():
        corpus = ROOT / ".knowserve/data/wiki.jsonl"
        learned.train_judge(learned.TrainJudgeConfig(out_dir=out, corpus_jsonl=corpus, cache=ROOT / ".cache"),
                            progress=False)
    return out
