"""Generation without gRPC or Ray: validation, chat templates, n samples, the retrieval tool loop, weight versions.

The Ray Serve deployment of each model (:mod:`.replica`) wraps one :class:`GenerationCore` per replica;
everything here is testable in-process.

**Tool loop** (R1-Searcher / Search-R1). With a tool protocol on, generation stops at the protocol's query end
tag; the text since the last query start tag is sent to the retrieval service (one batched Search for every
sample that asked, per turn), the documents are inserted between the protocol's document tags, and generation
continues from there, up to ``max_tool_turns``. Each completion carries ``env_mask``: 1 for tokens the model
wrote, 0 for inserted document tokens, aligned with ``token_ids`` — the trainer multiplies its loss by it.

**Weights.** The core holds the current engine and its version. :meth:`WeightSlot.prepare` loads a checkpoint
beside the serving one and smoke-tests it; :meth:`WeightSlot.commit` swaps in one assignment. A request takes
the engine (and its version) once, when it starts, so in-flight requests finish on the weights they began with
and every completion reports the version that produced it. Engines that reload weights in place (vLLM's
``reload_weights``: no second copy in memory) are gated instead: the reload waits for the requests in flight to
finish and holds new ones back for its duration (:class:`_Gate`), then smoke-tests the new weights and reloads the
old ones if they fail. Versions only go up, except for a rollback (``rollback=True``) to a kept version.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument, check_range, check_text
from services.common.tools import NAMES as TOOL_NAMES, TOOL_PROTOCOLS, ToolProtocol
from services.generation.engine import LENGTH, STOP, Engine, EngineOutput, Sampling, completion_text

TOOL_TURNS = "tool_turns"  # finish reason: the tool-turn budget ran out while the model was still searching
CUT_OFF = (LENGTH, TOOL_TURNS)  # finish reasons of a completion that a limit cut off (no end of sequence)
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Prompt:
    text: str | None = None
    messages: Sequence[dict] | None = None  # [{"role": "user", "content": "..."}]


@dataclass
class GenerateParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 0  # 0 = the settings' default
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_logprobs: bool = False
    tool_protocol: str = ""  # "" or a name of services.common.tools.TOOL_PROTOCOLS
    max_tool_turns: int = 0  # 0 = the settings' default when a protocol is on
    retrieval_top_k: int = 0


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    env_mask: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    weight_version: int
    tool_turns: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(self.env_mask)

    @property
    def tool_tokens(self) -> int:
        return len(self.env_mask) - sum(self.env_mask)


@dataclass
class Limits:
    max_prompts: int = 64
    max_n: int = 16
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_prompt_bytes: int = 65_536
    default_tool_turns: int = 2
    max_tool_turns: int = 8
    default_retrieval_top_k: int = 3
    max_retrieval_top_k: int = 10
    max_stop: int = 16


SEED_RANGE = (-(2**63), 2**63 - 1)  # the proto's int64; the OpenAI endpoint's JSON integers are unbounded


@dataclass
class Weights:
    engine: Engine
    version: int
    checkpoint_uri: str
    reload: bool = False  # in-place engine: commit() reloads ``checkpoint_uri`` into ``engine``


class _Gate:
    """Requests (readers) and an in-place weight reload (the writer): the reload waits for the requests in flight
    and holds new ones back until it is done."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    def try_enter(self) -> bool:
        with self._cond:
            if self._writing:
                return False
            self._readers += 1
            return True

    def enter(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._readers += 1

    def leave(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def write(self):
        from contextlib import contextmanager

        @contextmanager
        def writing():
            with self._cond:
                self._cond.wait_for(lambda: not self._writing)
                self._writing = True
                self._cond.wait_for(lambda: self._readers == 0)
            try:
                yield
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

        return writing()


def _smoke(engine: Engine) -> None:
    """One 2-token greedy generation; raises when it yields no tokens or non-finite logprobs."""
    out = engine.generate([engine.encode("Hello")], [Sampling(temperature=0, max_tokens=2)])[0]
    if not out.token_ids or not all(math.isfinite(x) for x in out.logprobs):
        raise ValueError("smoke generation produced no tokens or non-finite logprobs")


SearchFn = Callable[[list[str], int], Awaitable[list[list]]]


class WeightSlot:
    """The serving weights and how they are replaced (load beside, smoke-test, swap in one assignment)."""

    def __init__(self, weights: Weights, load: Callable[[str, Engine | None], Engine], checkpoint_root: Path | None):
        """``load(path, serving_engine)`` loads a checkpoint; it may reuse parts of the serving engine (its
        tokenizer when unchanged)."""
        self.current = weights
        self._load = load
        self.checkpoint_root = checkpoint_root.resolve() if checkpoint_root else None
        self._lock = threading.Lock()
        self.gate = _Gate()

    def check_uri(self, uri: str) -> Path:
        if not uri.strip():
            raise InvalidArgument("checkpoint_uri", "must not be empty")
        path = Path(uri.removeprefix("file://")).resolve()
        if self.checkpoint_root is not None and not path.is_relative_to(self.checkpoint_root):
            raise InvalidArgument("checkpoint_uri", f"{path} is outside the allowed checkpoint root "
                                  f"{self.checkpoint_root} (KNOWSERVE_GENERATION_CHECKPOINT_ROOT)")
        if not path.exists():
            raise InvalidArgument("checkpoint_uri", f"{path} does not exist")
        if path.name.endswith(".tmp"):  # save_policy's folder while it writes (or a killed writer left it)
            raise InvalidArgument("checkpoint_uri", f"{path} is a checkpoint still being written (a .tmp folder)")
        return path

    def prepare(self, uri: str, version: int, smoke: bool = True, rollback: bool = False) -> Weights:
        """Load and smoke-test ``uri`` beside the serving weights; raise (serving unchanged) if it is unusable.
        ``smoke=False`` skips the smoke generation for a checkpoint another replica already vetted; ``rollback``
        allows a version that is not newer (a kept one). An in-place engine only checks the checkpoint here (its
        files, architecture and tensor shapes); :meth:`commit` reloads and smoke-tests it."""
        if not rollback and version <= self.current.version:
            raise FailedPrecondition(f"version {version} is not newer than the serving version "
                                     f"{self.current.version}; versions are monotonic")
        path = self.check_uri(uri)
        serving = self.current.engine
        if getattr(serving, "reload_weights", None) is not None:
            try:
                serving.check_checkpoint(str(path))
            except Exception as e:  # noqa: BLE001
                raise FailedPrecondition(f"checkpoint {path} cannot be loaded into the serving "
                                         f"{getattr(serving, 'architecture', 'model')}: {type(e).__name__}: {e}") from None
            return Weights(serving, version, str(path), reload=True)
        try:
            engine = self._load(str(path), serving)
        except Exception as e:  # noqa: BLE001 - any load failure is reported with its cause
            raise FailedPrecondition(f"checkpoint {path} failed to load: {type(e).__name__}: {e}") from None
        architecture = getattr(serving, "architecture", None)
        if architecture and getattr(engine, "architecture", architecture) != architecture:
            raise FailedPrecondition(f"checkpoint {path} is a {engine.architecture}, the service runs {architecture}")
        if smoke:
            try:
                _smoke(engine)
            except Exception as e:  # noqa: BLE001
                raise FailedPrecondition(f"checkpoint {path} failed the smoke generation: {e}") from None
        return Weights(engine, version, str(path))

    def commit(self, weights: Weights, rollback: bool = False) -> Weights:
        """Swap in ``weights``; returns the previous ones. Refuses a version that is no longer newer (unless
        ``rollback``). An in-place engine reloads after the requests in flight finish, then smoke-tests; weights
        that fail are replaced by the previous checkpoint again and the swap is refused."""
        with self._lock:
            if not rollback and weights.version <= self.current.version:
                raise FailedPrecondition(f"version {weights.version} is not newer than the serving version "
                                         f"{self.current.version}; versions are monotonic")
            if weights.reload:
                engine = weights.engine
                with self.gate.write():
                    try:
                        engine.reload_weights(weights.checkpoint_uri)
                        _smoke(engine)
                    except Exception as e:  # noqa: BLE001
                        engine.reload_weights(self.current.checkpoint_uri)
                        raise FailedPrecondition(f"checkpoint {weights.checkpoint_uri} failed after the reload "
                                                 f"({type(e).__name__}: {e}); the previous weights are back") from None
                    previous, self.current = self.current, weights
                return previous
            previous, self.current = self.current, weights
            return previous

    async def acquire(self) -> Weights:
        """The weights a request runs on; with an in-place engine the request is counted until :meth:`release`
        (a reload waits for it)."""
        weights = self.current
        if not weights.reload and getattr(weights.engine, "reload_weights", None) is None:
            return weights
        if not self.gate.try_enter():
            await asyncio.to_thread(self.gate.enter)
        return self.current

    def release(self, weights: Weights) -> None:
        if weights.reload or getattr(weights.engine, "reload_weights", None) is not None:
            self.gate.leave()


def prompt_ids_of(engine, prompt: Prompt, field: str) -> list[int]:
    """The token ids of ``prompt`` (its chat template applied), or INVALID_ARGUMENT naming ``field``: a template
    the model cannot apply, text that encodes to no tokens at all (control characters only: a forward pass over
    nothing fails), or more tokens than the model's context."""
    try:
        ids = engine.apply_chat_template(prompt.messages) if prompt.messages is not None else engine.encode(prompt.text)
    except ValueError as e:
        raise InvalidArgument(field, str(e)) from None
    if not ids:
        raise InvalidArgument(field, "encodes to no tokens (the text has nothing the tokenizer keeps)")
    if len(ids) >= engine.max_model_len:
        raise InvalidArgument(field, f"{len(ids)} tokens, the model's context is {engine.max_model_len}")
    return ids


class GenerationCore:
    """Validates requests and produces completions (see the module docstring)."""

    def __init__(self, slot: WeightSlot, limits: Limits, search: SearchFn | None):
        self.slot = slot
        self.limits = limits
        self.search = search  # None: tool protocols are refused (no retrieval service configured)

    # -- validation
    def _validate(self, prompts: Sequence[Prompt], p: GenerateParams) -> tuple[GenerateParams, ToolProtocol | None]:
        lim = self.limits
        if not prompts:
            raise InvalidArgument("prompts", "at least one prompt is required")
        if len(prompts) > lim.max_prompts:
            raise InvalidArgument("prompts", f"{len(prompts)} prompts, above the limit of {lim.max_prompts}")
        for i, pr in enumerate(prompts):
            if pr.messages is not None:
                if not pr.messages:
                    raise InvalidArgument(f"prompts[{i}].chat", "a conversation needs at least one message")
                for j, m in enumerate(pr.messages):
                    if m.get("role") not in CHAT_ROLES:
                        raise InvalidArgument(f"prompts[{i}].chat.messages[{j}].role",
                                              f"unknown role {m.get('role')!r}; use one of {CHAT_ROLES}")
                    check_text(f"prompts[{i}].chat.messages[{j}].content", m.get("content", ""),
                               max_bytes=lim.max_prompt_bytes)
            else:
                check_text(f"prompts[{i}].text", pr.text or "", max_bytes=lim.max_prompt_bytes)
        max_tokens = p.max_tokens or lim.default_max_tokens
        if not 1 <= max_tokens <= lim.max_tokens_limit:
            raise InvalidArgument("sampling.max_tokens", f"must be between 1 and {lim.max_tokens_limit}, "
                                  f"got {p.max_tokens}")
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            raise InvalidArgument("sampling.temperature", f"must be >= 0, got {p.temperature}")
        if not (0 < p.top_p <= 1):
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must be >= 0, got {p.top_k}")
        n = p.n or 1
        if not 1 <= n <= lim.max_n:
            raise InvalidArgument("sampling.n", f"must be between 1 and {lim.max_n}, got {p.n}")
        if len(p.stop) > lim.max_stop:
            raise InvalidArgument("sampling.stop", f"{len(p.stop)} stop sequences, above the limit of {lim.max_stop}")
        for i, s in enumerate(p.stop):
            check_text(f"sampling.stop[{i}]", s, max_bytes=256)
        if p.seed is not None:
            check_range("sampling.seed", p.seed, low=SEED_RANGE[0], high=SEED_RANGE[1])
        protocol = None
        turns = 0
        if p.tool_protocol:
            if p.tool_protocol not in TOOL_PROTOCOLS:
                raise InvalidArgument("tool_protocol", f"unknown tool protocol {p.tool_protocol!r}; "
                                      f"use one of {TOOL_NAMES}")
            if self.search is None:
                raise FailedPrecondition("tool protocols need the retrieval service: set "
                                         "KNOWSERVE_GENERATION_RETRIEVAL_TARGET")
            protocol = TOOL_PROTOCOLS[p.tool_protocol]
            turns = p.max_tool_turns or lim.default_tool_turns
            if not 1 <= turns <= lim.max_tool_turns:
                raise InvalidArgument("max_tool_turns", f"must be between 1 and {lim.max_tool_turns}, "
                                      f"got {p.max_tool_turns}")
        top_k = p.retrieval_top_k or lim.default_retrieval_top_k
        if not 1 <= top_k <= lim.max_retrieval_top_k:
            raise InvalidArgument("retrieval_top_k", f"must be between 1 and {lim.max_retrieval_top_k}, "
                                  f"got {p.retrieval_top_k}")
        return GenerateParams(p.temperature, p.top_p, p.top_k, max_tokens, n, tuple(p.stop), p.seed,
                              p.return_logprobs, p.tool_protocol, turns, top_k), protocol

    # -- generation
    async def generate(self, prompts: Sequence[Prompt], params: GenerateParams) -> list[Completion]:
        p, protocol = self._validate(prompts, params)
        weights = await self.slot.acquire()  # this request's weights, even if a swap commits meanwhile
        try:
            return await self._generate(prompts, p, protocol, weights)
        finally:
            self.slot.release(weights)

    async def _generate(self, prompts: Sequence[Prompt], p: GenerateParams, protocol: ToolProtocol | None,
                        weights: Weights) -> list[Completion]:
        engine = weights.engine
        prompt_ids = [prompt_ids_of(engine, pr, f"prompts[{i}]") for i, pr in enumerate(prompts)]
        samples = [(i, k) for i in range(len(prompts)) for k in range(p.n)]
        states = [_Sample(prompt_ids[i]) for i, _ in samples]
        stop = p.stop + ((protocol.query_close,) if protocol else ())
        for turn in range(p.max_tool_turns + 1):
            active = [s for s in states if not s.done]
            if not active:
                break
            samplings = []
            for j, s in enumerate(active):
                budget = min(p.max_tokens - s.generated, engine.max_model_len - len(s.context))
                seed = None if p.seed is None else p.seed + 1000 * turn + j
                samplings.append(Sampling(p.temperature, p.top_p, p.top_k, max(1, budget), stop, seed,
                                          logprobs=p.return_logprobs))
            outs: list[EngineOutput] = await _generate(engine, [s.context for s in active], samplings)
            asking = []
            for s, o in zip(active, outs):
                s.add(o.token_ids, o.logprobs, model=True)
                out_of_room = s.generated >= p.max_tokens or len(s.context) >= engine.max_model_len
                if protocol and o.stop_string == protocol.query_close and not out_of_room:
                    if turn < p.max_tool_turns:
                        asking.append(s)
                    else:
                        s.finish(TOOL_TURNS)
                else:
                    s.finish(STOP if o.finish_reason == STOP else LENGTH)
            if asking:
                queries = [protocol.last_query(engine.decode(s.model_tokens_since_docs())) for s in asking]
                results = await self.search(queries, p.retrieval_top_k)
                for s, docs in zip(asking, results):
                    s.add(engine.encode(protocol.format_documents(docs)), None, model=False)
                    s.tool_turns += 1
        out = []
        for (i, k), s in zip(samples, states):
            out.append(Completion(i, k, completion_text(engine, s.token_ids), s.token_ids,
                                  s.logprobs if p.return_logprobs else [], s.env_mask, s.finish_reason or LENGTH,
                                  prompt_ids[i], weights.version, s.tool_turns))
        return out

    async def stream(self, prompt: Prompt, params: GenerateParams):
        """Token deltas of one sample as the model writes them; the last delta has the finish reason, usage and
        (when asked) every token's logprob."""
        if params.tool_protocol:
            raise InvalidArgument("tool_protocol", "GenerateStream has no tool loop; use Generate")
        p, _ = self._validate([prompt], GenerateParams(**{**params.__dict__, "n": 1}))
        weights = await self.slot.acquire()
        try:
            async for delta in self._stream(prompt, p, weights):
                yield delta
        finally:
            self.slot.release(weights)

    async def _stream(self, prompt: Prompt, p: GenerateParams, weights: Weights):
        engine = weights.engine
        ids = prompt_ids_of(engine, prompt, "prompt")
        sampling = Sampling(p.temperature, p.top_p, p.top_k, min(p.max_tokens, engine.max_model_len - len(ids)),
                            p.stop, p.seed, logprobs=p.return_logprobs)
        sent: list[int] = []
        emitted, shown = 0, ""
        async for item in _iterate_in_thread(engine.stream(ids, sampling)):
            if isinstance(item, EngineOutput):  # the end: whatever is left, and the totals
                tail = completion_text(engine, item.token_ids)[len(shown):]
                yield StreamDelta(tail, item.token_ids[emitted:], item.logprobs if p.return_logprobs else [],
                                  item.finish_reason, weights.version, len(ids), len(item.token_ids))
                return
            sent.append(item)
            text = completion_text(engine, sent)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            delta, shown = text[len(shown):], text
            yield StreamDelta(delta, sent[emitted:], [], "", weights.version, len(ids), len(sent))
            emitted = len(sent)


async def _generate(engine: Engine, prompts: list[list[int]], samplings: list[Sampling]) -> list[EngineOutput]:
    """One engine call from the event loop: queued without a thread when the engine batches (``submit``),
    else in a worker thread."""
    submit = getattr(engine, "submit", None)
    if submit is not None:
        return await asyncio.wrap_future(submit(prompts, samplings))
    return await asyncio.to_thread(engine.generate, prompts, samplings)


@dataclass
class StreamDelta:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "" until the last delta
    weight_version: int
    prompt_tokens: int
    completion_tokens: int


async def _iterate_in_thread(gen):
    """Drive a blocking generator in a worker thread, one item at a time."""
    sentinel = object()
    while (item := await asyncio.to_thread(next, gen, sentinel)) is not sentinel:
        yield item


@dataclass
class _Sample:
    prompt: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    tool_turns: int = 0
    _since_docs: int = 0

    @property
    def context(self) -> list[int]:
        return self.prompt + self.token_ids

    @property
    def generated(self) -> int:
        return sum(self.env_mask)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None, model: bool) -> None:
        self.token_ids += list(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.env_mask += [1 if model else 0] * len(ids)
        if not model:
            self._since_docs = len(self.token_ids)

    def model_tokens_since_docs(self) -> list[int]:
        return self.token_ids[self._since_docs:]

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
