"""``make demo`` / ``knowserve demo``: start the local stack on the embedded default (retrieval, verification,
reward), ingest the Wikipedia demo corpus, then show retrieval, a knowledge edit winning over the stale fact,
claim-level verification of a right and a hallucinated answer, and their KnowRL rewards.

Then the served model (SmolLM2-135M-Instruct on Ray Serve) answers questions closed-book and the verifier
measures how much of what it says is supported. The GRPO / hot-swap part lands with the training service (#7).
"""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.markup import escape

from services import stack
from services.retrieval.client import RetrievalClient
from services.retrieval.core import Document
from services.retrieval.demo_corpus import build_wiki_corpus
from services.retrieval.ingest import ingest_through_service
from services.reward.client import RewardClient
from services.reward.core import ScoreItem
from services.verification.client import VerificationClient
from services.verification.core import VerifyItem

QUESTION = "Who directed 2001: A Space Odyssey, and when was it released?"
ANSWERS = {
    "grounded": "<think>2001: A Space Odyssey is a 1968 film. It was directed by Stanley Kubrick, who co-wrote the "
                "screenplay with Arthur C. Clarke.</think><answer>Stanley Kubrick</answer>",
    "hallucinated": "<think>2001: A Space Odyssey is a 1972 film. It was directed by Steven Spielberg, who co-wrote "
                    "the screenplay with Arthur C. Clarke.</think><answer>Steven Spielberg</answer>",
    "refusal": "<think>I am not certain who made this film.</think><answer>I don't know</answer>",
}


def run_demo() -> int:
    console = Console()
    console.rule("1. start the stack")
    procs = stack.up()
    target = procs["retrieval"].target
    corpus = stack.run_dir() / "data" / "wiki.jsonl"
    if not corpus.exists():
        console.rule("2. build the demo corpus (Wikipedia leads, CC BY-SA 4.0)")
        console.print(f"{build_wiki_corpus(corpus)} documents -> {corpus}")

    async def run() -> None:
        async with RetrievalClient(target) as client:
            stats = await client.stats()
            if stats.documents < 10_000:
                console.rule("3. ingest it through the retrieval service")
                t0 = time.monotonic()
                report = await ingest_through_service(corpus, client)
                console.print(f"ingested {report.documents} documents / {report.passages} passages "
                              f"in {time.monotonic() - t0:.0f}s")
            stats = await client.stats()
            console.print(f"index: {stats.documents} documents, {stats.passages} passages, "
                          f"dense={stats.dense_enabled}, {stats.index_size_bytes / 1e6:.0f} MB")
            console.rule("4. search (hybrid BM25 + MiniLM)")
            question = "Who directed 2001: A Space Odyssey?"
            for p in (await client.search([question], top_k=3))[0]:
                console.print(f"  [{p.score:.3f}] {p.title}: {p.text[:110]}…")
            console.rule("5. a knowledge edit wins over the stale fact on the very next search")
            await client.upsert([Document("edit:demo-kubrick", "2001: A Space Odyssey",
                                          "2001: A Space Odyssey was directed by the demo editor, "
                                          "according to this knowledge edit.", "edit")])
            top = (await client.search([question], top_k=1))[0][0]
            console.print(escape(f"  top hit now: [{top.source}] {top.text}"))
            await client.delete(["edit:demo-kubrick"])
            top = (await client.search([question], top_k=1))[0][0]
            console.print(escape(f"  after `knowserve edit rm`: [{top.source}] {top.title}: {top.text[:90]}…"))

    asyncio.run(run())
    asyncio.run(show_verification_and_reward(console, procs["verification"].target, procs["reward"].target))
    if "generation" in procs:
        asyncio.run(show_model_hallucination(console, procs["generation"].target, procs["verification"].target))
    console.rule("done")
    console.print("The stack keeps running: try `.venv/bin/knowserve search \"capital of Australia\"`, "
                  "`.venv/bin/knowserve verify \"Canberra is the capital of Australia.\"`, "
                  "`.venv/bin/knowserve status`, then `.venv/bin/knowserve down` (or `make down`).")
    return 0


async def show_verification_and_reward(console: Console, verification: str, reward: str) -> None:
    from knowserve.verification.v1 import verification_service_pb2 as vpb

    console.rule("6. verification: split each answer's <think> into claims, fetch evidence, judge each claim")
    async with VerificationClient(verification) as v, RewardClient(reward) as r:
        reply = await v.verify([VerifyItem(answer=a, section="think") for a in ANSWERS.values()], judge="lexical")
        for name, res in zip(ANSWERS, reply.results):
            kind = vpb.AnswerKind.Name(res.kind).removeprefix("ANSWER_KIND_").lower()
            console.print(f"[bold]{name}[/bold] ({kind}): FActScore {res.factscore:.2f}, "
                          f"supported {res.supported} / refuted {res.refuted} / unverifiable {res.not_enough_info}")
            for c in res.claims:
                label = vpb.Label.Name(c.label).removeprefix("LABEL_")
                style = {"SUPPORTED": "green", "REFUTED": "red"}.get(label, "yellow")
                console.print(escape(f"    {c.text}  ") + f"[{style}]{label}[/{style}] {list(c.evidence_ids)}")
        console.rule("7. reward: the KnowRL recipe (format + correctness with refusal + factuality)")
        scored = await r.score("knowrl", [ScoreItem(QUESTION, a, ["Stanley Kubrick"]) for a in ANSWERS.values()])
        for name, s in zip(ANSWERS, scored.scores):
            parts = ", ".join(f"{c.name} {c.value:+.2f}" if c.applicable else f"{c.name} n/a" for c in s.components)
            console.print(f"  {name:13s} total {s.total:+.2f}   ({parts})")


MODEL_QUESTIONS = [("Who directed the film 2001: A Space Odyssey?", ["Stanley Kubrick", "Kubrick"]),
                   ("What is the capital of Australia?", ["Canberra"]),
                   ("What is the highest mountain on Earth above sea level?", ["Mount Everest", "Everest"]),
                   ("Which planet is known as the Red Planet?", ["Mars"])]


async def show_model_hallucination(console: Console, generation: str, verification: str) -> None:
    """Closed-book answers of the served model, graded against gold answers and checked claim by claim."""
    from knowserve.verification.v1 import verification_service_pb2 as vpb
    from services.common.text import is_refusal
    from services.generation.client import GenerationClient
    from services.reward.components import cover_exact_match

    console.rule("8. the served model answers closed-book; the verifier checks every claim")
    async with GenerationClient(generation) as g, VerificationClient(verification) as v:
        info = await g.model_info()
        console.print(f"model: {info.model_name} ({info.architecture}, {info.engine}), weight version "
                      f"{info.weight_version}, {info.replicas} Serve replica(s)")
        chats = [[{"role": "user", "content": f"{q} Answer in one short sentence."}] for q, _ in MODEL_QUESTIONS]
        reply = await g.generate(chats, temperature=0, max_tokens=40, timeout=600)
        answers = [c.text.replace("<|im_end|>", "").strip() for c in reply.completions]
        verdicts = await v.verify([VerifyItem(answer=a) for a in answers], judge="lexical")
        attempted = wrong = 0
        for (q, gold), a, r in zip(MODEL_QUESTIONS, answers, verdicts.results):
            refused = is_refusal(a)
            right = bool(cover_exact_match(a, gold))
            attempted += not refused
            wrong += (not refused) and not right
            labels = ", ".join(vpb.Label.Name(c.label).removeprefix("LABEL_").lower() for c in r.claims)
            mark = "[green]correct[/green]" if right else "[yellow]refused[/yellow]" if refused else "[red]wrong[/red]"
            console.print(escape(f"  Q: {q}\n     A: {a}") + f"\n     {mark}; claims: {labels or '-'}")
        rate = wrong / attempted if attempted else 0.0
        console.print(f"hallucination rate among attempted answers: {rate:.0%} ({wrong}/{attempted})")
