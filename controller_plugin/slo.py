"""SLO-aware ordering of waiting requests (after Torpor, Yu et al., ATC '25).

Every function has a latency SLO: its P98 latency must stay within ``slo_ms`` (100 ms by
default, 200 ms for models of 1 GB or more — DESIGN.md §3). The goal is to maximise the
number of functions that meet their SLO, not the mean latency.

*SLO debt.* Over a sliding window of its last ``window`` requests a function may exceed its
SLO in at most ``(1 - p)`` of them (2% for P98). Its debt is the number of in-SLO requests it
needs in a row to get back within that allowance::

    debt = (violations - (1 - p) * n) / (1 - p)

Positive: in debt (its windowed P98 is above the SLO). Zero or negative: meeting it.

*Adaptive high/low split* (after the Torpor artifact's router). Every
``update_interval_ms`` the functions in debt are ranked by the GPU time they need to recover
(debt × mean latency); the cheapest ones, up to a share ``alpha`` of the total, stay in the
high class with every function not in debt; the rest — too far behind to be saved without
sacrificing others — form the low class. ``alpha`` adapts: every ``adapt_every`` updates it
doubles (up to 1) when SLO attainment rose by 2 points or more, halves when it fell by 2
points or more, and creeps up by 1% otherwise. Under light load nobody is far behind and
``alpha`` stays 1: the low class is empty.

*Order.* High-class requests by deadline (arrival + their function's SLO, earliest first),
then low-class requests, cheapest to recover first. FIFO (arrival only) is the baseline.
Ordering by deadline rather than putting every function in debt first is a measured choice
(docs/scheduling.md): near saturation, absolute priority for functions in debt pushes the
others into debt in turn, and fewer functions end within their SLO than under FIFO; the
deadline order with the low class beat both FIFO and debt-first in every simulated case.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence, TypeVar

DEFAULT_SLO_MS = 100.0
HEAVY_SLO_MS = 200.0
HEAVY_MODEL_BYTES = 1_000_000_000
PERCENTILE = 98.0


def default_slo_ms(model_bytes: int) -> float:
    """SLO (P98 latency bound) of a function whose model has ``model_bytes`` bytes, ms."""
    return HEAVY_SLO_MS if model_bytes >= HEAVY_MODEL_BYTES else DEFAULT_SLO_MS


class WaitingRequest(Protocol):
    """What ordering needs of a waiting request: its function and arrival time (ms)."""

    function: str
    arrival: float


R = TypeVar("R", bound=WaitingRequest)


@dataclass
class _Window:
    slo_ms: float
    latencies: deque = field(default_factory=deque)
    over: int = 0
    total_ms: float = 0.0


class SLOTracker:
    """Per-function latency windows, SLO debt and the ordering of waiting requests.

    Args:
        window: requests per function the debt is computed over.
        percentile: the SLO percentile (98: P98).
        update_interval_ms: how often the high/low split is recomputed, ms of the caller's clock.
        adapt_every: split updates between two adjustments of ``alpha``.
    """

    DIFF_THRESHOLD = 0.02  # change of attainment (share of functions) that moves alpha by a factor
    SCALE = 2.0
    CREEP = 1.01

    def __init__(self, window: int = 256, percentile: float = PERCENTILE, update_interval_ms: float = 2000.0,
                 adapt_every: int = 20):
        if window < 1 or not 0 < percentile < 100:
            raise ValueError("window must be >= 1 and percentile within (0, 100)")
        self.window = window
        self.allowed = 1.0 - percentile / 100.0
        self.update_interval_ms = update_interval_ms
        self.adapt_every = adapt_every
        self.alpha = 1.0
        self._functions: dict[str, _Window] = {}
        self._low: dict[str, float] = {}  # low-class function → its recovery cost, ms
        self._last_update: float | None = None
        self._updates = 0
        self._last_attainment = 1.0

    def register(self, function: str, slo_ms: float) -> None:
        """Declares ``function`` with its SLO in ms (again: changes the SLO, keeps the window)."""
        w = self._functions.get(function)
        if w is None:
            self._functions[function] = _Window(slo_ms)
        else:
            w.slo_ms = slo_ms
            w.over = sum(1 for x in w.latencies if x > slo_ms)

    def slo_ms(self, function: str) -> float:
        """SLO of ``function`` in ms (the default one if never registered)."""
        w = self._functions.get(function)
        return w.slo_ms if w else DEFAULT_SLO_MS

    def record(self, function: str, latency_ms: float) -> None:
        """Adds one finished request's end-to-end latency (ms) to ``function``'s window."""
        w = self._functions.get(function)
        if w is None:
            w = self._functions[function] = _Window(DEFAULT_SLO_MS)
        w.latencies.append(latency_ms)
        w.total_ms += latency_ms
        w.over += latency_ms > w.slo_ms
        if len(w.latencies) > self.window:
            old = w.latencies.popleft()
            w.total_ms -= old
            w.over -= old > w.slo_ms

    def debt(self, function: str) -> float:
        """Requests ``function`` must meet its SLO in a row to be back within its allowance (> 0: in debt)."""
        w = self._functions.get(function)
        if w is None or not w.latencies:
            return 0.0
        return (w.over - self.allowed * len(w.latencies)) / self.allowed

    def percentile_ms(self, function: str) -> float | None:
        """The SLO percentile of ``function``'s windowed latencies, ms (``None``: no data)."""
        w = self._functions.get(function)
        if w is None or not w.latencies:
            return None
        xs = sorted(w.latencies)
        k = min(len(xs) - 1, int(len(xs) * (1.0 - self.allowed)))
        return xs[k]

    def attainment(self) -> float:
        """Share of functions with data that are within their allowance now (1.0 when none has data)."""
        seen = [f for f, w in self._functions.items() if w.latencies]
        if not seen:
            return 1.0
        return sum(1 for f in seen if self.debt(f) <= 0) / len(seen)

    def update(self, now_ms: float) -> None:
        """Recomputes the high/low split (and adapts ``alpha``) if ``update_interval_ms`` has passed."""
        if self._last_update is not None and now_ms - self._last_update < self.update_interval_ms:
            return
        self._last_update = now_ms
        costs = []
        for f, w in self._functions.items():
            d = self.debt(f)
            if d > 0:
                costs.append((d * w.total_ms / len(w.latencies), d, f))
        costs.sort()
        budget = self.alpha * sum(c for c, _, _ in costs)
        low, spent = {}, 0.0
        for cost, _, f in costs:
            spent += cost
            if spent > budget * (1 + 1e-9):
                low[f] = cost
        self._low = low
        self._updates += 1
        if self._updates % self.adapt_every == 0:
            self._adapt()

    def _adapt(self) -> None:
        now = self.attainment()
        change = now - self._last_attainment
        if change >= self.DIFF_THRESHOLD:
            self.alpha = min(1.0, self.alpha * self.SCALE)
            self._last_attainment = now
        elif change <= -self.DIFF_THRESHOLD:
            self.alpha /= self.SCALE
            self._last_attainment = now
        else:
            self.alpha = min(1.0, self.alpha * self.CREEP)

    def demoted(self, function: str) -> bool:
        """Whether ``function`` is in the low class (served after everything else)."""
        return function in self._low

    def _key(self, r: WaitingRequest) -> tuple:
        cost = self._low.get(r.function)
        if cost is not None:
            return (1, cost, r.arrival)
        return (0, r.arrival + self.slo_ms(r.function), r.arrival)

    def order(self, waiting: Sequence[R], now_ms: float | None = None, fifo: bool = False) -> list[R]:
        """``waiting`` in the order to serve it (a new list; the input is not changed).

        Args:
            waiting: requests with ``function`` and ``arrival`` (ms) attributes.
            now_ms: current time in ms; when given, the split is refreshed if it is due.
            fifo: order by arrival only (the baseline).
        """
        if fifo:
            return sorted(waiting, key=lambda r: r.arrival)
        if now_ms is not None:
            self.update(now_ms)
        return sorted(waiting, key=self._key)
