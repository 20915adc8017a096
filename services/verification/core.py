"""Verification without gRPC: answers -> claims -> evidence -> verdicts -> FActScore.

The core validates a batch against the settings' limits, extracts claims (or takes the given ones), fetches
evidence for every claim of the batch in one retrieval call (unless an item brings its own passages), runs the
chosen judge in a worker thread and aggregates per answer.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from services.common.errors import FailedPrecondition, InvalidArgument, check_range, check_text
from services.common.text import is_refusal, section
from services.retrieval.core import Passage
from services.verification.claims import Claim, split_claims
from services.verification.config import VerificationSettings
from services.verification.judges import NOT_ENOUGH_INFO, REFUTED, SUPPORTED, Judge, Verdict

CLAIMS = Counter("knowserve_verification_claims", "Claims judged, by verdict label and judge.", ["label", "judge"])
ANSWERS = Counter("knowserve_verification_answers",
                  "Answers verified, by kind (claims, empty, refusal, no_claims).", ["kind"])
SUPPORT_RATIO = Histogram("knowserve_verification_support_ratio",
                          "Supported fraction of the claims of each answer with claims (FActScore precision).",
                          ["judge"], buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0))
JUDGE_SECONDS = Histogram("knowserve_verification_judge_duration_seconds",
                          "Wall time of one judge call over a request's claims.", ["judge"],
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
EVIDENCE_SECONDS = Histogram("knowserve_verification_evidence_duration_seconds",
                             "Wall time of the evidence retrieval call of a request.",
                             buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

KIND_CLAIMS, KIND_EMPTY, KIND_REFUSAL, KIND_NO_CLAIMS = "claims", "empty", "refusal", "no_claims"
SECTIONS = ("all", "think", "answer")


def length_penalty(n_claims: int, gamma: float) -> float:
    """FActScore / KnowRL length penalty: ``1 if n > gamma else exp(1 - gamma / n)``; 0 for no claims.

    >>> round(length_penalty(5, 10), 4), length_penalty(11, 10), length_penalty(0, 10)
    (0.3679, 1.0, 0.0)
    """
    if n_claims <= 0:
        return 0.0
    return 1.0 if n_claims > gamma else math.exp(1 - gamma / n_claims)


@dataclass
class VerifyItem:
    answer: str = ""
    claims: Sequence[str] = ()
    topic: str = ""
    evidence: Sequence[Passage] = ()
    section: str = "all"


@dataclass
class ClaimResult:
    text: str
    start: int
    end: int
    label: str
    score: float
    evidence_ids: tuple[str, ...]


@dataclass
class VerifyResult:
    kind: str
    claims: list[ClaimResult] = field(default_factory=list)
    factscore: float = 0.0  # supported / claims
    length_penalized_score: float = 0.0  # factscore * length_penalty(claims, gamma)
    supported: int = 0
    refuted: int = 0
    not_enough_info: int = 0


SearchFn = Callable[[list[str], int], Awaitable[list[list[Passage]]]]


class VerificationCore:
    """``await core.verify([VerifyItem(answer="...")], judge="lexical")``"""

    def __init__(self, settings: VerificationSettings, search: SearchFn, judges: dict[str, Judge],
                 unavailable: dict[str, str] | None = None, llm_generate=None):
        self.settings = settings
        self.search = search  # (queries, top_k) -> passages per query; raises when retrieval is down
        self.judges = judges
        self.unavailable = unavailable or {}  # judge name -> why it cannot run here
        self.llm_generate = llm_generate  # the generation service, for the LLM claim extractor (None: off)

    def _validate(self, items: Sequence[VerifyItem], judge: str, top_k: int, gamma: float) -> None:
        s = self.settings
        if not items:
            raise InvalidArgument("items", "at least one item is required")
        if len(items) > s.max_items:
            raise InvalidArgument("items", f"{len(items)} items, above the limit of {s.max_items}")
        if judge not in self.judges:
            if judge in self.unavailable:
                raise FailedPrecondition(f"judge {judge!r} is not available: {self.unavailable[judge]}")
            raise InvalidArgument("judge", f"unknown judge {judge!r}; known: {sorted(self.judges)}")
        check_range("evidence_top_k", top_k, low=1, high=s.max_evidence_top_k)
        if not (math.isfinite(gamma) and gamma > 0):
            raise InvalidArgument("gamma", f"must be a finite number above 0, got {gamma}")
        for i, it in enumerate(items):
            check_text(f"items[{i}].answer", it.answer, max_bytes=s.max_answer_bytes, allow_empty=True)
            check_text(f"items[{i}].topic", it.topic, max_bytes=s.max_topic_bytes, allow_empty=True)
            if it.section not in SECTIONS:
                raise InvalidArgument(f"items[{i}].section", f"unknown section {it.section!r}; use {SECTIONS}")
            if len(it.claims) > s.max_claims_per_item:
                raise InvalidArgument(f"items[{i}].claims",
                                      f"{len(it.claims)} claims, above the limit of {s.max_claims_per_item}")
            for j, c in enumerate(it.claims):
                check_text(f"items[{i}].claims[{j}]", c, max_bytes=s.max_claim_bytes)
            if len(it.evidence) > s.max_evidence_passages:
                raise InvalidArgument(f"items[{i}].evidence", f"{len(it.evidence)} passages, above the limit of "
                                      f"{s.max_evidence_passages}")
            for j, p in enumerate(it.evidence):
                check_text(f"items[{i}].evidence[{j}].text", p.text, max_bytes=s.max_answer_bytes)

    def extract(self, item: VerifyItem) -> tuple[str, list[Claim]]:
        """(kind, claims) of one item: given claims win; else the chosen section of the answer is split."""
        if item.claims:
            claims = []
            for c in item.claims:
                at = item.answer.find(c) if item.answer else -1
                claims.append(Claim(c, at, at + len(c) if at >= 0 else -1))
            return KIND_CLAIMS, claims
        text, offset = section(item.answer, item.section)
        if not text.strip():
            return KIND_EMPTY, []
        if is_refusal(text):
            return KIND_REFUSAL, []
        claims = split_claims(text, offset)
        if not claims:
            return KIND_NO_CLAIMS, []
        if len(claims) > self.settings.max_claims_per_item:
            raise InvalidArgument("answer", f"{len(claims)} claims after splitting, above the limit of "
                                  f"{self.settings.max_claims_per_item}; send a shorter answer or raise "
                                  "KNOWSERVE_VERIFICATION_MAX_CLAIMS_PER_ITEM")
        return KIND_CLAIMS, claims

    async def _extract_llm(self, item: VerifyItem) -> tuple[str, list[Claim]]:
        from services.verification.llm import llm_extract

        kind, claims = self.extract(item)
        if kind != KIND_CLAIMS or item.claims:
            return kind, claims
        text, offset = section(item.answer, item.section)
        claims = await llm_extract(self.llm_generate, text, offset, self.settings.llm_extract_max_tokens)
        return (KIND_CLAIMS, claims[: self.settings.max_claims_per_item]) if claims else (KIND_NO_CLAIMS, [])

    async def verify(self, items: Sequence[VerifyItem], judge: str = "", evidence_top_k: int = 0,
                     gamma: float = 0.0, extractor: str = "deterministic") -> list[VerifyResult]:
        s = self.settings
        judge = judge or s.default_judge
        top_k = evidence_top_k or s.default_evidence_top_k
        gamma = gamma or s.gamma
        self._validate(items, judge, top_k, gamma)
        if extractor == "llm" and self.llm_generate is None:
            raise FailedPrecondition("the llm claim extractor needs the generation service: set "
                                     "KNOWSERVE_VERIFICATION_GENERATION_TARGET")
        extracted = []
        for i, it in enumerate(items):
            try:
                extracted.append(await self._extract_llm(it) if extractor == "llm" else self.extract(it))
            except InvalidArgument as e:
                raise InvalidArgument(f"items[{i}].{e.field}", e.problem) from None

        # One retrieval call for every claim of the batch that has no evidence of its own.
        queries: list[str] = []
        for it, (kind, claims) in zip(items, extracted):
            if kind == KIND_CLAIMS and not it.evidence:
                queries += [f"{it.topic} {c.text}".strip() for c in claims]
        retrieved: list[list[Passage]] = []
        if queries:
            start = time.perf_counter()
            for i in range(0, len(queries), 256):  # the retrieval service's default max_queries
                retrieved += await self.search(queries[i: i + 256], top_k)
            EVIDENCE_SECONDS.observe(time.perf_counter() - start)

        flat_claims: list[str] = []
        flat_evidence: list[Sequence[Passage]] = []
        k = 0
        for it, (kind, claims) in zip(items, extracted):
            for c in claims:
                flat_claims.append(c.text)
                if it.evidence:
                    flat_evidence.append(list(it.evidence))
                else:
                    flat_evidence.append(retrieved[k])
                    k += 1
        verdicts: list[Verdict] = []
        if flat_claims:
            j = self.judges[judge]
            start = time.perf_counter()
            if inspect.iscoroutinefunction(j.judge):  # judges that call other services
                verdicts = await j.judge(flat_claims, flat_evidence)
            else:  # model/CPU judges run off the event loop
                verdicts = await asyncio.to_thread(j.judge, flat_claims, flat_evidence)
            JUDGE_SECONDS.labels(judge).observe(time.perf_counter() - start)

        results, k = [], 0
        for kind, claims in extracted:
            ANSWERS.labels(kind).inc()
            r = VerifyResult(kind=kind)
            for c in claims:
                v = verdicts[k]
                k += 1
                r.claims.append(ClaimResult(c.text, c.start, c.end, v.label, v.score, v.evidence_ids))
                CLAIMS.labels(v.label, judge).inc()
            n = len(r.claims)
            r.supported = sum(c.label == SUPPORTED for c in r.claims)
            r.refuted = sum(c.label == REFUTED for c in r.claims)
            r.not_enough_info = sum(c.label == NOT_ENOUGH_INFO for c in r.claims)
            if n:
                r.factscore = r.supported / n
                r.length_penalized_score = r.factscore * length_penalty(n, gamma)
                SUPPORT_RATIO.labels(judge).observe(r.factscore)
            results.append(r)
        return results
