"""The node: the host model store plus one executor per device, and the choice of device.

The choice is the scheduling policy of runtime/gpu_server/placement.py — the same code the
controller and the simulator (``torpor simulate``) run — applied to live views of the
executors: resident on an idle device → run there; resident only on busy devices → peer copy
(NVLink) to an idle one when predicted faster; otherwise a host copy to the device with the
lowest predicted completion (Torpor, Yu et al., ATC '25 §5). A model resident somewhere is
never fetched from the host again for another device: it queues where it is, or is copied
from a peer (on its own device a guest may move home: Executor._rehome). Eviction inside a
device ranks contiguous windows by the policy's eviction priority (placement.window_cost). One rule comes
first: a model already on its way to a device (a swap-in routed but not landed) is followed
there, so that simultaneous first requests start exactly one transfer.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import torch

from controller_plugin.predictor import Predictor
from runtime.gpu_server import topology as topo
from runtime.gpu_server.device import Device
from runtime.gpu_server.executor import Executor, NoRoom, Residency
from runtime.gpu_server.placement import DeviceState, Policy, ResidentModel, choose_device, eviction_priority, window_cost
from runtime.gpu_server.store import HostModel, ModelStore


class NoHealthyDevice(Exception):
    """Every device of the node is unhealthy."""


class Node:
    """The GPU server's state: models and devices.

    Args:
        store: the host model store.
        devices: the devices to serve on (each gets an executor).
        group_bytes: copy group size for pipelined swap-ins, bytes.
        policy: scheduling policy name (``torpor``, ``lru``...; placement.POLICY_NAMES).
        topology: links between the devices (default: each device its own host link, no NVLink).
        graphs: capture CUDA graphs of resident models (graphs.py).
    """

    def __init__(self, store: ModelStore, devices: list[Device], group_bytes: int, policy: str = "torpor",
                 topology: topo.Topology | None = None, graphs: bool = True):
        self.store = store
        self.policy = Policy(policy)
        self.predictor = Predictor()
        self.topology = topology or topo.cpu_topology(len(devices))
        self.executors = [Executor(d, eviction_cost=self._eviction_cost, group_bytes=group_bytes, graphs=graphs) for d in devices]
        store.on_replaced = self._version_replaced
        self._choose_lock = threading.Lock()
        self._routed: Counter[tuple[int, str]] = Counter()  # (device, model) → requests routed, not finished

    def states(self) -> list[DeviceState]:
        """Policy views of the devices. Reads other executors' tables without their locks
        (``dict()`` copies atomically under the GIL), so an executor may call it while
        holding its own lock."""
        out = []
        for ex in self.executors:
            i = ex.device.index
            resident = {}
            healthy = ex.healthy  # after a sticky CUDA error its event queries raise: nothing lands there any more
            for name, res in dict(ex.resident).items():
                resident[name] = ResidentModel(name, res.model.nbytes, res.last_used, res.in_use,
                                               loading=healthy and res.landing)
            routed = {m: n for (d, m), n in dict(self._routed).items() if d == i}
            kind = ex.device.name
            out.append(DeviceState(
                index=i, link_id=self.topology.link_of(i), capacity_bytes=ex.arena.capacity, resident=resident,
                queue_ms=sum(self.predictor.exec_ms(m, kind) * n for m, n in routed.items()),
                busy=ex.queued > 0, healthy=healthy, nvlink_peers=self.topology.peers(i), kind=kind,
                load=float(ex.stats.runs)))
        return out

    def _eviction_cost(self, ex: Executor):
        states = self.states()
        return window_cost(eviction_priority(states[ex.device.index], states, self.policy, time.monotonic()))

    def choose(self, model: HostModel, hint: int | None = None) -> tuple[Executor, Executor | None]:
        """Picks the executor for one request and counts the request in its queue.

        Args:
            model: the model to run.
            hint: a device index proposed by the controller; taken when the model is
                neither resident nor on its way anywhere.

        Returns:
            (the executor, the peer executor to copy the model from, or None).

        Raises:
            NoHealthyDevice: no device is healthy.
            NoRoom: the model is larger than every healthy device's arena.
        """
        with self._choose_lock:
            healthy = [e for e in self.executors if e.healthy]
            if not healthy:
                raise NoHealthyDevice("no healthy device on this node: " + "; ".join(e.fault for e in self.executors))
            states = self.states()
            ready = [e for e in healthy if states[e.device.index].ready(model.name)]
            on_the_way = [e for e in healthy if not ready and (e.is_resident(model.name) or self._routed[(e.device.index, model.name)])]
            source = None
            if on_the_way:
                chosen = min(on_the_way, key=lambda e: e.queued)
            elif not ready and hint is not None and 0 <= hint < len(self.executors) and self.executors[hint].healthy:
                chosen = self.executors[hint]
            else:
                in_flight = Counter(self.topology.link_of(s.index) for s in states for m in s.resident.values() if m.loading)
                decision = choose_device(model.name, model.nbytes, states, self.predictor, in_flight, self.policy,
                                         time.monotonic())
                if decision is None:
                    raise NoRoom(f"model {model.name} ({model.nbytes} bytes) exceeds every healthy device's arena")
                if ready and decision.path == "pcie":
                    # a resident model is never fetched from the host a second time: the extra
                    # transfer would slow every other copy on the link (a peer copy is allowed)
                    chosen = min(ready, key=lambda e: e.queued)
                elif decision.device is None:
                    chosen = min(healthy, key=lambda e: e.queued)
                else:
                    chosen = self.executors[decision.device]
                    if decision.path == "nvlink" and decision.source is not None:
                        source = self.executors[decision.source]
            chosen.queued += 1
            self._routed[(chosen.device.index, model.name)] += 1
            return chosen, source

    def done(self, ex: Executor, model: HostModel) -> None:
        """Ends the routing of one request for ``model`` to ``ex`` (see :meth:`choose`)."""
        with self._choose_lock:
            ex.queued -= 1
            idle = ex.queued == 0
            key = (ex.device.index, model.name)
            self._routed[key] -= 1
            if not self._routed[key]:
                del self._routed[key]
        if idle:
            ex.idle()

    def _acquire(self, ex: Executor, source: Executor | None, model: HostModel, timeout_s: float,
                 prefetch: bool = False) -> tuple[Residency, bool, Residency | None]:
        pinned = source.pin(model) if source is not None else None
        try:
            res, swapped = ex.acquire(model, timeout_s, source.region_bytes(pinned) if pinned else None, prefetch)
        except BaseException:
            if pinned:
                source.release(pinned)
            raise
        return res, swapped, pinned

    def infer(self, name: str, inputs: list[torch.Tensor], hint: int | None, timeout_s: float) -> tuple[list[torch.Tensor], dict]:
        """Runs model ``name`` on CPU ``inputs`` on the chosen device.

        Returns:
            (outputs as CPU tensors, {"device", "swap_in" (bool), "path" (resident, pcie,
            nvlink), "run_ms" (the run), "queue_ms" (waiting for runs ahead of it on the
            device), "graph" (bool: replayed from a CUDA graph)}).

        Raises:
            KeyError, ModelLoadError (store), NoHealthyDevice, NoRoom, DeviceFault, and what
            the model raises for these inputs.
        """
        model = self.store.get(name)
        ex, source = self.choose(model, hint)
        try:
            res, swapped, pinned = self._acquire(ex, source, model, timeout_s)
            try:
                outputs, times = ex.run(res, inputs)
                if not swapped:
                    self.predictor.observe(name, ex.device.name, times.run_ms)
                path = "resident" if not swapped else "nvlink" if pinned else "pcie"
                return outputs, {"device": ex.device.index, "swap_in": swapped, "path": path, "run_ms": times.run_ms,
                                 "queue_ms": times.queue_ms, "graph": times.graph}
            finally:
                ex.release(res)
                if pinned:
                    source.release(pinned)
        finally:
            self.done(ex, model)

    def prefetch(self, name: str, hint: int | None, timeout_s: float) -> dict:
        """Starts swapping ``name`` in on the chosen device without running it (late binding).

        Returns:
            {"device", "swap_in" (bool: this call started a swap-in), "path" (resident,
            pcie, nvlink)}.

        Raises as :meth:`infer`.
        """
        model = self.store.get(name)
        ex, source = self.choose(model, hint)
        try:
            res, swapped, pinned = self._acquire(ex, source, model, timeout_s, prefetch=True)
            if pinned:
                if res.gates.swap is not None:  # the peer copy must land before its source may be evicted
                    res.gates.swap.events[-1].synchronize()
                source.release(pinned)
            ex.release(res)
            path = "resident" if not swapped else "nvlink" if pinned else "pcie"
            return {"device": ex.device.index, "swap_in": swapped, "path": path}
        finally:
            self.done(ex, model)

    def _version_replaced(self, name: str) -> None:
        """The store found a new version of ``name`` in the repository, or none: every copy
        on the devices is of an older version. Idle ones are evicted and their bound
        modules, homes and graphs dropped at once (no stale host buffer stays referenced);
        copies in use are replaced once idle (Executor.acquire)."""
        for ex in self.executors:
            ex.forget(name)

    def close(self) -> None:
        """Stops the executors' capture threads: no capture step may be under way while the
        interpreter exits."""
        for ex in self.executors:
            ex.close()

    def forget(self, name: str) -> None:
        """Unregisters ``name``: drops it from the store and from every idle device."""
        self.store.drop(name)
        for ex in self.executors:
            ex.forget(name)
