"""Latency statistics for load-generator reports: percentiles, SLO checks, error tallies.

All latencies are in milliseconds. Percentiles use NumPy's default linear interpolation
(``numpy.percentile(..., method="linear")``). "No value" is ``None`` so that reports stay
strict JSON (no NaN, no Infinity).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

PERCENTILES = (50, 95, 98, 99)
ERROR_TEXT_CHARS = 200
TOP_ERRORS = 10


def percentile(latencies_ms: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) of ``latencies_ms`` in ms, ``None`` when it is empty."""
    if len(latencies_ms) == 0:
        return None
    return float(np.percentile(np.asarray(latencies_ms, dtype=np.float64), q))


def percentiles(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """``{"p50_ms", "p95_ms", "p98_ms", "p99_ms"}`` of ``latencies_ms`` (``None`` when empty)."""
    return {f"p{q}_ms": percentile(latencies_ms, q) for q in PERCENTILES}


def percentile_with_failures(latencies_ms: Sequence[float], failed: int, q: float) -> float | None:
    """The ``q``-th percentile when each of ``failed`` requests counts as an infinite latency.

    Same linear interpolation as ``numpy.percentile`` over the completed latencies followed by
    ``failed`` infinities; computed by hand because NumPy's interpolation turns ``inf * 0`` into
    NaN. Returns ms, ``math.inf`` when the percentile falls among the failures, or ``None``
    when there are no requests at all.
    """
    if failed < 0:
        raise ValueError(f"failed must be >= 0, got {failed}")
    values = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    n = len(values) + failed
    if n == 0:
        return None
    rank = q / 100.0 * (n - 1)
    lo = math.floor(rank)
    frac = rank - lo

    def at(i: int) -> float:
        return float(values[i]) if i < len(values) else math.inf

    below = at(lo)
    if frac == 0 or math.isinf(below):
        return below
    above = at(lo + 1)
    if math.isinf(above):
        return math.inf
    return below + (above - below) * frac


def slo_met(latencies_ms: Sequence[float], failed: int, slo_ms: float, q: float = 98) -> bool | None:
    """Whether the ``q``-th percentile (failures counted as infinite) is at most ``slo_ms``.

    ``None`` for a function that received no requests: it neither meets nor misses its SLO.
    """
    p = percentile_with_failures(latencies_ms, failed, q)
    return None if p is None else p <= slo_ms


def slo_attainment(met: Iterable[bool | None]) -> float | None:
    """Share (0–1) of functions meeting their SLO, among those that received requests.

    ``met`` holds one :func:`slo_met` value per function; ``None`` entries are left out of
    both numerator and denominator. Returns ``None`` when no function received requests.
    """
    judged = [m for m in met if m is not None]
    if not judged:
        return None
    return sum(judged) / len(judged)


def top_errors(errors: Iterable[str], k: int = TOP_ERRORS, width: int = ERROR_TEXT_CHARS) -> dict[str, int]:
    """The ``k`` most frequent error texts (each cut to ``width`` chars) with their counts."""
    counts = Counter(e[:width] for e in errors)
    return dict(counts.most_common(k))
