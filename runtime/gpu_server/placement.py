"""Node-level scheduling policy: which device serves a request, and which resident models
make room for it.

Everything here is a pure function of plain dataclasses — no torch, no threads, no I/O — so
that the GPU server, the controller and the cluster simulator (``torpor simulate``) take the
very same decisions. The caller owns the state: it builds :class:`DeviceState` views of its
devices, asks :func:`choose_device` for a :class:`Decision`, and applies it (evicting the
victims, starting the copy, queueing the request).

Torpor's order (Yu et al., ATC '25, and docs/scheduling.md):

1. the model is resident on an idle healthy device: run it there;
2. it is resident only on busy devices: copy it over NVLink (or, failing a peer link, from
   the host) to an idle device when that is predicted to finish sooner than waiting;
3. it is resident nowhere: copy it from the host to the device with the lowest predicted
   completion, counting the slowdown the copy inflicts on transfers sharing that device's
   link and the cost of fetching back what it evicts;
4. no device can start it now: queue it for the device predicted to serve it soonest.

Eviction never touches a model in use and, under the ``torpor`` policy, keeps the only
resident copy of a heavy model: duplicates (resident on another device too) go first, then
light models, then heavy ones, least recently used first within each tier.
"""
from __future__ import annotations

import enum
import heapq
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from controller_plugin.predictor import Predictor

PATHS = ("resident", "nvlink", "pcie", "cold", "queue")


class PolicyName(str, enum.Enum):
    """The scheduling policies; each baseline removes one part of Torpor's.

    ``torpor``: all of it. ``lru``: Torpor's device choice, plain LRU eviction. ``random``:
    a random idle device, no peer copies. ``fifo``: Torpor's placement, FIFO request order.
    ``native``: each function's model pinned on one device, never swapped (no room: not
    served). ``keepalive`` (INFless-KA): per-function containers, loaded by a cold start and
    kept for the 99th percentile of the function's inter-arrival time.
    """

    TORPOR = "torpor"
    LRU = "lru"
    RANDOM = "random"
    FIFO = "fifo"
    NATIVE = "native"
    KEEPALIVE = "keepalive"


POLICY_NAMES = tuple(p.value for p in PolicyName)

# what each policy does at each step: device choice, eviction order, request order
_PLACEMENT = {"torpor": "torpor", "lru": "torpor", "fifo": "torpor", "random": "random",
              "native": "pinned", "keepalive": "container"}
_EVICTION = {"torpor": "torpor", "lru": "lru", "fifo": "torpor", "random": "torpor",
             "native": "none", "keepalive": "keepalive"}
_ORDERING = {"torpor": "slo", "lru": "slo", "fifo": "fifo", "random": "slo",
             "native": "fifo", "keepalive": "fifo"}


@dataclass
class Policy:
    """A scheduling policy and its parameters.

    Attributes:
        name: one of :data:`POLICY_NAMES` (a :class:`PolicyName` or its string).
        heavy_bytes: a model of at least this many bytes is heavy: its only resident copy is
            evicted last (200 MB: a re-fetch over 55 GB/s PCIe costs >= 3.6 ms).
        cold_start_ms: time to start a function's container and load its model, for the
            container policies (12 s: a fresh process that builds, loads and runs ResNet-50
            once, DESIGN.md §3).
        keepalive_ms: per model, how long an idle container is kept (``keepalive`` policy).
        default_keepalive_ms: keep-alive of a model missing from ``keepalive_ms``.
        rng: randomness of the ``random`` policy (seed it for reproducible runs).

    Raises:
        ValueError: unknown policy name.
    """

    name: PolicyName | str = PolicyName.TORPOR
    heavy_bytes: int = 200_000_000
    cold_start_ms: float = 12_000.0
    keepalive_ms: Mapping[str, float] = field(default_factory=dict)
    default_keepalive_ms: float = 600_000.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __post_init__(self) -> None:
        self.name = PolicyName(self.name)

    @property
    def placement(self) -> str:
        """Device choice: ``torpor``, ``random``, ``pinned`` or ``container``."""
        return _PLACEMENT[self.name.value]

    @property
    def eviction(self) -> str:
        """Eviction order: ``torpor``, ``lru``, ``keepalive`` or ``none``."""
        return _EVICTION[self.name.value]

    @property
    def ordering(self) -> str:
        """Order of waiting requests: ``slo`` (SLO debt, controller_plugin/slo.py) or ``fifo``."""
        return _ORDERING[self.name.value]

    @property
    def containers(self) -> bool:
        """Whether each function runs in its own container holding its own model copy."""
        return self.placement in ("pinned", "container")

    def keepalive_of(self, model: str) -> float:
        """Keep-alive window of ``model`` in ms."""
        return self.keepalive_ms.get(model, self.default_keepalive_ms)


@dataclass
class ResidentModel:
    """A model resident on a device.

    Attributes:
        name: model name.
        bytes: bytes it occupies on the device.
        last_used: when a request last finished with it, in seconds (any monotonic clock,
            the same for every device).
        in_use: requests (or peer copies) using it now; a model in use is never evicted.
        loading: its weights are still arriving (swap-in or container start): it holds
            its room but cannot run or serve as a peer-copy source yet.
    """

    name: str
    bytes: int
    last_used: float = 0.0
    in_use: int = 0
    loading: bool = False


@dataclass
class DeviceState:
    """What the policy sees of one device.

    Attributes:
        index: device index within its node.
        link_id: id of the host link its host copies travel on (devices behind one PCIe
            switch share one; see runtime/gpu_server/topology.py).
        capacity_bytes: bytes of its weight memory (the arena).
        resident: resident models by name.
        queue_ms: predicted time until already queued or running work is done, ms.
        busy: whether it is running or copying for a request now.
        healthy: whether it may take work.
        nvlink_peers: indices of devices it reaches over NVLink.
        kind: device type, the key of execution profiles (``NVIDIA H200``, ``cpu``).
        load: any measure of the work it did recently (e.g. busy seconds over the last
            minute); among equally good choices the less loaded device wins, which keeps
            the devices evenly used.
    """

    index: int
    link_id: str
    capacity_bytes: int
    resident: dict[str, ResidentModel] = field(default_factory=dict)
    queue_ms: float = 0.0
    busy: bool = False
    healthy: bool = True
    nvlink_peers: set[int] = field(default_factory=set)
    kind: str = "gpu"
    load: float = 0.0

    @property
    def used_bytes(self) -> int:
        """Bytes held by resident (and loading) models."""
        return sum(m.bytes for m in self.resident.values())

    @property
    def free_bytes(self) -> int:
        """Capacity not held by any model (not necessarily contiguous)."""
        return self.capacity_bytes - self.used_bytes

    @property
    def nvlink_id(self) -> str:
        """Id of the link peer copies *into* this device use (its NVLink ingress)."""
        return f"nvlink:{self.index}"

    def ready(self, name: str) -> bool:
        """Whether ``name`` is resident here and runnable now."""
        m = self.resident.get(name)
        return m is not None and not m.loading


@dataclass
class Decision:
    """Where and how one request runs.

    Attributes:
        device: chosen device index; ``None`` only with path ``queue`` when no device can
            take the model until something changes (keep-alive windows not yet expired).
        path: ``resident`` (run it), ``nvlink`` (peer copy from ``source`` first), ``pcie``
            (host copy first), ``cold`` (container start, container policies), or ``queue``
            (nothing can start it now: keep it waiting; re-decide when a device frees).
        source: peer device index of an ``nvlink`` copy, else ``None``.
        predicted_ms: predicted completion of this request from now, ms.
        evict: resident models of ``device`` to evict first, in this order.
        inflicted_ms: predicted delay the copy adds to transfers already on its link, ms.
        eviction_ms: predicted cost of fetching the victims back from the host, ms.
    """

    device: int | None
    path: str
    source: int | None = None
    predicted_ms: float = 0.0
    evict: list[str] = field(default_factory=list)
    inflicted_ms: float = 0.0
    eviction_ms: float = 0.0

    @property
    def score_ms(self) -> float:
        """What the choice minimises: own completion plus the harm done to others, ms."""
        return self.predicted_ms + self.inflicted_ms + self.eviction_ms


def ready_copies(devices: Sequence[DeviceState]) -> dict[str, int]:
    """Model name → number of healthy devices where it is resident and ready."""
    copies: dict[str, int] = {}
    for d in devices:
        if d.healthy:
            for name, m in d.resident.items():
                if not m.loading:
                    copies[name] = copies.get(name, 0) + 1
    return copies


def _ranked(device: DeviceState, all_devices: Sequence[DeviceState], policy: Policy,
            now: float | None, copies: Mapping[str, int] | None) -> list[tuple[tuple, str]]:
    """(sort key, name) of every model of ``device`` that may be evicted now, unsorted."""
    kind = policy.eviction
    if kind == "none":
        return []
    idle = [m for m in device.resident.values() if m.in_use == 0 and not m.loading]
    if kind == "keepalive":
        if now is None:
            raise ValueError("the keepalive policy needs the current time")
        idle = [m for m in idle if (now - m.last_used) * 1000.0 >= policy.keepalive_of(m.name)]
    if kind in ("lru", "keepalive"):
        return [((m.last_used, m.name), m.name) for m in idle]
    if copies is None:
        copies = ready_copies(all_devices)
    # idle models are ready, so they count themselves once when their device is healthy
    mine = 1 if device.healthy else 0
    heavy = policy.heavy_bytes
    return [((0 if copies.get(m.name, 0) > mine else 1 if m.bytes < heavy else 2, m.last_used, m.name), m.name)
            for m in idle]


def eviction_priority(device: DeviceState, all_devices: Sequence[DeviceState], policy: Policy,
                      now: float | None = None, copies: Mapping[str, int] | None = None) -> list[str]:
    """Every model of ``device`` that may be evicted now, the first to go first.

    Never lists a model in use or still loading. ``torpor``: duplicates (ready on another
    healthy device) first, then light models, then heavy ones (``policy.heavy_bytes``), LRU
    within each tier; ``lru``: LRU; ``keepalive``: only models idle for longer than their
    keep-alive window, LRU; ``native``: nothing.

    This is the list an arena that needs *contiguous* room ranks windows by (see
    :func:`window_cost`).

    Args:
        device: the device to free room on.
        all_devices: every device of the node (``device`` included), to find duplicates.
        policy: the policy.
        now: current time in seconds (same clock as ``last_used``); required by ``keepalive``.
        copies: :func:`ready_copies` of ``all_devices`` when the caller has it already.

    Raises:
        ValueError: ``keepalive`` without ``now``.
    """
    return [name for _, name in sorted(_ranked(device, all_devices, policy, now, copies))]


def eviction_order(device: DeviceState, needed_bytes: int, all_devices: Sequence[DeviceState], policy: Policy,
                   now: float | None = None, copies: Mapping[str, int] | None = None) -> list[str] | None:
    """The victims to evict from ``device`` so that ``needed_bytes`` fit, counting bytes only.

    The shortest prefix of :func:`eviction_priority` that frees enough; empty when the model
    fits already. An arena that needs contiguous room should rank windows with
    :func:`window_cost` over the full priority list instead. Arguments as
    :func:`eviction_priority`.

    Returns:
        Victim names in eviction order, or ``None`` when even evicting every evictable
        model would not make room (models in use, or the model exceeds the capacity).

    Raises:
        ValueError: ``keepalive`` without ``now``.
    """
    missing = needed_bytes - device.free_bytes
    if missing <= 0:
        return []
    ranked = _ranked(device, all_devices, policy, now, copies)
    heapq.heapify(ranked)  # usually a victim or two suffice: no need to sort them all
    victims = []
    while ranked and missing > 0:
        _, name = heapq.heappop(ranked)
        victims.append(name)
        missing -= device.resident[name].bytes
    return victims if missing <= 0 else None


def window_cost(priority: Sequence[str]) -> Callable[[list[str]], float]:
    """Price of evicting a contiguous window's owners together, for an arena's planner.

    Lowest wins: the window whose most valuable victim comes earliest in ``priority``;
    among those, the one evicting fewer models. Owners missing from ``priority`` (in use,
    loading, protected) make the window infinitely expensive.

    Args:
        priority: :func:`eviction_priority` of the device.

    Returns:
        ``cost(owners) -> float`` (dimensionless rank).
    """
    rank = {name: i for i, name in enumerate(priority)}
    scale = len(priority) + 1

    def cost(owners: list[str]) -> float:
        if any(o not in rank for o in owners):
            return float("inf")
        return max((rank[o] for o in owners), default=-1) + len(owners) / scale

    return cost


def _refetch_ms(victims: Sequence[str], device: DeviceState, predictor: "Predictor") -> float:
    return sum(predictor.links.transfer_ms(device.resident[v].bytes, "pcie") for v in victims)


def _copy_option(model: str, nbytes: int, device: DeviceState, devices: Sequence[DeviceState],
                 predictor: "Predictor", in_flight: Mapping[str, int], policy: Policy, now: float | None,
                 sources: Sequence[DeviceState], copies: Mapping[str, int] | None) -> Decision | None:
    victims = eviction_order(device, nbytes, devices, policy, now, copies)
    if victims is None:
        return None
    peers = [s for s in sources if s.index in device.nvlink_peers]
    if peers:
        source = min(peers, key=lambda s: (s.queue_ms, s.index))
        path, link, src = "nvlink", device.nvlink_id, source.index
    else:
        path, link, src = "pcie", device.link_id, None
    n = in_flight.get(link, 0)
    pred = predictor.predict(model, device, path=path, in_flight=n)
    return Decision(device.index, path, src, pred.total_ms, victims,
                    inflicted_ms=predictor.links.inflicted_ms(nbytes, path, n),
                    eviction_ms=_refetch_ms(victims, device, predictor))


def _best(options: Sequence[Decision], by_index: Mapping[int, DeviceState]) -> Decision:
    # ties (e.g. every device idle and roomy) go to the less loaded device, then to the one
    # with the most free memory
    return min(options, key=lambda o: (o.score_ms, by_index[o.device].load, -by_index[o.device].free_bytes,
                                       o.device))


def _as_queue(decision: Decision, by_index: Mapping[int, DeviceState]) -> Decision:
    if by_index[decision.device].busy:
        decision.path, decision.source, decision.evict = "queue", None, []
        decision.inflicted_ms = decision.eviction_ms = 0.0
    return decision


def _torpor(model, nbytes, healthy, devices, predictor, in_flight, policy, now) -> Decision:
    by_index = {d.index: d for d in healthy}
    holders = [d for d in healthy if model in d.resident]
    idle_ready = [d for d in holders if not d.busy and d.ready(model)]
    if idle_ready:
        d = min(idle_ready, key=lambda d: (d.load, d.index))
        return Decision(d.index, "resident", predicted_ms=predictor.predict(model, d, path="resident").total_ms)
    # waiting for a holder (busy, or still loading the model) competes with copies elsewhere
    options = [Decision(d.index, "queue", predicted_ms=d.queue_ms + predictor.exec_ms(model, d.kind))
               for d in holders]
    sources = [d for d in holders if d.ready(model)]
    copies = ready_copies(devices)
    for d in healthy:
        if model in d.resident:
            continue
        option = _copy_option(model, nbytes, d, devices, predictor, in_flight, policy, now, sources, copies)
        if option is not None:
            options.append(option)
    if not options:
        # every device's room is held by models in use: wait for the least loaded one
        d = min(healthy, key=lambda d: (d.queue_ms, d.index))
        return Decision(d.index, "queue", predicted_ms=d.queue_ms + predictor.predict(model, d, path="pcie").total_ms)
    return _as_queue(_best(options, by_index), by_index)


def _random(model, nbytes, healthy, devices, predictor, in_flight, policy, now) -> Decision:
    idle = [d for d in healthy if not d.busy]
    if not idle:
        d = policy.rng.choice(healthy)
        return Decision(d.index, "queue", predicted_ms=d.queue_ms + predictor.exec_ms(model, d.kind))
    order = list(idle)
    policy.rng.shuffle(order)
    for d in order:
        if d.ready(model):
            return Decision(d.index, "resident", predicted_ms=predictor.predict(model, d, path="resident").total_ms)
        if model in d.resident:
            continue  # loading here already
        option = _copy_option(model, nbytes, d, devices, predictor, in_flight, policy, now, (), None)
        if option is not None:
            return option
    d = order[0]
    return Decision(d.index, "queue", predicted_ms=d.queue_ms + predictor.exec_ms(model, d.kind))


def _pinned(model, healthy, predictor) -> Decision | None:
    holders = [d for d in healthy if model in d.resident]
    if not holders:
        return None
    d = min(holders, key=lambda d: (d.queue_ms, d.index))
    path = "resident" if not d.busy and d.ready(model) else "queue"
    return Decision(d.index, path, predicted_ms=d.queue_ms + predictor.exec_ms(model, d.kind))


def _container(model, nbytes, healthy, devices, predictor, policy, now) -> Decision:
    holders = [d for d in healthy if model in d.resident]
    if holders:
        idle_ready = [d for d in holders if not d.busy and d.ready(model)]
        d = min(idle_ready or holders, key=lambda d: (d.queue_ms, d.index))
        path = "resident" if idle_ready else "queue"
        return Decision(d.index, path, predicted_ms=d.queue_ms + predictor.exec_ms(model, d.kind))
    options = []
    for d in healthy:
        victims = eviction_order(d, nbytes, devices, policy, now)
        if victims is None:
            continue
        # a container starts without the GPU; it then waits for whatever the GPU runs
        pred = predictor.predict(model, d, path="cold", cold_start_ms=policy.cold_start_ms)
        options.append(Decision(d.index, "cold", predicted_ms=pred.total_ms, evict=victims))
    if not options:
        return Decision(None, "queue", predicted_ms=float("inf"))
    return _best(options, {d.index: d for d in healthy})


def choose_device(model_name: str, model_bytes: int, devices: Sequence[DeviceState], predictor: "Predictor",
                  transfers_in_flight: Mapping[str, int] | None = None, policy: Policy | None = None,
                  now: float | None = None) -> Decision | None:
    """Decides where one request for ``model_name`` runs and how its model gets there.

    Args:
        model_name: the model the request runs.
        model_bytes: bytes it needs on a device (a container policy adds its runtime's own).
        devices: the node's devices (unhealthy ones are skipped).
        predictor: latency predictor (controller_plugin/predictor.py).
        transfers_in_flight: number of transfers now on each link id (``DeviceState.link_id``
            for host copies, ``DeviceState.nvlink_id`` for peer copies).
        policy: the policy (default: ``torpor``).
        now: current time in seconds, same clock as ``ResidentModel.last_used``; needed by
            ``keepalive``.

    Returns:
        The :class:`Decision`; ``None`` when no device can ever take the model: no healthy
        device, the model exceeds every device's capacity, or (``native``) it is pinned
        nowhere.
    """
    policy = policy or Policy()
    in_flight = transfers_in_flight or {}
    healthy = [d for d in devices if d.healthy and d.capacity_bytes >= model_bytes]
    if not healthy:
        return None
    kind = policy.placement
    if kind == "pinned":
        return _pinned(model_name, healthy, predictor)
    if kind == "container":
        return _container(model_name, model_bytes, healthy, devices, predictor, policy, now)
    if kind == "random":
        return _random(model_name, model_bytes, healthy, devices, predictor, in_flight, policy, now)
    return _torpor(model_name, model_bytes, healthy, devices, predictor, in_flight, policy, now)
