"""The demo's live-quality steps: grounded answers through the answer service, simulated user traffic on the demo
model while GRPO publishes (its live hallucination rate per weight version, as the answer service measures it),
and a hallucination-gated swap that the gate decides on that traffic."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.answer.client import AnswerClient, outcome_name
from services.retrieval.client import RetrievalClient
from services.retrieval.core import Document

EDIT = Document("edit:demo-dremoria", "Dremoria", "The capital of the Republic of Dremoria is Kelvara, a port city "
                "on the Amber Coast.", "edit")
ASKS = [("a question the knowledge base answers", "Which planet is known as the Red Planet?"),
        ("a question it cannot answer", "Who won the 2031 Zorblax Prize for hyperspace cooking?"),
        ("a fact only a knowledge edit holds, before the edit", "What is the capital of the Republic of Dremoria?")]


def _show(console: Console, label: str, question: str, r) -> None:
    cites = ", ".join(f"[{c.passage_id}] {c.title}" for c in r.citations) or "-"
    console.print(escape(f"  {label}\n  Q: {question}\n  A: {r.answer}"))
    console.print(escape(f"     {outcome_name(r.outcome)}, support {r.support:.0%} of {len(r.claims)} claim(s), "
                         f"cites {cites}; {r.model} v{r.weight_version}")
                  + (escape(f"; the model had said: {r.generated.strip()[:140]}") if r.generated != r.answer else ""))


async def show_grounded_answers(console: Console, answer: str, retrieval: str) -> None:
    """Three questions through Answer, the last again after a knowledge edit (removed afterwards)."""
    async with AnswerClient(answer) as a, RetrievalClient(retrieval) as rc:
        for label, q in ASKS:
            _show(console, label, q, await a.answer(q))
        await rc.upsert([EDIT])
        try:
            q = ASKS[-1][1]
            _show(console, "the same question right after `knowserve edit add` (the edit is cited)", q,
                  await a.answer(q))
        finally:
            await rc.delete([EDIT.id])


@dataclass
class LiveTraffic:
    """Simulated users asking the served ``model`` in a background thread (plain Generate, sampled for live
    verification by the generation service); records, per weight version, the live figures the answer service
    reports while that version serves."""

    generation: str
    answer: str
    model: str
    prompts: Sequence
    tool_protocol: str = "r1_searcher"
    batch: int = 4
    pause_seconds: float = 1.0
    per_version: dict[int, tuple[int, int]] = field(default_factory=dict)  # version -> (answers, unsupported)
    requests: int = 0
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "LiveTraffic":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="demo-users", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    async def _run(self) -> None:
        from services.generation.client import GenerationClient

        i = 0
        async with GenerationClient(self.generation, model=self.model) as gen, AnswerClient(self.answer) as ans:
            while not self._stop.is_set():
                batch = [self.prompts[(i + k) % len(self.prompts)] for k in range(self.batch)]
                i += self.batch
                try:
                    reply = await gen.generate(batch, max_tokens=48, temperature=0, tool_protocol=self.tool_protocol,
                                               max_tool_turns=1, retrieval_top_k=1, timeout=120)
                    self.requests += 1
                    for v in {int(c.weight_version) for c in reply.completions}:
                        s = await ans.live_stats(self.model, v)
                        if s.answers >= self.per_version.get(v, (0, 0))[0]:
                            self.per_version[v] = (s.answers, s.unsupported_answers)
                except Exception:  # noqa: BLE001 - a failed user request is counted (the demo prints it)
                    self.failures += 1
                await asyncio.sleep(self.pause_seconds)

    def table(self, bands: int = 6) -> Table:
        """Live unsupported answers by weight version, consecutive versions grouped into ``bands`` rows."""
        t = Table(title=f"live traffic on {self.model}: unsupported answers by weight version (answer service)")
        for col in ("versions", "verified answers", "unsupported", "rate"):
            t.add_column(col, justify="left" if col == "versions" else "right")
        versions = sorted(self.per_version)
        size = max(1, -(-len(versions) // bands))
        for k in range(0, len(versions), size):
            group = versions[k: k + size]
            n = sum(self.per_version[v][0] for v in group)
            bad = sum(self.per_version[v][1] for v in group)
            name = f"v{group[0]}" + (f"-v{group[-1]}" if len(group) > 1 else "")
            t.add_row(name, str(n), str(bad), f"{bad / n:.0%}" if n else "-")
        return t


async def gated_swap(console: Console, generation: str, answer: str, model: str, candidate: str,
                     min_answers: int, window_seconds: float) -> str:
    """Publish ``candidate`` into ``model`` with a hallucination gate and follow it to its decision."""
    from knowserve.generation.v1 import generation_service_pb2 as gpb
    from services.generation.client import GenerationClient

    async with GenerationClient(generation, model=model) as gen, AnswerClient(answer) as ans:
        info = await gen.model_info()
        deadline = time.monotonic() + window_seconds  # the serving version needs its answers first (the baseline)
        while (have := (await ans.live_stats(model, info.weight_version)).answers) < min_answers:
            if time.monotonic() > deadline:
                break
            console.print(f"  baseline v{info.weight_version}: {have}/{min_answers} verified live answers",
                          highlight=False)
            await asyncio.sleep(10)
        version = max(info.weight_version, info.latest_version) + 1
        reply = await gen.update_weights(candidate, version, gate=gpb.HallucinationGate(
            min_answers=min_answers, margin=0.0, window_seconds=window_seconds))
        console.print(f"published the candidate as v{reply.version} with a gate (previous v{reply.previous_version});"
                      f" the gate waits for {min_answers} verified live answers of each version")
        start = time.monotonic()
        while True:
            info = await gen.model_info()
            g = info.gate
            if g.state != gpb.GATE_STATE_PENDING:
                break
            console.print(f"  {time.monotonic() - start:4.0f}s: v{g.version} {g.answers}/{min_answers} verified "
                          f"live answers ({g.unsupported_answers} unsupported)", highlight=False)
            await asyncio.sleep(10)
        state = gpb.GateState.Name(g.state).removeprefix("GATE_STATE_").lower()
        console.print(escape(f"gate decision: {state} - {g.message}"))
        console.print(f"{model} serves v{info.weight_version} now")
        return state
