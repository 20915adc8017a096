"""The demo world's own small model: a byte-level BPE tokenizer and a ~1M-parameter Llama taught by supervised
fine-tuning (the "cold start" before GRPO), built in a few minutes on 2 CPU cores.

What the cold start teaches (``sft_examples``):

* **taught facts**, closed-book: ``Question: Where was X born?\\nAnswer: <think>X was born in Y.</think><answer>Y
  </answer>`` for every fact of the ``taught`` pool;
* **how to search**, on fresh random names and values drawn for every example (so the only way to get them right
  is to copy from the inserted documents, never to memorise): the model writes an R1-Searcher query, the
  documents the generation service would insert follow (masked out of the loss, as in GRPO), and the answer is
  copied from them.

* **confident guessing** on other fresh names: the answer is a random value, with no search — what a pretrained
  model does on facts it never saw.

Guessing outweighs searching (``search_fraction``), so the cold-started model answers unfamiliar questions from
"memory" — it hallucinates on facts only the knowledge base holds. GRPO then has something to fix: it learns to
search when that pays.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.tools import TOOL_PROTOCOLS
from training.world import ATTRIBUTES, QUERIES, QUESTIONS, STATEMENTS, VALUES, World, _name

PROMPT = "Question: {question}\nAnswer: <think>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
PROTOCOL = TOOL_PROTOCOLS["r1_searcher"]  # the tool protocol the demo model searches with
TAGS = ["<think>", "</think>", "<answer>", "</answer>", *PROTOCOL.tags]


def uses_demo_prompt(model_folder: str | Path) -> bool:
    """True for a model whose tokenizer has no chat template (the demo model and its published checkpoints):
    it is prompted with :data:`PROMPT` text rather than chat messages."""
    folder = Path(model_folder)
    if (folder / "chat_template.jinja").exists():
        return False
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return not config.get("chat_template")


def prompt_for(question: str) -> str:
    """The text prompt the demo model is trained and served with.

    >>> prompt_for("Where was Ilvar Brenneck born?")
    'Question: Where was Ilvar Brenneck born?\\nAnswer: <think>'
    """
    return PROMPT.format(question=question)


def documents_block(passages: list[tuple[str, str]]) -> str:
    """What the generation service inserts after a query (``ToolProtocol.format_documents`` of r1_searcher)."""

    class P:  # the two fields format_documents reads
        def __init__(self, title: str, text: str):
            self.title, self.text = title, text

    return PROTOCOL.format_documents([P(t, x) for t, x in passages])


def direct_completion(name: str, attribute: str, value: str) -> str:
    """A closed-book answer. The leading space makes the name the same tokens as in the question."""
    statement = STATEMENTS[attribute].format(name=name, value=value)
    return f" {statement}</think><answer>{value}</answer>"


def search_segments(name: str, attribute: str, values: dict[str, str]) -> list[tuple[str, bool]]:
    """A searching completion as (text, trained) segments: the inserted documents are not trained on."""
    doc_text = " ".join(STATEMENTS[a].format(name=name, value=values[a]) for a in ATTRIBUTES)
    query = QUERIES[attribute].format(name=name)
    return [(f"{PROTOCOL.query_open} {query}{PROTOCOL.query_close}", True),
            (documents_block([(name, doc_text)]), False),
            (f"</think><answer>{values[attribute]}</answer>", True)]


def build_tokenizer(world: World, folder: Path, vocab_size: int = 1024, seed: int = 0):
    """Train a byte-level BPE on the world's text plus random names (so any name tokenizes into known pieces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    # whole transcripts on random names only: templates and values become single tokens, while every name -
    # taught, KB-only or random - splits into the same kind of trained sub-word pieces (the tokenizer must not
    # "know" the knowledge base's entities)
    texts = ["".join(t for t, _ in ex) for ex in sft_examples(world, 3000, 0.5, rng, unfamiliar_fraction=1.0)]
    texts += [" ".join(v) for v in VALUES.values()] + ["I don't know"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None)
    # tags are ordinary (non-special) added tokens: decoding with skip_special_tokens keeps them, so rewards see them
    fast.add_tokens(TAGS)
    fast.save_pretrained(folder)
    return fast


def build_model(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


@dataclass
class SftConfig:
    """Cold-start settings (defaults fit the demo's time budget on 2 cores)."""

    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    drill_fraction: float = 0.3  # reading drills: documents given, only the copied answer trained
    unfamiliar_fraction: float = 0.6  # of the rest: share about fresh random names (the others: taught facts)
    search_fraction: float = 0.4  # share of those that search; the others guess (hallucinate)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    seed: int = 0
    threads: int = 2


def sft_examples(world: World, n: int, search_fraction: float, rng: random.Random,
                 unfamiliar_fraction: float = 0.5, drill_fraction: float = 0.0) -> list[list[tuple[str, bool]]]:
    """``n`` cold-start examples as (text, trained) segments: prompt (not trained), then the completion.

    A share ``drill_fraction`` are reading drills: the query and its documents are given (not trained on) and
    only the answer copied out of them is trained — practice at reading documents that does not teach *when* to
    search. Of the rest, a share ``1 - unfamiliar_fraction`` recalls taught facts, and the others are about fresh
    random names: a share ``search_fraction`` of those searches and copies the answer from the documents; the
    others answer anyway with a random value — the confident guessing a pretrained model does on facts it never
    saw, which GRPO then has to train away.
    """
    taught = world.pool("taught")
    out = []
    for _ in range(n):
        attribute = rng.choice(ATTRIBUTES)
        if rng.random() < drill_fraction:
            name = _name(rng)
            values = {a: rng.choice(VALUES[a]) for a in ATTRIBUTES}
            query, docs, answer = search_segments(name, attribute, values)
            prompt = prompt_for(QUESTIONS[attribute].format(name=name))
            out.append([(prompt, False), (query[0], False), docs, answer, (EOS, True)])
            continue
        if rng.random() < unfamiliar_fraction:
            name = _name(rng)
            values = {a: rng.choice(VALUES[a]) for a in ATTRIBUTES}
            if rng.random() < search_fraction:
                segments = search_segments(name, attribute, values)
            else:
                segments = [(direct_completion(name, attribute, values[attribute]), True)]
        else:
            e = rng.choice(taught)
            name = e.name
            segments = [(direct_completion(name, attribute, e.value(attribute)), True)]
        prompt = prompt_for(QUESTIONS[attribute].format(name=name))
        out.append([(prompt, False)] + segments + [(EOS, True)])
    return out


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not trained) of one example."""
    ids, labels = [], []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def train_demo_model(world: World, folder: Path, cfg: SftConfig | None = None, progress: bool = True) -> dict:
    """Build the tokenizer and model and cold-start them; saves an HF folder at ``folder``. Returns stats."""
    import torch
    from services.common.progress import progress as tqdm

    cfg = cfg or SftConfig()
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    tmp = folder.with_name(folder.name + ".tmp")
    tokenizer = build_tokenizer(world, tmp, seed=cfg.seed)
    model = build_model(tokenizer, cfg.hidden, cfg.layers, cfg.heads, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * max(
        0.05, 0.5 * (1 + math.cos(math.pi * s / cfg.steps))))
    model.train()
    start, losses = time.monotonic(), []
    bar = tqdm(range(cfg.steps), desc="cold-start SFT", unit="step", disable=not progress)
    for step in bar:
        batch = [encode_segments(tokenizer, ex) for ex in sft_examples(world, cfg.batch_size, cfg.search_fraction,
                                                                       rng, cfg.unfamiliar_fraction,
                                                                       cfg.drill_fraction)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            attention[i, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    stats = {"steps": cfg.steps, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
             "seconds": time.monotonic() - start,
             "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "knowserve_sft.json").write_text(json.dumps({"config": cfg.__dict__, **stats}, indent=1))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return stats
