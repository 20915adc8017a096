"""LLM-backed verification through the generation service: the ``llm`` judge and the LLM claim extractor.

Both are **weak** with the small models this project serves by default (SmolLM2-135M): use them to compare, not
to decide. The judge asks a yes/no question per (claim, evidence) and reads the probability of the first answer
token (``exp(logprob)`` of the greedy token, returned by the generation service); the extractor uses
FActScore's "break down into independent facts" prompt per sentence and parses the bullet list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.retrieval.core import Passage
from services.verification.claims import Claim, split_claims
from services.verification.judges import NOT_ENOUGH_INFO, REFUTED, SUPPORTED, Verdict

if TYPE_CHECKING:
    from services.generation.client import GreedyFn

JUDGE_PROMPT = ("Evidence:\n{evidence}\n\nClaim: {claim}\n\nIs the claim supported by the evidence? "
                "Answer with one word, Yes or No.")
EXTRACT_PROMPT = ("Please breakdown the following sentence into independent facts. Write one fact per line, "
                  "each starting with \"- \".\n\nSentence: {sentence}")


def read_yes_no(text: str, logprobs: Sequence[float]) -> tuple[str, float]:
    """Label and probability from the model's first answer token.

    >>> read_yes_no("Yes", [-0.105])
    ('SUPPORTED', 0.9003)
    >>> read_yes_no(" no", [-0.5]), read_yes_no("Maybe", [-0.1])
    (('REFUTED', 0.6065), ('NOT_ENOUGH_INFO', 0.0))
    """
    m = re.match(r"\W*([a-z]+)", text.lower())
    word = m.group(1) if m else ""
    p = round(math.exp(logprobs[0]), 4) if logprobs else 0.0
    if word == "yes":
        return SUPPORTED, p
    if word == "no":
        return REFUTED, p
    return NOT_ENOUGH_INFO, 0.0


class LlmJudge:
    name = "llm"
    description = ("Asks the generation service a yes/no question per claim with its evidence and reads the "
                   "first token's probability. WEAK with small models: compare with it, do not decide by it.")

    def __init__(self, generate: GreedyFn, max_evidence_chars: int = 1500):
        self.generate = generate
        self.max_evidence_chars = max_evidence_chars

    async def judge(self, claims: Sequence[str], evidence: Sequence[Sequence[Passage]]) -> list[Verdict]:
        prompts, owners = [], []
        for i, (claim, passages) in enumerate(zip(claims, evidence)):
            if not passages:
                continue
            text = "\n".join(f"[{p.title}] {p.text}" for p in passages)[: self.max_evidence_chars]
            prompts.append([{"role": "user", "content": JUDGE_PROMPT.format(evidence=text, claim=claim)}])
            owners.append(i)
        outs = await self.generate(prompts, 2) if prompts else []
        verdicts = [Verdict(NOT_ENOUGH_INFO, 1.0, ()) for _ in claims]
        for i, (text, logprobs) in zip(owners, outs):
            label, p = read_yes_no(text, logprobs)
            ids = tuple(x.id for x in evidence[i]) if label != NOT_ENOUGH_INFO else ()
            verdicts[i] = Verdict(label, p, ids)
        return verdicts


def parse_facts(text: str) -> list[str]:
    """Bullet lines of the extractor's answer.

    >>> parse_facts("- Ada was born in 1815.\\n- Ada was English.\\nnote")
    ['Ada was born in 1815.', 'Ada was English.']
    """
    return [m.group(1).strip() for m in re.finditer(r"^\s*[-*•]\s+(.+)$", text, re.M) if m.group(1).strip()]


async def llm_extract(generate: GreedyFn, text: str, offset: int = 0, max_tokens: int = 128) -> list[Claim]:
    """FActScore-style atomic facts per sentence; a fact found verbatim in the text keeps its span, others get
    the span of the sentence it came from. A sentence the model returns no facts for is kept whole."""
    sentences = split_claims(text, offset)
    if not sentences:
        return []
    outs = await generate([[{"role": "user", "content": EXTRACT_PROMPT.format(sentence=s.text)}]
                           for s in sentences], max_tokens)
    claims: list[Claim] = []
    for s, (answer, _) in zip(sentences, outs):
        facts = parse_facts(answer) or [s.text]
        for f in facts:
            at = text.find(f)
            claims.append(Claim(f, at + offset, at + offset + len(f)) if at >= 0 else Claim(f, s.start, s.end))
    return claims
