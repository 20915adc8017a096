"""Grounded answers and the live hallucination monitor, without gRPC.

**Answer** (:meth:`AnswerCore.answer`): a question (and optionally the conversation so far) -> top-k passages from
the retrieval service, placed in the prompt with their ids (or the model's own search protocol: retrieval inside
generation, and the documents it read are the evidence) -> the served model's answer (generation service) -> its
claims verified against exactly that evidence (verification service) -> the answer with citations (the supported
claims' passages and spans), each claim's verdict and score, the support (FActScore precision), and an outcome:
``answered`` (every claim supported), ``flagged`` (support at or above the threshold, unsupported claims marked) or
``abstained`` (support below the threshold, no claim, or the model declined: the answer is replaced by a refusal
that cites what was found).

**Live monitor** (:class:`LiveMonitor`): every Answer is counted with the verdicts it was returned with; the share
of plain Generate traffic the generation service samples (``ObserveGeneration``) is verified **off the request
path**: a bounded queue in front of the verification service, a worker draining it; a full queue drops the sample
and counts it, never blocking or failing a user's call. A sampled completion is checked as
:func:`~services.common.grading.live_claim_text` makes it (tool blocks and tags out; a bare short answer after its
question) against evidence the verification service retrieves. Per served model and weight version it keeps the
last verified answers (what the hallucination-gated swap compares) and exports Prometheus figures whose
``weight_version`` label is bounded: only the versions the generation service still keeps; the series of dropped
versions are removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import InvalidArgument, Unavailable, check_text
from services.common.grading import live_claim_text
from services.common.text import is_refusal

log = logging.getLogger(__name__)

ANSWERED, ABSTAINED, FLAGGED = "answered", "abstained", "flagged"
DECLINED = "declined"  # live outcome only: the model refused or asserted nothing checkable
SUPPORTED, REFUTED, NOT_ENOUGH_INFO = "SUPPORTED", "REFUTED", "NOT_ENOUGH_INFO"
PASSAGES, SEARCH_TOOL = "passages", "search_tool"

LIVE_CLAIMS = Counter("knowserve_live_claims", "Claims of served answers verified live, by verdict.",
                      ["model", "weight_version", "verdict"])
LIVE_ANSWERS = Counter("knowserve_live_answers", "Served answers verified live, by outcome: answered (every claim "
                       "supported), flagged (support at or above the threshold, not every claim), abstained (support "
                       "below it), declined (the model refused, or stated no checkable claim).",
                       ["model", "weight_version", "outcome"])
LIVE_UNSUPPORTED = Counter("knowserve_live_unsupported_answers", "Served answers with a refuted claim or support "
                           "below the threshold (what the hallucination gate compares).", ["model", "weight_version"])
LIVE_SUPPORT = Histogram("knowserve_live_support_ratio", "Share of a served answer's claims the evidence supports.",
                         ["model", "weight_version"], buckets=(0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0))
LIVE_LAG = Histogram("knowserve_live_verification_lag_seconds", "Time from a served answer to its live verdict.",
                     ["model"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
OTHER_SERIES = "_other"  # the model label of samples dropped for opening one series too many
LIVE_DROPPED = Counter("knowserve_live_dropped_samples", "Samples not verified: the queue was full, or verification "
                       "was unavailable.", ["model", "reason"])
LIVE_QUEUE = Gauge("knowserve_live_queue_depth", "Samples waiting for live verification.")
ANSWER_OUTCOMES = Counter("knowserve_answer_outcomes", "Answer RPC results by outcome.", ["model", "outcome"])
ANSWER_PHASE = Histogram("knowserve_answer_phase_seconds", "Time of each phase of an Answer.", ["phase"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

SYSTEM_PROMPT = ("Answer the question using only the passages below. Answer in one or two short sentences. If the "
                 "passages do not contain the answer, say \"I don't know\".")
REFUSAL = "I don't know: the knowledge base does not support an answer."


@dataclass
class Limits:
    max_question_bytes: int = 2000
    max_turns: int = 20
    default_top_k: int = 4
    max_top_k: int = 10
    default_max_tokens: int = 96
    max_tokens_limit: int = 256
    default_support_threshold: float = 0.5
    max_completion_bytes: int = 16_000


@dataclass
class Claim:
    text: str
    start: int
    end: int
    verdict: str
    score: float
    passage_ids: list[str]


@dataclass
class AnswerResult:
    answer: str
    outcome: str
    generated: str
    claims: list[Claim]
    citations: list[tuple[str, str, list[int]]]  # (passage id, title, claim indexes)
    support: float
    evidence: list  # retrieval Passages
    model: str
    weight_version: int
    verified: bool
    timings: dict[str, float] = field(default_factory=dict)


def outcome_of(claims: Sequence[Claim], threshold: float, declined: bool) -> tuple[str, float]:
    """(outcome, support) of a verified answer.

    >>> c = lambda v: Claim("x", 0, 1, v, 1.0, [])
    >>> outcome_of([c("SUPPORTED"), c("SUPPORTED")], 0.5, False), outcome_of([c("SUPPORTED"), c("REFUTED")], 0.5, False)
    (('answered', 1.0), ('flagged', 0.5))
    >>> outcome_of([c("SUPPORTED"), c("NOT_ENOUGH_INFO"), c("REFUTED")], 0.5, False)[0], outcome_of([], 0.5, False)[0]
    ('abstained', 'abstained')
    """
    support = sum(c.verdict == SUPPORTED for c in claims) / len(claims) if claims else 0.0
    if declined or not claims or support < threshold:
        return ABSTAINED, support
    return (ANSWERED if support == 1.0 else FLAGGED), support


def refusal_with_sources(evidence: Sequence) -> str:
    """The refusal an abstained answer becomes: it cites what was found."""
    if not evidence:
        return REFUSAL + " Nothing relevant was found."
    found = "; ".join(f"[{p.id}] {p.title}" for p in evidence[:3])
    return f"{REFUSAL} Closest passages: {found}."


def search_instructions(tags: tuple[str, str, str, str]) -> str:
    """The system prompt of the search-tool mode, for a protocol's (query open, query close, docs open, docs
    close) tags."""
    q_open, q_close, d_open, d_close = tags
    return (f"Answer the question. To look something up in the knowledge base, write {q_open} your query {q_close}; "
            f"the documents found come back between {d_open} and {d_close}. Then give the final answer, one short "
            "sentence, between <answer> and </answer>. If the documents do not contain the answer, answer \"I don't "
            "know\".")


def build_prompt(question: str, conversation: Sequence[dict], evidence: Sequence,
                 system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages: the instructions with the passages (each with its id), the conversation, the question.

    >>> class P: id, title, text = "mars#0", "Mars", "Mars is the fourth planet."
    >>> build_prompt("Which planet is fourth?", [], [P()])[0]["content"].splitlines()[-1]
    '[mars#0] Mars: Mars is the fourth planet.'
    """
    passages = "\n".join(f"[{p.id}] {p.title}: {p.text}" for p in evidence)
    system = system_prompt + (f"\n\nPassages:\n{passages}" if passages else "")
    return [{"role": "system", "content": system}, *conversation, {"role": "user", "content": question}]


@dataclass
class Sample:
    """A served answer to verify live: its text and the evidence it was given (None: retrieve evidence)."""

    model: str
    weight_version: int
    prompt: str
    text: str
    evidence: list | None
    queued_at: float = field(default_factory=time.monotonic)
    declined: bool = False  # the model refused: counted as abstained, nothing to verify


# (answer text, evidence passages or None, topic) -> [(claim text, start, end, label, score, evidence ids)]
VerifyFn = Callable[[str, list | None, str], Awaitable[list[tuple[str, int, int, str, float, list[str]]]]]


def check_turns(turns: int, limit: int) -> None:
    """INVALID_ARGUMENT for a conversation of more than ``limit`` turns."""
    if turns > limit:
        raise InvalidArgument("conversation", f"{turns} turns, above the limit of {limit}")


class LiveMonitor:
    """The bounded live-verification queue and its per-version figures (see the module docstring)."""

    def __init__(self, verify: VerifyFn, queue_size: int, window: int, threshold: float,
                 kept_versions: Callable[[], Awaitable[dict[str, set[int]]]] | None = None,
                 prune_seconds: float = 30.0, max_series: int = 64):
        self.verify = verify
        self.max_series = max_series  # (model, version) series tracked: bounds memory and metric cardinality
        self._admitted: set[tuple[str, int]] = set()
        self.queue: asyncio.Queue[Sample] = asyncio.Queue(maxsize=queue_size)
        self.window = window
        self.threshold = threshold
        self.kept_versions = kept_versions
        self.prune_seconds = prune_seconds
        self.recent: dict[tuple[str, int], deque] = {}  # (model, version) -> deque[(unsupported, claims, refuted)]
        self._labels: set[tuple[str, str]] = set()
        self._worker: asyncio.Task | None = None
        self._pruner: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())
        if self.kept_versions is not None:
            self._pruner = asyncio.get_running_loop().create_task(self._prune_loop())

    async def stop(self) -> None:
        for task in (self._worker, self._pruner):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def offer(self, sample: Sample) -> bool:
        """Queue ``sample`` without waiting; False (counted) when the queue is full, or when it would open a
        series past ``max_series`` (a caller naming ever new models or versions cannot grow memory or metrics)."""
        key = (sample.model, sample.weight_version)
        if key not in self._admitted:
            if len(self._admitted) >= self.max_series:
                LIVE_DROPPED.labels(OTHER_SERIES, "too_many_series").inc()
                return False
            self._admitted.add(key)
        try:
            self.queue.put_nowait(sample)
        except asyncio.QueueFull:
            LIVE_DROPPED.labels(sample.model, "queue_full").inc()
            return False
        LIVE_QUEUE.set(self.queue.qsize())
        return True

    async def _run(self) -> None:
        while True:
            sample = await self.queue.get()
            LIVE_QUEUE.set(self.queue.qsize())
            if sample.declined:
                self.record(sample, [])
                continue
            try:
                claims = await self.verify(sample.text, sample.evidence, sample.prompt)
            except Exception as e:  # noqa: BLE001 - a live verdict that cannot be had is counted, never raised
                LIVE_DROPPED.labels(sample.model, "verification_unavailable").inc()
                log.warning("live verification failed: %s", e)
                continue
            self.record(sample, claims)

    def record(self, sample: Sample, claims: list) -> str:
        """Count a verified served answer (its claims as (text, start, end, verdict, score, ids)); its outcome."""
        version = str(sample.weight_version)
        self._labels.add((sample.model, version))
        labels = [c[3] for c in claims]
        for label in labels:
            LIVE_CLAIMS.labels(sample.model, version, label.lower()).inc()
        support = labels.count(SUPPORTED) / len(labels) if labels else 0.0
        declined = sample.declined or not labels
        outcome = DECLINED if declined else ABSTAINED if support < self.threshold else (
            ANSWERED if support == 1.0 else FLAGGED)
        LIVE_ANSWERS.labels(sample.model, version, outcome).inc()
        if labels:
            LIVE_SUPPORT.labels(sample.model, version).observe(support)
        LIVE_LAG.labels(sample.model).observe(time.monotonic() - sample.queued_at)
        if not declined:  # an answer that asserted something: supported, or not (the hallucination rate)
            unsupported = REFUTED in labels or support < self.threshold
            if unsupported:
                LIVE_UNSUPPORTED.labels(sample.model, version).inc()
            history = self.recent.setdefault((sample.model, sample.weight_version), deque(maxlen=self.window))
            history.append((unsupported, len(labels), labels.count(REFUTED)))
        return outcome

    def stats(self, model: str, version: int, last: int = 0) -> tuple[int, int, int, int]:
        """(answers, unsupported answers, claims, refuted claims) of the last ``last`` verified answers."""
        history = list(self.recent.get((model, version), ()))
        if last:
            history = history[-last:]
        return (len(history), sum(h[0] for h in history), sum(h[1] for h in history), sum(h[2] for h in history))

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.prune_seconds)
            try:
                self.prune(await self.kept_versions())
            except Exception as e:  # noqa: BLE001 - generation down: keep everything until it answers
                log.info("kept versions unknown (%s); nothing pruned", e)

    def prune(self, kept: dict[str, set[int]]) -> list[tuple[str, str]]:
        """Remove the series and history of versions generation no longer keeps; returns the removed labels."""
        removed = []
        if kept:  # generation answered: series of models it does not serve at all go too
            for model, version in list(self._admitted):
                if model not in kept or version not in kept[model]:
                    self._admitted.discard((model, version))
        for model, version in list(self._labels):
            if kept and (model not in kept or int(version) not in kept[model]):
                for metric, extra in ((LIVE_CLAIMS, [v.lower() for v in (SUPPORTED, REFUTED, NOT_ENOUGH_INFO)]),
                                      (LIVE_ANSWERS, [ANSWERED, FLAGGED, ABSTAINED, DECLINED]),
                                      (LIVE_SUPPORT, [None]), (LIVE_UNSUPPORTED, [None])):
                    for e in extra:
                        try:
                            metric.remove(model, version, *([e] if e else []))
                        except KeyError:
                            pass
                self._labels.discard((model, version))
                self.recent.pop((model, int(version)), None)
                removed.append((model, version))
        return removed


class AnswerCore:
    """Grounded answers (see the module docstring). ``search(queries, top_k)``, ``generate(chat, max_tokens, model,
    tool)`` and the monitor's ``verify`` reach the other services."""

    def __init__(self, limits: Limits, search, generate, verify: VerifyFn, monitor: LiveMonitor,
                 answer_model: str = "", on_verification_unavailable: str = "answer",
                 on_retrieval_unavailable: str = "fail", verify_timeout: float = 60.0,
                 search_prompt: str = ""):
        self.limits = limits
        self.search = search
        self.generate = generate
        self.verify = verify
        self.monitor = monitor
        self.answer_model = answer_model
        self.on_verification_unavailable = on_verification_unavailable
        self.on_retrieval_unavailable = on_retrieval_unavailable
        self.verify_timeout = verify_timeout
        self.search_prompt = search_prompt

    def validate(self, question: str, conversation: Sequence[dict], top_k: int, threshold: float | None,
                 max_tokens: int) -> tuple[int, float, int]:
        lim = self.limits
        check_text("question", question, max_bytes=lim.max_question_bytes)
        check_turns(len(conversation), lim.max_turns)
        for i, t in enumerate(conversation):
            if t.get("role") not in ("user", "assistant"):
                raise InvalidArgument(f"conversation[{i}].role", f"must be user or assistant, got {t.get('role')!r}")
            check_text(f"conversation[{i}].content", t.get("content", ""), max_bytes=4 * lim.max_question_bytes)
        k = top_k or lim.default_top_k
        if not 1 <= k <= lim.max_top_k:
            raise InvalidArgument("top_k", f"must be between 1 and {lim.max_top_k}, got {top_k}")
        t = lim.default_support_threshold if threshold is None else threshold
        if not (0.0 <= t <= 1.0):  # NaN fails too
            raise InvalidArgument("support_threshold", f"must be in [0, 1], got {threshold}")
        mt = max_tokens or lim.default_max_tokens
        if not 1 <= mt <= lim.max_tokens_limit:
            raise InvalidArgument("max_tokens", f"must be between 1 and {lim.max_tokens_limit}, got {max_tokens}")
        return k, t, mt

    async def _evidence(self, question: str, k: int) -> list:
        try:
            return (await self.search([question], k))[0]
        except Unavailable as e:
            if self.on_retrieval_unavailable == "closed_book":
                return []
            raise Unavailable(f"retrieval: {e}") from None

    async def answer(self, question: str, conversation: Sequence[dict] = (), top_k: int = 0,
                     threshold: float | None = None, mode: str = PASSAGES, model: str = "", max_tokens: int = 0,
                     on_delta=None) -> AnswerResult:
        """The grounded answer (see the module docstring); ``on_delta(text)`` gets streamed text when given."""
        k, t, mt = self.validate(question, conversation, top_k, threshold, max_tokens)
        model = model or self.answer_model
        timings: dict[str, float] = {}
        start = time.perf_counter()
        evidence = [] if mode == SEARCH_TOOL else await self._evidence(question, k)
        timings["retrieval"] = time.perf_counter() - start
        ANSWER_PHASE.labels("retrieval").observe(timings["retrieval"])
        start = time.perf_counter()
        generated, served_model, version, read = await self.generate(
            build_prompt(question, list(conversation), evidence,
                         self.search_prompt if mode == SEARCH_TOOL else SYSTEM_PROMPT),
            mt, model, mode == SEARCH_TOOL, k, on_delta)
        evidence = evidence or read
        timings["generation"] = time.perf_counter() - start
        ANSWER_PHASE.labels("generation").observe(timings["generation"])
        start = time.perf_counter()
        declined = not generated.strip() or is_refusal(generated.strip())
        sample = Sample(served_model, version, question, generated, list(evidence), declined=declined)
        verified, claims = True, []
        if not declined:  # verified on the request path (the caller waits for the verdicts), counted live too
            try:
                raw = await asyncio.wait_for(self.verify(generated, list(evidence), question), self.verify_timeout)
                claims = [Claim(text, s, e, label, score, list(ids)) for text, s, e, label, score, ids in raw]
            except Exception as e:  # noqa: BLE001 - verification down or slow
                verified = False
                LIVE_DROPPED.labels(served_model, "verification_unavailable").inc()
                log.warning("answer not verified: %s", e)
        if verified:
            self.monitor.record(sample, [(c.text, c.start, c.end, c.verdict, c.score, c.passage_ids)
                                         for c in claims])
        if not verified and self.on_verification_unavailable == "fail":
            raise Unavailable("verification is unavailable and KNOWSERVE_ANSWER_ON_VERIFICATION_UNAVAILABLE=fail "
                              "(fail closed)")
        timings["verification"] = time.perf_counter() - start
        ANSWER_PHASE.labels("verification").observe(timings["verification"])
        if verified:
            outcome, support = outcome_of(claims, t, declined)
        else:
            outcome, support = (ABSTAINED, 0.0) if declined else (FLAGGED, 0.0)
        answer = refusal_with_sources(evidence) if outcome == ABSTAINED else generated.strip()
        citations: dict[str, tuple[str, list[int]]] = {}
        titles = {p.id: p.title for p in evidence}
        for i, c in enumerate(claims):
            if c.verdict == SUPPORTED:
                for pid in c.passage_ids:
                    citations.setdefault(pid, (titles.get(pid, ""), []))[1].append(i)
        ANSWER_OUTCOMES.labels(served_model, outcome).inc()
        cited = [(pid, t_, idx) for pid, (t_, idx) in citations.items()]
        return AnswerResult(answer, outcome, generated, claims, cited, support, list(evidence), served_model, version,
                            verified, timings)

    def observe(self, model: str, version: int, prompt: str, completion: str) -> bool:
        """A sampled served completion, verified later against retrieved evidence (never blocks); False when the
        queue is full (the sample is dropped and counted)."""
        lim = self.limits
        check_text("model", model, max_bytes=128)
        check_text("prompt", prompt, max_bytes=4 * lim.max_question_bytes, allow_empty=True)
        check_text("completion", completion, max_bytes=lim.max_completion_bytes, allow_empty=True)
        if version < 0:
            raise InvalidArgument("weight_version", f"must be >= 0, got {version}")
        text = live_claim_text(prompt, completion)
        return self.monitor.offer(Sample(model, version, prompt, text, None, declined=not text))
