"""``make demo`` / ``knowserve demo``: start the local stack on the embedded default, ingest the Wikipedia
demo corpus, then show retrieval and a knowledge edit winning over the stale fact.

The hallucination-metrics / GRPO / hot-swap part of the demo lands with the generation and training services.
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
    console.rule("done")
    console.print("The stack keeps running: try `.venv/bin/knowserve search \"capital of Australia\"`, "
                  "`.venv/bin/knowserve status`, then `.venv/bin/knowserve down` (or `make down`).")
    return 0
