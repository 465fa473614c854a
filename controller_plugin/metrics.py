"""Prometheus metrics of the controller, served on its ``/metrics`` route.

* ``torpor_invocations_total{namespace, action, outcome}`` — every invocation of an existing
  action, by how it ended for the caller (:data:`OUTCOMES`);
* ``torpor_invocation_duration_seconds{namespace, action}`` — end-to-end latency of blocking
  invocations that got their final record, from admission to the answer;
* ``torpor_action_slo_*`` — per action, the share of its recent blocking invocations that
  ended within its SLO (annotation ``slo-ms``, default 100 ms), whether its P98 is within it,
  and the SLO itself;
* ``torpor_activations_in_flight{namespace}``, ``torpor_node_*`` — read from Redis at scrape
  time, so they count the work of every controller and every node (in-flight activations of
  the namespaces this controller has served since it started: a scrape never scans the
  keyspace).

The counters live in the controller process: ``torpor controller`` runs one gunicorn worker,
so one registry sees every request (several workers would each count their own share and
need prometheus-client's multiprocess mode). Each :class:`ControllerMetrics` has a registry
of its own, so that apps created in one process (the tests) do not share series.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controller_plugin import state
from controller_plugin.slo import DEFAULT_SLO_MS, PERCENTILE

log = logging.getLogger(__name__)

OUTCOMES = {
    "success": "final record: success (HTTP 200)",
    "application_error": "final record: the action returned an error (HTTP 502)",
    "developer_error": "final record: the action failed (HTTP 502)",
    "whisk_error": "final record: the platform failed (HTTP 500)",
    "timeout": "blocking, no final record within the wait (HTTP 202)",
    "accepted": "non-blocking, queued (HTTP 202)",
    "throttled": "refused by a namespace limit (HTTP 429)",
    "no_invoker": "no live node to run it (HTTP 503)",
    "no_capacity": "live nodes, but no healthy device with a free slot (HTTP 503)",
}
FINAL_OUTCOMES = {state.SUCCESS: "success", state.APPLICATION_ERROR: "application_error",
                  state.DEVELOPER_ERROR: "developer_error", state.WHISK_ERROR: "whisk_error"}
SLO_WINDOW = 256  # recent blocking invocations per action the SLO gauges look at
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def slo_ms_of(annotations: list[dict]) -> float:
    """The action's SLO in ms from its ``slo-ms`` annotation (a positive number or numeric
    string); :data:`controller_plugin.slo.DEFAULT_SLO_MS` when absent or not a positive number."""
    value = next((a.get("value") for a in annotations if isinstance(a, dict) and a.get("key") == "slo-ms"), None)
    try:
        slo = float(value)
    except (TypeError, ValueError):
        return DEFAULT_SLO_MS
    return slo if slo > 0 else DEFAULT_SLO_MS


class _SLOWindow:
    def __init__(self, slo_ms: float):
        self.slo_ms = slo_ms
        self.within: deque[bool] = deque(maxlen=SLO_WINDOW)


class SLOCollector(Collector):
    """Per-action SLO gauges over the last :data:`SLO_WINDOW` blocking invocations."""

    def __init__(self):
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _SLOWindow] = {}

    def record(self, namespace: str, action: str, slo_ms: float, latency_ms: float | None) -> None:
        """Adds one blocking invocation; ``latency_ms`` None (no final record, or a failure)
        counts as a violation, as in loadgen's SLO attainment."""
        with self._lock:
            window = self._windows.get((namespace, action))
            if window is None:
                window = self._windows[(namespace, action)] = _SLOWindow(slo_ms)
            window.slo_ms = slo_ms
            window.within.append(latency_ms is not None and latency_ms <= slo_ms)

    def collect(self) -> Iterator:
        labels = ["namespace", "action"]
        ratio = GaugeMetricFamily("torpor_action_slo_attainment_ratio",
                                  f"Share of the action's last {SLO_WINDOW} blocking invocations that ended "
                                  "successfully within its SLO", labels=labels)
        met = GaugeMetricFamily("torpor_action_slo_met",
                                f"1 when the action's P{PERCENTILE:g} latency over that window is within its SLO",
                                labels=labels)
        target = GaugeMetricFamily("torpor_action_slo_seconds", "The action's SLO (annotation slo-ms)", labels=labels)
        with self._lock:
            windows = [(key, w.slo_ms, sum(w.within), len(w.within)) for key, w in self._windows.items()]
        for (ns, action), slo_ms, within, n in sorted(windows):
            share = within / n
            ratio.add_metric([ns, action], share)
            met.add_metric([ns, action], 1 if share >= PERCENTILE / 100 else 0)
            target.add_metric([ns, action], slo_ms / 1000)
        yield ratio
        yield met
        yield target


class RedisCollector(Collector):
    """Cluster-wide gauges read from Redis at scrape time: activations in flight per
    namespace (admitted, no final record, slot not lapsed) and per node its queue, in-flight
    list and liveness. A Redis failure leaves them out of that scrape (logged).

    Args:
        client: Redis client with ``decode_responses=True``.
        namespaces: returns the namespaces to report activations in flight for.
    """

    def __init__(self, client: redis.Redis, namespaces: Callable[[], list[str]]):
        self.redis = client
        self.namespaces = namespaces

    def collect(self) -> Iterator:
        try:
            now = int(time.time() * 1000)
            namespaces = self.namespaces()
            nodes = sorted(self.redis.smembers(state.NODES_KEY))
            pipe = self.redis.pipeline(transaction=False)
            for ns in namespaces:
                pipe.zcount(state.running_key(ns), now, "+inf")
            for node in nodes:
                pipe.llen(state.queue_key(node))
                pipe.llen(state.inflight_key(node))
                pipe.exists(state.alive_key(node))
            values = pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics: cannot read Redis: %s", exc)
            return
        in_flight = GaugeMetricFamily("torpor_activations_in_flight",
                                      "Activations admitted and not finished (the namespace's concurrency slots)",
                                      labels=["namespace"])
        for ns, count in zip(namespaces, values):
            in_flight.add_metric([ns], count)
        queued = GaugeMetricFamily("torpor_node_queued_activations", "Messages waiting in the node's queue",
                                   labels=["node"])
        running = GaugeMetricFamily("torpor_node_running_activations", "Messages the node's invoker has taken",
                                    labels=["node"])
        alive = GaugeMetricFamily("torpor_node_alive", "1 while the node's alive key exists", labels=["node"])
        rest = values[len(namespaces):]
        for i, node in enumerate(nodes):
            queued.add_metric([node], rest[3 * i])
            running.add_metric([node], rest[3 * i + 1])
            alive.add_metric([node], rest[3 * i + 2])
        yield in_flight
        yield queued
        yield running
        yield alive


class ControllerMetrics:
    """The controller's registry: invocation counters, latency histogram, SLO and Redis gauges.

    Args:
        client: the controller's Redis client (``decode_responses=True``).
    """

    def __init__(self, client: redis.Redis):
        self.registry = CollectorRegistry()
        self.invocations = Counter("torpor_invocations", "Invocations of existing actions, by outcome: "
                                   + "; ".join(f"{k}: {v}" for k, v in OUTCOMES.items()),
                                   ["namespace", "action", "outcome"], registry=self.registry)
        self.latency = Histogram("torpor_invocation_duration_seconds",
                                 "End-to-end latency of blocking invocations answered with their final record, "
                                 "from admission to the answer", ["namespace", "action"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.slo = SLOCollector()
        self.registry.register(self.slo)
        self._namespaces: set[str] = set()
        self.registry.register(RedisCollector(client, lambda: sorted(self._namespaces.copy())))

    def invoked(self, namespace: str, action: dict, outcome: str) -> None:
        """Counts one invocation of ``action`` (its record) that ended without waiting for a
        final record: ``accepted``, ``throttled`` or ``no_invoker``.

        Raises:
            ValueError: an outcome not in :data:`OUTCOMES`.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self._namespaces.add(namespace)
        self.invocations.labels(namespace, action["name"], outcome).inc()

    def blocking_done(self, namespace: str, action: dict, status_code: int | None, latency_ms: float) -> str:
        """Records one blocking invocation of ``action``; returns its outcome (:data:`OUTCOMES`).

        Args:
            namespace: the action's namespace.
            action: the action record (its ``slo-ms`` annotation sets the SLO).
            status_code: the final record's OpenWhisk status code (0..3), None when the
                wait ended without one (a ``timeout``).
            latency_ms: from admission to the answer, ms.
        """
        name = action["name"]
        outcome = "timeout" if status_code is None else FINAL_OUTCOMES.get(status_code, "whisk_error")
        self._namespaces.add(namespace)
        self.invocations.labels(namespace, name, outcome).inc()
        if status_code is not None:
            self.latency.labels(namespace, name).observe(latency_ms / 1000)
        self.slo.record(namespace, name, slo_ms_of(action.get("annotations") or []),
                        latency_ms if status_code == state.SUCCESS else None)
        return outcome
