"""The Torpor workload trace and the arrival schedules drawn from it.

The trace (``../shared/traces/torpor_samples.npy``) holds per-minute invocation counts of
inference functions: an int64 array of shape (functions, minutes). A schedule samples N
functions from it and, within each minute, places that minute's count of requests uniformly
at random — a Poisson process conditioned on the minute's count. Times are trace seconds;
the replayer divides them by its speed-up factor.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TRACE_ENV = "TORPOR_TRACE"
MINUTE_S = 60.0


def default_trace_path() -> Path:
    """``$TORPOR_TRACE`` if set, else ``shared/traces/torpor_samples.npy`` beside the repo root."""
    env = os.environ.get(TRACE_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "traces" / "torpor_samples.npy"


def load_trace(path: str | Path | None = None) -> np.ndarray:
    """Loads a trace: int64 array of shape (functions, minutes), counts per minute.

    Args:
        path: the ``.npy`` file; :func:`default_trace_path` when ``None``.

    Raises:
        FileNotFoundError: no file at ``path`` (the message names ``TORPOR_TRACE``).
        ValueError: not a 2-D array of non-negative integers (pickled objects are refused).
    """
    path = Path(path) if path is not None else default_trace_path()
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} not found (set {TRACE_ENV} to the .npy file)")
    trace = np.load(path, allow_pickle=False)
    if trace.ndim != 2 or not np.issubdtype(trace.dtype, np.integer):
        raise ValueError(f"trace {path}: expected a 2-D integer array, got {trace.dtype} {trace.shape}")
    if trace.size == 0 or trace.min() < 0:
        raise ValueError(f"trace {path}: counts must be non-negative and the array non-empty")
    return trace.astype(np.int64, copy=False)


def sampled_rows(n_trace_functions: int, n_functions: int, seed: int) -> np.ndarray:
    """Which trace row each of ``n_functions`` functions replays: int64 array (n_functions,).

    Up to ``n_trace_functions`` the rows are distinct (a random subset in random order);
    beyond that every row is used once and the rest are drawn with replacement, each copy
    becoming its own function. Deterministic for a given ``seed`` and the same draw that
    :func:`schedule` makes.

    Raises:
        ValueError: ``n_functions`` < 1 or an empty trace.
    """
    rows_rng, _ = _streams(seed)
    return _sample_rows(rows_rng, n_trace_functions, n_functions)


def scaled_counts(counts: np.ndarray, rate_scale: float, rng: np.random.Generator) -> np.ndarray:
    """Counts multiplied by ``rate_scale`` in expectation, staying whole numbers.

    Each request is kept ``floor(rate_scale)`` times plus once more with probability
    ``rate_scale - floor(rate_scale)`` (binomial thinning), so 1.0 and other whole factors
    are exact and 0.5 keeps each request with probability one half.

    Raises:
        ValueError: ``rate_scale`` negative or not finite.
    """
    if not np.isfinite(rate_scale) or rate_scale < 0:
        raise ValueError(f"rate_scale must be a finite number >= 0, got {rate_scale}")
    whole = int(np.floor(rate_scale))
    frac = rate_scale - whole
    scaled = counts * whole
    if frac > 0:
        scaled = scaled + rng.binomial(counts, frac)
    return scaled.astype(np.int64)


def schedule(trace: np.ndarray, n_functions: int, seed: int, minutes: int | None = None,
             rate_scale: float = 1.0) -> list[tuple[float, int]]:
    """Arrival times of N sampled trace functions, sorted by time.

    Args:
        trace: int array (functions, minutes) of per-minute request counts.
        n_functions: functions to sample (rows as in :func:`sampled_rows`).
        seed: seeds both the sampling of rows and the arrival times.
        minutes: replay only the first ``minutes`` minutes (all when ``None``).
        rate_scale: factor on every count (see :func:`scaled_counts`).

    Returns:
        ``[(t_s, function_index), ...]`` with ``t_s`` in trace seconds from the start
        (minute ``m``'s requests fall in ``[60 m, 60 (m + 1))``) and ``function_index`` in
        ``range(n_functions)``; ordered by ``t_s``.

    Raises:
        ValueError: a bad ``n_functions``, ``minutes`` or ``rate_scale``.
    """
    total_minutes = trace.shape[1]
    if minutes is None:
        minutes = total_minutes
    if not 1 <= minutes <= total_minutes:
        raise ValueError(f"minutes must be in 1..{total_minutes}, got {minutes}")
    rows_rng, arrivals_rng = _streams(seed)
    rows = _sample_rows(rows_rng, trace.shape[0], n_functions)
    counts = scaled_counts(np.asarray(trace)[rows, :minutes].astype(np.int64), rate_scale, arrivals_rng)

    flat = counts.ravel()  # function-major: function i's minutes are flat[i*minutes:(i+1)*minutes]
    function_index = np.repeat(np.repeat(np.arange(n_functions), minutes), flat)
    minute = np.repeat(np.tile(np.arange(minutes), n_functions), flat)
    t_s = (minute + arrivals_rng.random(len(minute))) * MINUTE_S
    order = np.argsort(t_s, kind="stable")
    return list(zip(t_s[order].tolist(), function_index[order].tolist()))


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Separate streams so that the rows drawn do not depend on how many arrivals follow.
    rows_seq, arrivals_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(rows_seq), np.random.default_rng(arrivals_seq)


def _sample_rows(rng: np.random.Generator, n_trace_functions: int, n_functions: int) -> np.ndarray:
    if n_functions < 1:
        raise ValueError(f"n_functions must be >= 1, got {n_functions}")
    if n_trace_functions < 1:
        raise ValueError("the trace has no functions")
    if n_functions <= n_trace_functions:
        return rng.permutation(n_trace_functions)[:n_functions].astype(np.int64)
    extra = rng.integers(0, n_trace_functions, n_functions - n_trace_functions)
    return np.concatenate([rng.permutation(n_trace_functions), extra]).astype(np.int64)
