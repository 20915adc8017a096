"""Live monitoring from the generation side: a sampled share of user completions goes to the answer service.

The ingress calls :meth:`LiveSampler.sample` after it has answered (or finished a stream): each completion of a
request not marked ``internal`` is picked with probability ``LIVE_SAMPLE_RATE`` and sent to the answer service's
``ObserveGeneration`` in a background task — never on the request path, never failing it. At most
``LIVE_MAX_IN_FLIGHT`` sends run at once; a sample beyond that, one the answer service's queue refuses, or one it
cannot receive is dropped and counted (``knowserve_generation_live_samples_total{result}``).

The same client reads a version's live figures (``GetLiveStats``) for the hallucination gate.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from services.common.grading import question_line

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1000  # the question a sample carries: the prompt's last user message, cut to this
MAX_COMPLETION_CHARS = 8000


def question_of(prompt) -> str:
    """The user's question in a prompt: the last user message of a chat, else the text prompt's question
    (:func:`~services.common.grading.question_line`); cut to a bound.

    >>> from types import SimpleNamespace as P
    >>> question_of(P(text="Question: Where was Ilvar Brenneck born?\\nAnswer: <think>", messages=[]))
    'Where was Ilvar Brenneck born?'
    >>> question_of(P(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]))
    'Why?'
    """
    messages = getattr(prompt, "messages", None)
    if messages:
        users = [m["content"] for m in messages if m.get("role") == "user"]
        text = users[-1] if users else messages[-1]["content"]
    else:
        text = question_line(getattr(prompt, "text", "") or "")
    return text[-MAX_PROMPT_CHARS:]


class LiveSampler:
    """Sends sampled completions to the answer service; reads live figures for gates (``target`` "" = off)."""

    def __init__(self, target: str, rate: float, max_in_flight: int, seed: int | None = None, options=None):
        self.target = target
        self.options = options  # ClientOptions for the answer service (token, TLS); None: defaults
        self.rate = rate if target else 0.0
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._client = None
        self._random = random.Random(seed)
        self._tasks: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.target)

    def client(self):
        if self._client is None:
            from services.answer.client import AnswerClient
            from services.common.clients import ClientOptions

            self._client = AnswerClient(self.target, self.options or ClientOptions(timeout_seconds=5.0, retries=0))
        return self._client

    def sample(self, model: str, prompts: Sequence, completions: Sequence, internal: bool = False) -> int:
        """Pick completions to verify live (fire and forget); returns how many were picked."""
        if internal or self.rate <= 0.0:
            return 0
        picked = 0
        for c in completions:
            if self._random.random() < self.rate:
                prompt = prompts[c.prompt_index] if c.prompt_index < len(prompts) else prompts[0]
                self.send(model, int(c.weight_version), question_of(prompt), c.text)
                picked += 1
        return picked

    def sample_one(self, model: str, version: int, prompt, text: str) -> bool:
        """A streamed completion (its whole text), picked with the same probability."""
        if self.rate <= 0.0 or self._random.random() >= self.rate:
            return False
        self.send(model, version, question_of(prompt), text)
        return True

    def send(self, model: str, version: int, question: str, text: str) -> None:
        from services.generation import metrics as m

        if self.in_flight >= self.max_in_flight:
            m.LIVE_SAMPLES.labels(model, "dropped").inc()
            return
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(model, version, question, text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, model: str, version: int, question: str, text: str) -> None:
        from services.generation import metrics as m

        try:
            queued = await self.client().observe(model, version, question, text[:MAX_COMPLETION_CHARS])
            m.LIVE_SAMPLES.labels(model, "queued" if queued else "dropped").inc()
        except Exception as e:  # noqa: BLE001 - monitoring never fails a user's request
            m.LIVE_SAMPLES.labels(model, "failed").inc()
            log.debug("live sample not sent: %s", e)
        finally:
            self.in_flight -= 1

    async def stats(self, model: str, version: int, last: int) -> tuple[int, int]:
        """(verified answers, unsupported answers) of ``version``'s last ``last`` live answers."""
        reply = await self.client().live_stats(model, version, last)
        return reply.answers, reply.unsupported_answers
