"""The node: the host model store plus one executor per device, and the choice of device.

Device choice follows Torpor's order (Yu et al., ATC '25 §5): a device where the model is
already resident or being placed by an earlier request (the least loaded one), else a device
with a free gap that fits it without eviction (least loaded first, then the emptiest arena),
else the device whose cheapest eviction window is cheapest.
"""
from __future__ import annotations

import threading
from collections import Counter

import torch

from runtime.gpu_server.arena import ArenaFull
from runtime.gpu_server.device import Device
from runtime.gpu_server.executor import Executor
from runtime.gpu_server.store import HostModel, ModelStore


class NoHealthyDevice(Exception):
    """Every device of the node is unhealthy."""


class Node:
    """The GPU server's state: models and devices.

    Args:
        store: the host model store.
        devices: the devices to serve on (each gets an executor).
        group_bytes: copy group size for pipelined swap-ins, bytes.
    """

    def __init__(self, store: ModelStore, devices: list[Device], group_bytes: int):
        self.store = store
        self.executors = [Executor(d, group_bytes=group_bytes) for d in devices]
        self._choose_lock = threading.Lock()
        self._routed: Counter[tuple[int, str]] = Counter()  # (device, model) → requests routed, not finished

    def choose(self, model: HostModel, hint: int | None = None) -> Executor:
        """Picks the executor for one request and counts the request in its queue.

        Args:
            model: the model to run.
            hint: a device index proposed by the controller; taken when it is healthy and
                the model is not resident elsewhere.

        Raises:
            NoHealthyDevice: no device is healthy.
        """
        with self._choose_lock:
            healthy = [e for e in self.executors if e.healthy]
            if not healthy:
                raise NoHealthyDevice("no healthy device on this node: " + "; ".join(e.fault for e in self.executors))
            # a device a request for this model was already routed to is about to hold it: later
            # requests follow, rather than start a second swap-in of the same model elsewhere
            resident = [e for e in healthy if e.is_resident(model.name) or self._routed[(e.device.index, model.name)]]
            if resident:
                chosen = min(resident, key=lambda e: e.queued)
            elif hint is not None and 0 <= hint < len(self.executors) and self.executors[hint].healthy:
                chosen = self.executors[hint]
            else:
                roomy = [e for e in healthy if e.fits_without_eviction(model.nbytes)]
                # among equals the emptiest arena, so that models spread before anything is evicted
                chosen = min(roomy or healthy, key=lambda e: (e.queued, self._eviction_price(e, model), e.arena.used))
            chosen.queued += 1
            self._routed[(chosen.device.index, model.name)] += 1
            return chosen

    @staticmethod
    def _eviction_price(ex: Executor, model: HostModel) -> float:
        try:
            _, victims = ex.arena.plan(model.nbytes, lambda o: ex.resident[o].in_use == 0,
                                       lambda owners: max(ex.resident[o].last_used for o in owners))
        except (ArenaFull, KeyError):
            return float("inf")
        return max((ex.resident[v].last_used for v in victims), default=0.0)

    def done(self, ex: Executor, model: HostModel) -> None:
        """Ends the routing of one request for ``model`` to ``ex`` (see :meth:`choose`)."""
        with self._choose_lock:
            ex.queued -= 1
            key = (ex.device.index, model.name)
            self._routed[key] -= 1
            if not self._routed[key]:
                del self._routed[key]

    def infer(self, name: str, inputs: list[torch.Tensor], hint: int | None, timeout_s: float) -> tuple[list[torch.Tensor], dict]:
        """Runs model ``name`` on CPU ``inputs`` on the chosen device.

        Returns:
            (outputs as CPU tensors, {"device", "swap_in" (bool)}).

        Raises:
            KeyError, ModelLoadError (store), NoHealthyDevice, NoRoom, DeviceFault, and what
            the model raises for these inputs.
        """
        model = self.store.get(name)
        ex = self.choose(model, hint)
        try:
            res, swapped = ex.acquire(model, timeout_s)
            try:
                return ex.run(res, inputs), {"device": ex.device.index, "swap_in": swapped}
            finally:
                ex.release(res)
        finally:
            self.done(ex, model)

    def prefetch(self, name: str, hint: int | None, timeout_s: float) -> int:
        """Starts swapping ``name`` in on the chosen device without running it (late binding).

        Returns the device index. Raises as :meth:`infer`.
        """
        model = self.store.get(name)
        ex = self.choose(model, hint)
        try:
            ex.release(ex.acquire(model, timeout_s)[0])
            return ex.device.index
        finally:
            self.done(ex, model)

    def forget(self, name: str) -> None:
        """Unregisters ``name``: drops it from the store and from every idle device."""
        self.store.drop(name)
        for ex in self.executors:
            ex.forget(name)
