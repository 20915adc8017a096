"""The hallucination gate of a weight swap: keep the new version only if live traffic says it is not worse.

After a gated swap of model M from version ``p`` to ``v`` (``UpdateWeights`` with ``gate``), the new version
serves at once. The gate then reads the answer service's live figures (``GetLiveStats``: verified answers of
served traffic, and how many were unsupported — a refuted claim, or support below the threshold) until ``v`` has
``min_answers``; it compares ``v``'s share of unsupported answers with ``p``'s over ``p``'s last ``min_answers``
with a one-sided two-proportion z-test of "``v`` is worse by more than ``margin``", and at level ``alpha``:

* worse -> **ROLLED_BACK**: ``RollbackWeights`` to ``p`` (counted as ``swaps_total{result="rolled_back"}``);
* otherwise -> **KEPT**;
* too few answers of ``v`` within ``window_seconds``, or ``p`` has fewer than ``min_answers`` to compare with ->
  **INCONCLUSIVE**, and ``v`` stays (the figures are shown, nothing is undone on too little evidence);
* another swap or rollback of M before the decision -> **SUPERSEDED**.

Both windows are taken as samples of the same traffic: if what users ask drifts between the previous version's
last answers and the new version's first ones (easy questions then hard ones), the comparison is biased by it, so
a ``min_answers`` that spans the traffic's usual mix is the lever as much as the sample size.

The answer level is compared, not the claim level: answers are independent samples of traffic, the claims of one
answer are not (a z-test on claims would count one bad answer's claims as independent evidence).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PENDING, KEPT, ROLLED_BACK, INCONCLUSIVE, SUPERSEDED = "pending", "kept", "rolled_back", "inconclusive", "superseded"
GATE_STATES = (PENDING, KEPT, ROLLED_BACK, INCONCLUSIVE, SUPERSEDED)


def worse_p_value(bad_new: int, n_new: int, bad_old: int, n_old: int, margin: float = 0.0) -> float:
    """One-sided p-value of "the new rate exceeds the old rate by more than ``margin``" (two-proportion z-test,
    unpooled standard error, as for a non-inferiority margin; a zero standard error gives 0 or 1).

    >>> worse_p_value(30, 50, 10, 50) < 1e-4   # 60% vs 20% unsupported answers: clearly worse
    True
    >>> round(worse_p_value(12, 50, 10, 50), 2)   # 24% vs 20%: no evidence of worse
    0.31
    >>> worse_p_value(5, 50, 5, 50, margin=0.05) > 0.5   # equal rates are not worse by the margin
    True
    """
    if n_new <= 0 or n_old <= 0:
        return 1.0
    p1, p0 = bad_new / n_new, bad_old / n_old
    diff = p1 - p0 - margin
    se = math.sqrt(p1 * (1 - p1) / n_new + p0 * (1 - p0) / n_old)
    if se == 0.0:
        return 0.0 if diff > 0 else 1.0
    return 0.5 * math.erfc(diff / se / math.sqrt(2))  # P(Z >= z), the standard normal's upper tail


@dataclass(frozen=True)
class GateSpec:
    """What a gate needs and tolerates (the request's fields, defaults from the settings)."""

    min_answers: int
    margin: float
    alpha: float
    window_seconds: float

    def __post_init__(self):
        if self.min_answers < 1:
            raise ValueError("gate.min_answers must be at least 1")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"gate.margin must be in [0, 1], got {self.margin}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"gate.alpha must be in (0, 1), got {self.alpha}")
        if not self.window_seconds > 0:
            raise ValueError(f"gate.window_seconds must be positive, got {self.window_seconds}")


@dataclass
class GateStatus:
    """A model's latest gate: what it compares and what it decided."""

    model: str
    version: int
    previous_version: int
    spec: GateSpec
    state: str = PENDING
    answers: int = 0
    unsupported: int = 0
    previous_answers: int = 0
    previous_unsupported: int = 0
    p_value: float = 1.0
    message: str = ""
    start_time: float = field(default_factory=time.time)
    decide_time: float = 0.0

    def rates(self) -> str:
        new = f"{self.unsupported}/{self.answers}" + (f" ({self.unsupported / self.answers:.0%})" if self.answers
                                                      else "")
        old = f"{self.previous_unsupported}/{self.previous_answers}" + (
            f" ({self.previous_unsupported / self.previous_answers:.0%})" if self.previous_answers else "")
        return f"unsupported live answers v{self.version} {new} vs v{self.previous_version} {old}"


def decide(status: GateStatus) -> tuple[str, float]:
    """(state, p-value) once both versions have their answers (:data:`KEPT` or :data:`ROLLED_BACK`).

    >>> s = GateStatus("m", 2, 1, GateSpec(50, 0.05, 0.05, 60), answers=50, unsupported=30, previous_answers=50,
    ...                previous_unsupported=10)
    >>> decide(s)[0]
    'rolled_back'
    """
    p = worse_p_value(status.unsupported, status.answers, status.previous_unsupported, status.previous_answers,
                      status.spec.margin)
    return (ROLLED_BACK if p < status.spec.alpha else KEPT), p


# (model, version, last) -> (answers, unsupported answers) of that version's live traffic
StatsFn = Callable[[str, int, int], Awaitable[tuple[int, int]]]


async def run_gate(status: GateStatus, stats: StatsFn, rollback: Callable[[], Awaitable[object]],
                   poll_seconds: float, on_decision: Callable[[GateStatus], None] | None = None) -> GateStatus:
    """Watch ``status.version`` until a decision (see the module docstring); ``rollback()`` undoes the swap.
    Cancelling it (a later swap) leaves the state to the caller."""
    spec = status.spec
    deadline = time.monotonic() + spec.window_seconds

    def finish(state: str, message: str) -> GateStatus:
        status.state, status.message, status.decide_time = state, message, time.time()
        (log.warning if state == ROLLED_BACK else log.info)("gate %s v%d: %s", status.model, status.version, message)
        if on_decision is not None:
            on_decision(status)
        return status

    failures = 0
    while True:
        try:
            status.previous_answers, status.previous_unsupported = await stats(
                status.model, status.previous_version, spec.min_answers)
            status.answers, status.unsupported = await stats(status.model, status.version, spec.min_answers)
            failures = 0
        except Exception as e:  # noqa: BLE001 - the answer service may restart; the window still bounds the wait
            failures += 1
            if failures == 1 or failures % 10 == 0:
                log.warning("gate %s v%d: live figures unavailable (%s); retrying", status.model, status.version, e)
        if status.previous_answers < spec.min_answers and failures == 0:
            return finish(INCONCLUSIVE, f"kept v{status.version}: v{status.previous_version} has only "
                          f"{status.previous_answers} verified live answers, {spec.min_answers} needed to compare "
                          f"with ({status.rates()})")
        if status.answers >= spec.min_answers:
            state, status.p_value = decide(status)
            if state == ROLLED_BACK:
                await rollback()
                return finish(ROLLED_BACK, f"rolled back to v{status.previous_version}: {status.rates()}; worse by "
                              f"more than {spec.margin:.0%} at p={status.p_value:.3g} < {spec.alpha}")
            return finish(KEPT, f"kept v{status.version}: {status.rates()}; not worse by more than "
                          f"{spec.margin:.0%} (p={status.p_value:.3g} >= {spec.alpha})")
        if time.monotonic() >= deadline:
            return finish(INCONCLUSIVE, f"kept v{status.version}: only {status.answers} of {spec.min_answers} "
                          f"verified live answers within {spec.window_seconds:.0f} s ({status.rates()})")
        await asyncio.sleep(poll_seconds)
