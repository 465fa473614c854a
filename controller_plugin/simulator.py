"""Discrete-event simulation of a Torpor cluster, driven by the Torpor trace.

It runs the scheduling code the servers run — :func:`runtime.gpu_server.placement.choose_device`
(and its eviction order) for the GPU of each request, :func:`controller_plugin.predictor.choose_node`
for its node, :class:`controller_plugin.slo.SLOTracker` for the order of waiting requests —
against a model of the hardware:

* ``nodes`` × ``gpus`` GPUs; a GPU serves one request at a time (one compute stream);
* each GPU's host copies travel on its PCIe link; ``gpus_per_link`` GPUs share one link
  (a PCIe switch) and then share its bandwidth fairly; peer copies travel on the
  destination's NVLink port, fairly shared the same way;
* a request whose model is copied in first ends ``max(copy, exec) + 0.08 exec`` after it
  starts (pipelined swap, see controller_plugin/predictor.py); execution times vary by a
  log-normal factor around the profile (``exec_jitter``), which the predictor learns online;
* ``native`` and ``keepalive`` run each function in its own container, whose model copy
  costs ``native_overhead_gb`` of GPU memory besides the weights (CUDA context and
  framework workspace); ``keepalive`` starts a container in ``cold_start_ms``.

The workload is :func:`loadgen.trace.schedule` — the very schedule ``torpor loadgen``
replays for the same seed — and each function gets a model drawn from the model set.
Docs and assumptions: docs/scheduling.md.
"""
from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from controller_plugin.predictor import LinkModel, Predictor, choose_node, read_bench
from controller_plugin.slo import SLOTracker, default_slo_ms
from loadgen import stats
from loadgen.trace import load_trace, schedule
from runtime.gpu_server.placement import POLICY_NAMES, Decision, DeviceState, Policy, ResidentModel, choose_device
from runtime.settings import from_kwargs, options, setting

GB = 1e9


@dataclass(frozen=True)
class ModelSpec:
    """One model of the simulated model set: weight bytes and resident execution time (ms)."""

    name: str
    bytes: int
    exec_ms: float


# H200 figures: bytes = fp32 parameters; exec = batch-1 CUDA-graph time. Measured
# (DESIGN.md §3): resnet50, resnet152, densenet201, efficientnet_b0, and the transfer bounds
# behind the bytes of resnet50/152 and vit_l_16. Assumed (docs/scheduling.md): the rest.
H200_MODELS = (
    ModelSpec("resnet50", 102_000_000, 0.91),
    ModelSpec("resnet101", 178_000_000, 1.7),
    ModelSpec("resnet152", 241_000_000, 2.6),
    ModelSpec("densenet169", 57_000_000, 3.0),
    ModelSpec("densenet201", 81_000_000, 3.3),
    ModelSpec("inception_v3", 109_000_000, 2.0),
    ModelSpec("efficientnet_b0", 21_000_000, 0.72),
    ModelSpec("bert_large", 1_340_000_000, 8.0),
    ModelSpec("vit_l_16", 1_220_000_000, 10.9),
)


@dataclass
class ClusterSettings:
    """The simulated hardware and workload (shared by ``torpor simulate`` and ``torpor sweep``)."""

    nodes: int = setting(1, "TORPOR_SIM_NODES", "simulated nodes")
    gpus: int = setting(4, "TORPOR_SIM_GPUS", "GPUs per node")
    minutes: int = setting(31, "TORPOR_SIM_MINUTES", "trace minutes to replay (the trace has 31)")
    seed: int = setting(0, "TORPOR_SIM_SEED", "seed of the schedule, model draw, execution jitter and random policy")
    trace: str = setting("", "TORPOR_TRACE", "trace .npy (default: ../shared/traces/torpor_samples.npy beside the repo)")
    profiles: str = setting("", "TORPOR_SIM_PROFILES",
                            "swap bench result JSON whose models (bytes, served_warm_ms) replace the H200 model set")
    models: str = setting("", "TORPOR_SIM_MODELS", "comma-separated subset of the model set to draw from (empty: all)")
    request_overhead_ms: float = setting(0.0, "TORPOR_SIM_REQUEST_OVERHEAD_MS",
                                         "fixed latency of a request outside the GPU server (controller, invoker, "
                                         "action runtime, redirection), added to every latency", "ms")
    gpu_memory_gb: float = setting(141.0, "TORPOR_SIM_GPU_MEMORY_GB", "memory of each GPU (H200: 141)", "GB")
    arena_fraction: float = setting(0.6, "TORPOR_SIM_ARENA_FRACTION",
                                    "share of GPU memory that Torpor's weight arena gets (the GPU server's default)")
    native_overhead_gb: float = setting(1.5, "TORPOR_SIM_NATIVE_OVERHEAD_GB",
                                        "GPU memory of one container's runtime besides its weights (native, keepalive)",
                                        "GB")
    cold_start_ms: float = setting(12000.0, "TORPOR_SIM_COLD_START_MS",
                                   "container start with model load (keepalive)", "ms")
    pcie_gbps: float = setting(55.0, "TORPOR_SIM_PCIE_GBPS", "host→GPU bandwidth of one PCIe link", "GB/s")
    nvlink_gbps: float = setting(387.0, "TORPOR_SIM_NVLINK_GBPS", "GPU→GPU NVLink bandwidth (0: no NVLink)", "GB/s")
    gpus_per_link: int = setting(1, "TORPOR_SIM_GPUS_PER_LINK", "GPUs sharing one PCIe link to the host")
    exec_jitter: float = setting(0.05, "TORPOR_SIM_EXEC_JITTER", "sigma of the log-normal factor on execution times")
    timeout_ms: float = setting(60000.0, "TORPOR_SIM_TIMEOUT_MS", "a request waiting this long fails", "ms")

    def validate(self) -> None:
        """Raises ValueError naming the first out-of-range field."""
        checks = [("nodes", self.nodes >= 1), ("gpus", self.gpus >= 1), ("minutes", self.minutes >= 1),
                  ("gpu_memory_gb", self.gpu_memory_gb > 0), ("arena_fraction", 0 < self.arena_fraction <= 1),
                  ("native_overhead_gb", self.native_overhead_gb >= 0), ("cold_start_ms", self.cold_start_ms >= 0),
                  ("pcie_gbps", self.pcie_gbps > 0), ("nvlink_gbps", self.nvlink_gbps >= 0),
                  ("gpus_per_link", self.gpus_per_link >= 1), ("exec_jitter", self.exec_jitter >= 0),
                  ("timeout_ms", self.timeout_ms > 0), ("request_overhead_ms", self.request_overhead_ms >= 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")


@dataclass
class SimulateSettings:
    """One simulation run."""

    functions: int = setting(400, "TORPOR_SIM_FUNCTIONS", "inference functions (trace rows, resampled beyond 203)")
    policy: str = setting("torpor", "TORPOR_SIM_POLICY", "policy: " + ", ".join(POLICY_NAMES))
    json: bool = setting(False, "TORPOR_SIM_JSON", "print the result as one JSON line (last line)")


@dataclass
class SweepSettings:
    """A grid of simulation runs."""

    functions: str = setting("100,200,300,400,500,600,700,800", "TORPOR_SWEEP_FUNCTIONS",
                             "function counts, comma-separated")
    policies: str = setting(",".join(POLICY_NAMES), "TORPOR_SWEEP_POLICIES", "policies, comma-separated")
    out: str = setting("bench/results/sweep", "TORPOR_SWEEP_OUT", "output prefix: writes OUT.json, OUT.md, OUT.png")
    jobs: int = setting(0, "TORPOR_SWEEP_JOBS", "parallel processes (0: one per CPU)")


def model_set(cluster: ClusterSettings) -> tuple[ModelSpec, ...]:
    """The models functions draw from: ``cluster.profiles`` if given, else :data:`H200_MODELS`,
    restricted to ``cluster.models`` when that names some.

    Raises:
        OSError, ValueError: unreadable or malformed profiles file; ``cluster.models`` names a
            model the set lacks.
    """
    models = H200_MODELS if not cluster.profiles else \
        tuple(ModelSpec(n, b, e) for n, (b, e) in sorted(read_bench(cluster.profiles).items()))
    wanted = [m.strip() for m in cluster.models.split(",") if m.strip()]
    if not wanted:
        return models
    by_name = {m.name: m for m in models}
    unknown = [m for m in wanted if m not in by_name]
    if unknown:
        raise ValueError(f"models {unknown} are not in the model set ({', '.join(by_name)})")
    return tuple(by_name[m] for m in wanted)


class _Link:
    """A link whose bandwidth its active transfers share equally (processor sharing)."""

    __slots__ = ("bw", "active", "t", "version")

    def __init__(self, bytes_per_ms: float):
        self.bw = bytes_per_ms
        self.active: dict[int, float] = {}
        self.t = 0.0
        self.version = 0

    def advance(self, now: float) -> None:
        if self.active and now > self.t:
            moved = self.bw * (now - self.t) / len(self.active)
            for k in self.active:
                self.active[k] -= moved
        self.t = now

    def next_done(self) -> tuple[float, int]:
        tid = min(self.active, key=self.active.__getitem__)
        return self.t + max(self.active[tid], 0.0) * len(self.active) / self.bw, tid


class _Req:
    __slots__ = ("function", "arrival", "fn", "idx")

    def __init__(self, function: str, arrival: float, fn: int, idx: int):
        self.function, self.arrival, self.fn, self.idx = function, arrival, fn, idx


class _GPU:
    __slots__ = ("state", "busy_until", "busy_ms")

    def __init__(self, state: DeviceState):
        self.state = state
        self.busy_until = 0.0
        self.busy_ms = 0.0


class _Node:
    __slots__ = ("gpus", "devices", "links", "waiting", "parked")

    def __init__(self, gpus: list[_GPU], links: dict[str, _Link]):
        self.gpus = gpus
        self.devices = [g.state for g in gpus]
        self.links = links
        self.waiting: list[_Req] = []  # blocked on a busy device or a starting container
        self.parked: list[_Req] = []  # no room anywhere until keep-alive windows expire


_LINK, _FINISH, _LOADED, _TICK = range(4)
KEEPALIVE_TICK_MS = 2000.0  # how often idle containers past their keep-alive are stopped


class Simulation:
    """One run: ``functions`` trace functions on the cluster under ``policy``.

    Args:
        cluster: hardware and workload settings.
        functions: number of functions.
        policy: one of :data:`~runtime.gpu_server.placement.POLICY_NAMES`.

    Raises:
        ValueError: bad settings or policy; OSError: unreadable trace or profiles.
    """

    def __init__(self, cluster: ClusterSettings, functions: int, policy: str):
        cluster.validate()
        if functions < 1:
            raise ValueError(f"functions must be >= 1, got {functions}")
        self.cluster = cluster
        self.n_functions = functions
        trace = load_trace(cluster.trace or None)
        if cluster.minutes > trace.shape[1]:
            raise ValueError(f"minutes must be <= {trace.shape[1]}, got {cluster.minutes}")
        rng = np.random.default_rng(np.random.SeedSequence(cluster.seed).spawn(3)[2])
        models = model_set(cluster)
        arrivals = schedule(trace, functions, cluster.seed, cluster.minutes)
        self.arrival_ms = np.fromiter((t for t, _ in arrivals), float, len(arrivals)) * 1000.0
        self.arrival_fn = np.fromiter((f for _, f in arrivals), np.int64, len(arrivals))
        self.jitter = np.exp(rng.normal(0.0, cluster.exec_jitter, len(arrivals))) if cluster.exec_jitter else \
            np.ones(len(arrivals))
        self.spec = [models[i] for i in rng.integers(0, len(models), functions)]
        self.names = [f"f{i}" for i in range(functions)]

        self.policy = Policy(policy, cold_start_ms=cluster.cold_start_ms, rng=random.Random(cluster.seed),
                             keepalive_ms=self._keepalive_windows() if policy == "keepalive" else {})
        overhead = int(cluster.native_overhead_gb * GB) if self.policy.containers else 0
        self.footprint = [s.bytes + overhead for s in self.spec]
        self.predictor = Predictor(LinkModel(cluster.pcie_gbps * GB, max(cluster.nvlink_gbps, 1e-9) * GB))
        for name, s in zip(self.names, self.spec):
            self.predictor.set_profile(name, s.bytes, s.exec_ms)
        self.tracker = SLOTracker()
        for name, s in zip(self.names, self.spec):
            self.tracker.register(name, default_slo_ms(s.bytes))
        self.fifo = self.policy.ordering == "fifo"
        self.nodes = [self._make_node() for _ in range(cluster.nodes)]
        self.home_node = [i % cluster.nodes for i in range(functions)]
        self.unplaced = self._preload() if self.policy.containers else 0

        self.latencies: list[list[float]] = [[] for _ in range(functions)]
        self.failed = [0] * functions
        self.counts = {"swap_ins_pcie": 0, "swap_ins_nvlink": 0, "cold_starts": 0, "evictions": 0}
        self.swap_in_bytes = 0
        self._heap: list = []
        self._seq = itertools.count()
        self._transfers: dict[int, tuple] = {}
        self._tid = itertools.count()

    def _keepalive_windows(self) -> dict[str, float]:
        # INFless-KA keeps a container for the 99th percentile of its function's inter-arrival time
        order = np.argsort(self.arrival_fn, kind="stable")  # arrivals are in time order already
        per_function = np.split(self.arrival_ms[order], np.cumsum(np.bincount(self.arrival_fn,
                                                                              minlength=self.n_functions))[:-1])
        return {self.names[f]: float(np.percentile(np.diff(t), 99))
                for f, t in enumerate(per_function) if len(t) >= 2}

    def _make_node(self) -> _Node:
        c = self.cluster
        capacity = int(c.gpu_memory_gb * GB * (1.0 if self.policy.containers else c.arena_fraction))
        nvlink = c.nvlink_gbps > 0 and self.policy.placement == "torpor"
        gpus, links = [], {}
        for k in range(c.gpus):
            link_id = f"pcie:{k // c.gpus_per_link}"
            peers = {j for j in range(c.gpus) if j != k} if nvlink else set()
            state = DeviceState(k, link_id, capacity, nvlink_peers=peers, kind="sim")
            gpus.append(_GPU(state))
            links.setdefault(link_id, _Link(c.pcie_gbps * GB / 1000.0))
            links[state.nvlink_id] = _Link(max(c.nvlink_gbps, 1e-9) * GB / 1000.0)
        return _Node(gpus, links)

    def _preload(self) -> int:
        """Places container functions round-robin (function i on GPU i mod G) while memory lasts."""
        unplaced = 0
        per_node: dict[int, int] = {}
        for f in range(self.n_functions):
            node = self.nodes[self.home_node[f]]
            k = per_node.get(self.home_node[f], 0)
            per_node[self.home_node[f]] = k + 1
            order = node.devices[k % len(node.devices):] + node.devices[:k % len(node.devices)]
            target = next((d for d in order if d.free_bytes >= self.footprint[f]), None)
            if target is None:
                unplaced += 1
                continue
            target.resident[self.names[f]] = ResidentModel(self.names[f], self.footprint[f])
        return unplaced

    def _push(self, t: float, kind: int, data: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, data))

    @staticmethod
    def _refresh(node: _Node, now: float) -> bool:
        idle = False
        for g in node.gpus:
            st = g.state
            st.queue_ms = g.busy_until - now if st.busy and g.busy_until > now else 0.0
            idle = idle or (not st.busy and st.healthy)
        return idle

    def _in_flight(self, node: _Node) -> dict[str, int]:
        return {lid: len(link.active) for lid, link in node.links.items() if link.active}

    def _decide(self, node: _Node, fn: int, now: float) -> Decision | None:
        return choose_device(self.names[fn], self.footprint[fn], node.devices, self.predictor,
                             self._in_flight(node), self.policy, now / 1000.0)

    def _pick_node(self, fn: int, now: float) -> _Node:
        if len(self.nodes) == 1:
            return self.nodes[0]
        if self.policy.placement == "pinned":
            return self.nodes[self.home_node[fn]]
        views, flights = {}, {}
        for i, node in enumerate(self.nodes):
            self._refresh(node, now)
            views[str(i)] = node.devices
            flights[str(i)] = self._in_flight(node)
        picked = choose_node(self.names[fn], self.footprint[fn], views, self.predictor, flights, self.policy,
                             now / 1000.0)
        return self.nodes[int(picked[0])] if picked else self.nodes[self.home_node[fn]]

    def _fail(self, req: _Req) -> None:
        self.failed[req.fn] += 1

    def _offer(self, node: _Node, req: _Req, now: float, too_big: list[int]) -> str:
        """Decides one waiting request and acts on it.

        Returns ``started``, ``failed``, ``wait`` (for a device, or for its container), or
        ``park`` (no device has room until keep-alive windows expire). ``too_big`` holds the
        smallest footprint that found no room in this pass: room is monotone in bytes, so
        larger models need not ask again.
        """
        if now - req.arrival > self.cluster.timeout_ms:
            self._fail(req)
            return "failed"
        if self.footprint[req.fn] >= too_big[0]:
            return "park"
        decision = self._decide(node, req.fn, now)
        if decision is None:
            self._fail(req)
            return "failed"
        if decision.path == "queue":
            if decision.device is None:
                too_big[0] = min(too_big[0], self.footprint[req.fn])
                return "park"
            return "wait"
        return "wait" if self._start(node, req, decision, now) else "started"

    def _arrive(self, node: _Node, req: _Req, now: float) -> None:
        # requests already waiting are blocked on busy devices or on room, so an arrival
        # only needs a decision of its own; state changes re-examine the waiting ones
        self._refresh(node, now)
        outcome = self._offer(node, req, now, [math.inf])
        if outcome == "wait":
            node.waiting.append(req)
        elif outcome == "park":
            node.parked.append(req)

    def _scan(self, node: _Node, now: float, parked: bool = False) -> None:
        """Starts whatever waiting (and, with ``parked``, parked) requests can start, in SLO or FIFO order."""
        waiting = node.waiting + node.parked if parked else node.waiting
        if not waiting:
            return
        idle = self._refresh(node, now)
        containers = self.policy.placement == "container"
        if not idle and not containers:
            return
        if len(waiting) > 1:
            waiting = self.tracker.order(waiting, now, fifo=self.fifo)
        keep: list[_Req] = []
        park: list[_Req] = [] if parked else node.parked
        blocked: set[int] = set()
        too_big = [math.inf]
        for i, req in enumerate(waiting):
            if req.fn in blocked:
                keep.append(req)
                continue
            outcome = self._offer(node, req, now, too_big)
            if outcome == "wait":
                blocked.add(req.fn)
                keep.append(req)
            elif outcome == "park":
                park.append(req)
            if outcome == "started" and not containers and not self._refresh(node, now):
                keep.extend(waiting[i + 1:])
                break
        node.waiting = keep
        node.parked = park

    def _start(self, node: _Node, req: _Req, d: Decision, now: float) -> bool:
        """Applies decision ``d``; returns whether ``req`` stays waiting (container start)."""
        g = node.gpus[d.device]
        st = g.state
        name = self.names[req.fn]
        for victim in d.evict:
            del st.resident[victim]
            self.counts["evictions"] += 1
        exec_ms = self.spec[req.fn].exec_ms * float(self.jitter[req.idx])
        if d.path == "cold":
            st.resident[name] = ResidentModel(name, self.footprint[req.fn], now / 1000.0, in_use=1, loading=True)
            self.counts["cold_starts"] += 1
            self._push(now + self.policy.cold_start_ms, _LOADED, (node, st, name))
            return True
        st.busy = True
        if d.path == "resident":
            st.resident[name].in_use += 1
            g.busy_until = now + exec_ms
            self._push(g.busy_until, _FINISH, (node, g, req, now, exec_ms))
            return False
        st.resident[name] = ResidentModel(name, self.footprint[req.fn], now / 1000.0, in_use=1, loading=True)
        if d.path == "nvlink":
            node.devices[d.source].resident[name].in_use += 1
            link = node.links[st.nvlink_id]
            self.counts["swap_ins_nvlink"] += 1
        else:
            link = node.links[st.link_id]
            self.counts["swap_ins_pcie"] += 1
        g.busy_until = now + d.predicted_ms
        self.swap_in_bytes += self.footprint[req.fn]
        tid = next(self._tid)
        self._transfers[tid] = (node, g, req, now, exec_ms, d.source)
        link.advance(now)
        link.active[tid] = float(self.footprint[req.fn])
        self._relink(link)
        return False

    def _relink(self, link: _Link) -> None:
        link.version += 1
        if link.active:
            t, _ = link.next_done()
            self._push(t, _LINK, (link, link.version))

    def _on_link(self, now: float, link: _Link, version: int) -> None:
        if version != link.version:
            return
        link.advance(now)
        _, tid = link.next_done()
        del link.active[tid]
        self._relink(link)
        node, g, req, start, exec_ms, source = self._transfers.pop(tid)
        name = self.names[req.fn]
        g.state.resident[name].loading = False
        if source is not None:
            node.devices[source].resident[name].in_use -= 1
        g.busy_until = max(now, start + exec_ms) + self.predictor.pipeline_tail * exec_ms
        self._push(g.busy_until, _FINISH, (node, g, req, start, exec_ms))

    def _on_finish(self, now: float, node: _Node, g: _GPU, req: _Req, start: float, exec_ms: float) -> None:
        st = g.state
        st.busy = False
        g.busy_ms += now - start
        st.load = g.busy_ms
        name = self.names[req.fn]
        m = st.resident[name]
        m.in_use -= 1
        m.last_used = now / 1000.0
        latency = now - req.arrival + self.cluster.request_overhead_ms
        self.latencies[req.fn].append(latency)
        self.tracker.record(name, latency)
        self.predictor.observe(name, st.kind, exec_ms)
        self._scan(node, now)

    def _on_loaded(self, now: float, node: _Node, st: DeviceState, name: str) -> None:
        m = st.resident[name]
        m.loading = False
        m.in_use -= 1
        m.last_used = now / 1000.0
        self._scan(node, now)

    def _on_tick(self, now: float) -> None:
        t = now / 1000.0
        for node in self.nodes:
            for st in node.devices:
                expired = [m.name for m in st.resident.values() if m.in_use == 0 and not m.loading
                           and (t - m.last_used) * 1000.0 >= self.policy.keepalive_of(m.name)]
                for name in expired:
                    del st.resident[name]
                    self.counts["evictions"] += 1
            self._scan(node, now, parked=True)

    def run(self) -> dict[str, Any]:
        """Runs the simulation to the end and returns its result (see :func:`simulate`)."""
        wall = time.perf_counter()
        heap, arrival_ms, arrival_fn = self._heap, self.arrival_ms, self.arrival_fn
        n, i = len(arrival_ms), 0
        if self.policy.placement == "container":
            self._push(KEEPALIVE_TICK_MS, _TICK, None)
        while i < n or heap:
            if heap and (i >= n or heap[0][0] <= arrival_ms[i]):
                now, _, kind, data = heapq.heappop(heap)
                if kind == _LINK:
                    self._on_link(now, *data)
                elif kind == _FINISH:
                    self._on_finish(now, *data)
                elif kind == _LOADED:
                    self._on_loaded(now, *data)
                else:
                    self._on_tick(now)
                    if i < n or any(node.waiting or node.parked for node in self.nodes):
                        self._push(now + KEEPALIVE_TICK_MS, _TICK, None)
                continue
            now, fn = float(arrival_ms[i]), int(arrival_fn[i])
            req = _Req(self.names[fn], now, fn, i)
            i += 1
            node = self._pick_node(fn, now)
            self._arrive(node, req, now)
        for node in self.nodes:
            for req in node.waiting + node.parked:
                self._fail(req)
            node.waiting, node.parked = [], []
        return self._result(time.perf_counter() - wall)

    def _result(self, wall_s: float) -> dict[str, Any]:
        met = []
        for f in range(self.n_functions):
            if self.latencies[f] or self.failed[f]:
                met.append(stats.slo_met(self.latencies[f], self.failed[f], self.tracker.slo_ms(self.names[f])))
        flat = np.fromiter(itertools.chain.from_iterable(self.latencies), float)
        busy = np.array([g.busy_ms for node in self.nodes for g in node.gpus])
        c = self.cluster

        def pct(q: float) -> float | None:
            return round(float(np.percentile(flat, q)), 3) if len(flat) else None

        return {
            "policy": self.policy.name.value, "nodes": c.nodes, "gpus": c.gpus, "functions": self.n_functions,
            "minutes": c.minutes, "seed": c.seed,
            "requests": int(len(self.arrival_ms)), "completed": int(len(flat)), "failed": int(sum(self.failed)),
            "slo_attainment": stats.slo_attainment(met),
            "p50_ms": pct(50), "p98_ms": pct(98), "p99_ms": pct(99),
            "mean_ms": round(float(flat.mean()), 3) if len(flat) else None,
            "gpu_load_cov": round(float(busy.std() / busy.mean()), 4) if busy.mean() > 0 else 0.0,
            "swap_ins": self.counts["swap_ins_pcie"] + self.counts["swap_ins_nvlink"], **self.counts,
            "swap_in_gb": round(self.swap_in_bytes / GB, 3),
            "unplaced_functions": self.unplaced,
            "gpu_memory_gb": c.gpu_memory_gb,
            "weights_capacity_gb": round(self.nodes[0].devices[0].capacity_bytes / GB, 3),
            "wall_s": round(wall_s, 3),
        }


def simulate(cluster: ClusterSettings, functions: int, policy: str) -> dict[str, Any]:
    """Runs one simulation.

    Returns:
        A JSON-serialisable dict: ``policy``, ``nodes``, ``gpus``, ``functions``, ``minutes``,
        ``seed``; ``requests`` (arrivals), ``completed``, ``failed`` (not served: native
        functions without room, keep-alive requests that timed out); ``slo_attainment``
        (share of functions whose P98, failures counted as infinite, meets their SLO);
        ``p50_ms``, ``p98_ms``, ``p99_ms``, ``mean_ms`` over completed requests;
        ``gpu_load_cov`` (coefficient of variation of per-GPU busy time); ``swap_ins`` =
        ``swap_ins_pcie`` + ``swap_ins_nvlink``; ``swap_in_gb`` (bytes they moved);
        ``cold_starts``; ``evictions``;
        ``unplaced_functions``; ``gpu_memory_gb``; ``weights_capacity_gb`` (per GPU: the
        arena, or all memory for container policies); ``wall_s``.

    Raises:
        ValueError: bad settings or policy. OSError: unreadable trace or profiles.
    """
    return Simulation(cluster, functions, policy).run()


def _check_policy(policy: str) -> str:
    if policy not in POLICY_NAMES:
        raise click.BadParameter(f"unknown policy {policy!r}; choose from {', '.join(POLICY_NAMES)}",
                                 param_hint="--policy")
    return policy


def _run_or_fail(cluster: ClusterSettings, functions: int, policy: str) -> dict[str, Any]:
    try:
        return simulate(cluster, functions, policy)
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None


def _line(r: dict[str, Any]) -> str:
    att = "n/a" if r["slo_attainment"] is None else f"{100 * r['slo_attainment']:.1f}%"
    return (f"{r['policy']:>9} functions={r['functions']:<4} SLO attainment {att:>6}  p50 {r['p50_ms']} ms  "
            f"p98 {r['p98_ms']} ms  p99 {r['p99_ms']} ms  swap-ins {r['swap_ins']} "
            f"(pcie {r['swap_ins_pcie']}, nvlink {r['swap_ins_nvlink']})  cold starts {r['cold_starts']}  "
            f"failed {r['failed']}/{r['requests']}  load CoV {r['gpu_load_cov']}  [{r['wall_s']} s]")


@click.command("simulate")
@options(ClusterSettings)
@options(SimulateSettings)
def command(**kwargs: Any) -> None:
    """Simulates a cluster under one scheduling policy, replaying the Torpor trace."""
    cluster = from_kwargs(ClusterSettings, kwargs)
    run = from_kwargs(SimulateSettings, kwargs)
    result = _run_or_fail(cluster, run.functions, _check_policy(run.policy))
    click.echo(json.dumps(result) if run.json else _line(result))


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
    if not values or min(values) < 1:
        raise click.BadParameter("expected at least one count, all >= 1", param_hint=name)
    return values


def _one(args: tuple[dict, int, str]) -> dict[str, Any]:
    cluster, functions, policy = args
    return simulate(ClusterSettings(**cluster), functions, policy)


def write_sweep(runs: list[dict[str, Any]], out: str, meta: dict[str, Any]) -> list[Path]:
    """Writes OUT.json (``{"runs": [...], ...meta}``), OUT.md (tables) and OUT.png (SLO attainment
    against function count, one line per policy). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_name(base.name + ext) for ext in (".json", ".md", ".png")]
    paths[0].write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    counts = sorted({r["functions"] for r in runs})
    by = {(r["policy"], r["functions"]): r for r in runs}

    def table(title: str, cell) -> list[str]:
        rows = [f"### {title}", "", "| functions | " + " | ".join(policies) + " |",
                "| ---: | " + " | ".join("---:" for _ in policies) + " |"]
        for n in counts:
            rows.append(f"| {n} | " + " | ".join(cell(by.get((p, n))) for p in policies) + " |")
        return rows + [""]

    def att(r):
        return "" if r is None or r["slo_attainment"] is None else f"{100 * r['slo_attainment']:.1f}%"

    def field(key):
        return lambda r: "" if r is None or r[key] is None else f"{r[key]}"

    lines = [f"# Simulated SLO attainment: {meta['command']}", ""]
    lines += table("SLO attainment (share of functions with P98 within SLO)", att)
    lines += table("P98 latency of all requests, ms", field("p98_ms"))
    lines += table("P99 latency of all requests, ms", field("p99_ms"))
    lines += table("Swap-ins (PCIe + NVLink)", field("swap_ins"))
    lines += table("NVLink swap-ins", field("swap_ins_nvlink"))
    lines += table("Swapped-in GB", field("swap_in_gb"))
    lines += table("Failed requests (not served)", field("failed"))
    lines += table("GPU load CoV", field("gpu_load_cov"))
    paths[1].write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "os^Dvx"
    for i, p in enumerate(policies):
        xs = [n for n in counts if (p, n) in by and by[(p, n)]["slo_attainment"] is not None]
        # shrinking markers and dashes keep policies that coincide (all at 100%) visible
        ax.plot(xs, [100 * by[(p, n)]["slo_attainment"] for n in xs], marker=markers[i % len(markers)],
                markersize=max(3, 10 - 1.5 * i), linestyle=("-", "--", ":", "-.")[i % 4], label=p)
    ax.set_xlabel("functions")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(meta["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


@click.command("sweep")
@options(ClusterSettings)
@options(SweepSettings)
def sweep_command(**kwargs: Any) -> None:
    """Simulates every (function count, policy) pair and writes OUT.json, OUT.md and OUT.png."""
    cluster = from_kwargs(ClusterSettings, kwargs)
    sweep = from_kwargs(SweepSettings, kwargs)
    counts = _ints(sweep.functions, "--functions")
    policies = [_check_policy(p.strip()) for p in sweep.policies.split(",") if p.strip()]
    if not policies:
        raise click.BadParameter("expected at least one policy", param_hint="--policies")
    try:
        cluster.validate()
        model_set(cluster)
        load_trace(cluster.trace or None)
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    grid = [(asdict(cluster), n, p) for n in counts for p in policies]
    jobs = sweep.jobs or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=min(jobs, len(grid))) as pool:
        runs = []
        for r in pool.map(_one, grid):
            click.echo(_line(r), err=True)
            runs.append(r)
    c = cluster
    meta = {"command": "torpor sweep " + " ".join(_argv_of(cluster, sweep)),
            "title": f"{c.nodes} node(s) x {c.gpus} GPUs, {c.gpu_memory_gb:g} GB each, PCIe {c.pcie_gbps:g} GB/s, "
                     f"NVLink {c.nvlink_gbps:g} GB/s, {c.minutes} trace minutes, seed {c.seed}",
            "settings": {**asdict(cluster), **asdict(sweep)}}
    for path in write_sweep(runs, sweep.out, meta):
        click.echo(str(path))


def _argv_of(cluster: ClusterSettings, sweep: SweepSettings) -> list[str]:
    """The flags that reproduce the run: the grid and every setting that differs from its default."""
    out = []
    for obj in (cluster, sweep):
        for name, value in asdict(obj).items():
            default = type(obj).__dataclass_fields__[name].default
            if name != "jobs" and (value != default or name in ("nodes", "gpus", "functions", "policies", "out")):
                out.append(f"--{name.replace('_', '-')} {value}")
    return out

