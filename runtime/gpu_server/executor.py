"""One device's executor: its resident-model table, weight arena and compute stream.

A request *acquires* its model on the device (swapping it in when absent, evicting idle
models to make contiguous room), *runs* it, and *releases* it. A model with a request
between acquire and release is in use and is never evicted; requests that need room held by
models in use wait until one is released. Runs on one device are serialised (one compute
stream); different devices run in parallel.

CUDA-graph captures (graphs.py) are kept off the request path: a run that finds its model
ready for capture only queues it, and the executor's capture thread does the capture in
steps (one timed run, or one graph captured) while no request is routed to the device — or,
under sustained load, one step per CAPTURE_PATIENCE_S — holding the device for one step at a
time. A capture of ResNet-101 done inline took 145 ms of the device in the
1×H200 node run, and every request behind it waited that long.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from runtime.gpu_server.arena import Arena, ArenaFull, Region
from runtime.gpu_server.device import Device
from runtime.gpu_server.graphs import GraphCache, Key, flatten
from runtime.gpu_server.layout import Binding
from runtime.gpu_server.store import HostModel
from runtime.gpu_server.swap import GROUP_BYTES, PEER_GROUP_BYTES, Gates, SwapIn

log = logging.getLogger("torpor.gpu_server.executor")

BOUND_CACHE = 512  # device-bound module skeletons kept per executor: no device memory, ~0.4-1 MiB of host each
# s: an arena that had to evict to find room this recently is oversubscribed, so a free gap
# is no lasting place for a model: it goes home, evicting whatever idle models are there,
# and replays its graphs there instead of running eagerly as a guest (arena.py, home_first)
PRESSURE_S = 10.0
# s: a capture waiting this long takes a step even while requests are routed to the device,
# one such step per this long: under sustained load the device is never idle, and a graph's
# runs (2-5x faster than eager for the CNNs) give back more device time than its steps take
CAPTURE_PATIENCE_S = 1.0
MAX_CAPTURES = 64  # queued captures kept per executor, the oldest dropped beyond (each holds its inputs, partial graphs)


class NoRoom(Exception):
    """The model cannot be placed on this device before the deadline."""


class DeviceFault(Exception):
    """The device failed while running a model (e.g. a CUDA error); the device is unhealthy."""


@dataclass
class Residency:
    """A model resident on a device: its region, its bound module and its users."""

    model: HostModel
    region: Region
    module: nn.Module
    gates: Gates
    last_used: float = field(default_factory=time.monotonic)
    in_use: int = 0
    deferred: bool = False  # copies not issued: the first run replays the cold graph

    @property
    def landing(self) -> bool:
        """Whether its bytes are not all on the device yet."""
        return self.deferred or (self.gates.swap is not None and not self.gates.swap.done())


@dataclass
class _Bound:
    """A device-bound module skeleton kept by an executor, and where it points now."""

    model: HostModel
    offset: int
    module: nn.Module
    gates: Gates
    binding: Binding


@dataclass(frozen=True)
class RunTimes:
    """Where one run's time went, in ms: waiting for the device's run lock (runs ahead of it
    on this device, or one step of a graph capture), and the run itself (issue, waits for
    weights still landing, kernels, outputs to the host); ``graph``: replayed from a CUDA
    graph rather than run eagerly."""

    queue_ms: float
    run_ms: float
    graph: bool


@dataclass
class _Capture:
    """A graph capture queued for the capture thread: the model at its home and the static
    inputs (on the device) its graphs will read; ``steps`` once started (GraphCache.capture)."""

    key: Key
    model: HostModel
    offset: int
    module: nn.Module
    gates: Gates
    inputs: list[torch.Tensor]
    queued_at: float = field(default_factory=time.monotonic)
    steps: Iterator[None] | None = None


@dataclass
class ExecutorStats:
    swap_ins: int = 0
    swap_in_bytes: int = 0
    peer_swap_ins: int = 0  # of swap_ins, those copied from a peer device (NVLink)
    peer_swap_in_bytes: int = 0
    evictions: int = 0
    runs: int = 0
    graph_runs: int = 0


class Executor:
    """Serves models on one :class:`Device`.

    Args:
        device: the device and its arena memory.
        eviction_cost: given this executor, returns the price of evicting a group of its
            resident models together (lowest is evicted, infinite never); the node passes its
            policy's (placement.window_cost). Default LRU: the most recently used victim sets
            the price.
        group_bytes: copy group size of pipelined swap-ins in bytes.
        graphs: capture and replay CUDA graphs (CUDA devices only; graphs.py).
    """

    def __init__(self, device: Device,
                 eviction_cost: Callable[["Executor"], Callable[[list[str]], float]] | None = None,
                 group_bytes: int = GROUP_BYTES, graphs: bool = True):
        self.device = device
        self.graphs = GraphCache(device) if graphs and device.is_cuda else None
        self.arena = Arena(device.arena_bytes)
        self.resident: dict[str, Residency] = {}
        self.stats = ExecutorStats()
        self.healthy = True
        self.fault = ""
        self.queued = 0  # requests routed here and not finished
        self.group_bytes = group_bytes
        self._eviction_cost = eviction_cost or (lambda ex: lambda owners: max(ex.resident[o].last_used for o in owners))
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # the capture thread's own wake-ups, under the same lock: a release wakes the requests
        # waiting for room, not that thread
        self._capture_wake = threading.Condition(lock)
        self._run_lock = threading.Lock()
        self._homes: dict[str, int] = {}
        self._bound: OrderedDict[str, _Bound] = OrderedDict()
        self._fault_leftovers: list = []  # outputs of failed runs, kept alive (run)
        self._pressed_at = float("-inf")  # last swap-in that found no free gap (PRESSURE_S)
        self._captures: OrderedDict[Key, _Capture] = OrderedDict()
        self._forced_at = float("-inf")  # monotonic time a capture step last ended with requests routed here
        self._stepping: _Capture | None = None  # the job whose step is running (outside _cond)
        self._closed = False
        self._capturer = None
        if self.graphs is not None:
            self._capturer = threading.Thread(target=self._capture_loop, name=f"capture-{device.index}", daemon=True)
            self._capturer.start()

    def is_resident(self, name: str) -> bool:
        return name in self.resident

    def fits_without_eviction(self, nbytes: int) -> bool:
        return any(size >= nbytes for _, size in self.arena.gaps())

    def acquire(self, model: HostModel, timeout_s: float, source: torch.Tensor | None = None,
                prefetch: bool = False) -> tuple[Residency, bool]:
        """Makes ``model`` resident (starting its swap-in if absent) and marks it in use.

        The swap-in is only *issued* here; the run waits for each layer's bytes. ``source``
        is where the bytes come from: the host store by default, or the model's region on a
        peer device (peer swap over NVLink; the caller keeps that copy in use until the
        request ends). Without ``prefetch``, a model with a cold graph defers its copies to
        the run, which replays them inside the graph. A model resident as an idle guest may
        be moved home first (:meth:`_rehome`), which counts as a swap-in.

        Returns:
            (the residency, whether this call started a swap-in).

        Raises:
            NoRoom: no room could be made within ``timeout_s`` seconds (models in use hold
                it), or the model is larger than the arena.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                res = self.resident.get(model.name)
                if res is not None and res.model is not model and res.in_use == 0:
                    self._evict(model.name)  # a stale version of a re-registered model
                    res = None
                if res is not None and res.model is model:
                    if source is not None or not self._rehome(res):
                        res.in_use += 1
                        return res, False
                    res = None  # evicted from where it was a guest: swapped in at home below
                if model.nbytes > self.arena.capacity:
                    raise NoRoom(f"model {model.name} ({model.nbytes} bytes) exceeds the arena of device "
                                 f"{self.device.index} ({self.arena.capacity} bytes)")
                # every release wakes every waiter: one that cannot find room even among the
                # idle models' bytes goes back to sleep without planning (herds of hundreds)
                if res is None and self._idle_room() >= model.nbytes:
                    try:
                        return self._swap_in(model, source, defer=not prefetch), True
                    except ArenaFull:
                        pass
                if res is None:
                    self._pressed_at = time.monotonic()  # waiting for room: oversubscribed (PRESSURE_S)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoRoom(f"no room for {model.name} on device {self.device.index} within {timeout_s:.1f} s: "
                                 "the resident models are in use")
                self._cond.wait(remaining)

    def _idle_room(self) -> int:
        """Arena bytes not held by models in use: an upper bound on the room eviction can make."""
        return self.arena.capacity - sum(r.region.size for r in self.resident.values() if r.in_use)

    def _home_first(self, model: HostModel, home: int | None) -> Callable[[str], bool] | None:
        """Which models ``model`` may evict from its home while free gaps exist (arena.plan's
        ``home_first``): None when its cold graph there does not beat its eager run; any idle
        model while the arena is oversubscribed (PRESSURE_S); otherwise only guests — models
        away from their own homes, where they run eagerly."""
        if home is None or self.graphs is None or not self.graphs.cold_beats_eager(model, home):
            return None
        if time.monotonic() - self._pressed_at < PRESSURE_S:
            return lambda owner: True
        return self._guest

    def _guest(self, owner: str) -> bool:
        """Whether resident ``owner`` sits away from its home (where its graphs are)."""
        return self.resident[owner].region.offset != self._homes.get(owner)

    def _rehome(self, res: Residency) -> bool:
        """Evicts ``res`` when it is an idle guest whose home now holds only idle guests or
        nothing (the caller then swaps it in there): a cold-graph swap-in at home costs about
        its transfer time, the eager run it would get where it sits 2–5× its graph run for
        the CNNs (bench/README.md, node runs). Models at their own homes are never evicted for
        it, pressure or not: two resident models with overlapping homes would evict each
        other on every request. Returns whether it was evicted."""
        name = res.model.name
        home = self._homes.get(name)
        # cheapest first: this runs on every request that finds its model resident
        if self.graphs is None or home is None or res.region.offset == home or res.in_use or res.landing \
                or not self.graphs.cold_beats_eager(res.model, home):
            return False
        owners = self.arena.owners(home, res.model.nbytes)
        if owners is None:
            return False
        owners = [o for o in owners if o != name]
        if not all(self.resident[o].in_use == 0 and self._guest(o) for o in owners):
            return False
        if owners and self._eviction_cost(self)(owners) == float("inf"):
            return False
        self._evict(name)
        return True

    def _swap_in(self, model: HostModel, source: torch.Tensor | None, defer: bool) -> Residency:
        priced: list[Callable[[list[str]], float]] = []

        def cost(owners: list[str]) -> float:  # priced once, and only when models would be evicted
            if not priced:
                priced.append(self._eviction_cost(self))
            return priced[0](owners)
        if not self.fits_without_eviction(model.nbytes):
            self._pressed_at = time.monotonic()
        home = self._homes.get(model.name)
        home_first = self._home_first(model, home)
        offset, victims = self.arena.plan(
            model.nbytes, evictable=lambda o: self.resident[o].in_use == 0, cost=cost, home=home,
            sticky_home=self.graphs is not None, home_first=home_first)
        for victim in victims:
            self._evict(victim)
        region = self.arena.place(model.name, offset, model.nbytes)
        try:
            module, gates = self._bind(model, offset)
            deferred = defer and source is None and self.graphs is not None and self.graphs.has_cold(model, offset)
            if not deferred:
                dst = self.device.weights[offset:offset + model.nbytes]
                if source is None:
                    gates.swap = SwapIn(self.device, model.buffer, dst, self.group_bytes)
                else:
                    gates.swap = SwapIn(self.device, source, dst, max(self.group_bytes, PEER_GROUP_BYTES))
        except BaseException:
            self.arena.free(model.name)  # no region without a residency: planning looks owners up
            raise
        if home is None or self.graphs is None or not self.graphs.has_cold(model, home):
            self._homes[model.name] = offset  # a home is fixed once graphs are bound to it (arena.py)
        self.stats.swap_ins += 1
        self.stats.swap_in_bytes += model.nbytes
        if source is not None:
            self.stats.peer_swap_ins += 1
            self.stats.peer_swap_in_bytes += model.nbytes
        res = Residency(model, region, module, gates, in_use=1, deferred=deferred)
        self.resident[model.name] = res
        return res

    def _bind(self, model: HostModel, offset: int) -> tuple[nn.Module, Gates]:
        """The model's device-bound module at ``offset``. A skeleton kept from an earlier
        swap-in is re-pointed at the new offset (layout.Binding) rather than copied again from
        the template: the copy costs tens of ms of Python for a CNN, under this executor's
        lock; the model is resident nowhere else on this device, so nothing runs the
        skeleton meanwhile (graphs captured at the old offset do not use it)."""
        cached = self._bound.get(model.name)
        if cached is not None and cached.model is model:
            self._bound.move_to_end(model.name)
            if cached.offset != offset:
                try:
                    cached.binding.to(self.device.weights[offset:offset + model.nbytes])
                except BaseException:
                    del self._bound[model.name]  # half re-pointed: never reused
                    raise
                cached.offset = offset
            return cached.module, cached.gates
        module, binding = model.bound(self.device.weights[offset:offset + model.nbytes])
        gates = Gates(module, model.layout.first_use_end)
        self._bound[model.name] = _Bound(model, offset, module, gates, binding)
        while len(self._bound) > BOUND_CACHE:
            self._bound.popitem(last=False)
        return module, gates

    def _evict(self, name: str) -> None:
        swap = self.resident[name].gates.swap
        if self.healthy and swap is not None:
            try:
                if not swap.done():
                    # a prefetch still landing: a cold graph replayed into this region next
                    # copies on the graph's own streams, unordered with this copy stream
                    swap.events[-1].synchronize()
            except torch.AcceleratorError as exc:
                self._failed(exc)
        del self.resident[name]
        self.arena.free(name)
        self.stats.evictions += 1

    def _failed(self, exc: BaseException) -> None:
        """Marks the device unhealthy after a sticky device error (the node routes no more
        requests here; probes and /readyz report it)."""
        self.healthy = False
        self.fault = f"{type(exc).__name__}: {exc}"

    def pin(self, model: HostModel) -> Residency | None:
        """Marks ``model`` in use when this very version of it is resident and fully landed
        (a peer-copy source: an older version's bytes must never become a newer one's);
        returns its residency, to :meth:`release` later, or None."""
        with self._cond:
            res = self.resident.get(model.name)
            if res is None or res.landing or res.model is not model:
                return None
            res.in_use += 1
            return res

    def region_bytes(self, res: Residency) -> torch.Tensor:
        """The uint8 view of the arena holding ``res``'s weights."""
        return self.device.weights[res.region.offset:res.region.offset + res.model.nbytes]

    def release(self, res: Residency) -> None:
        """Ends one request's use of ``res``; waiting requests may now evict it."""
        with self._cond:
            res.in_use -= 1
            res.last_used = time.monotonic()
            self._cond.notify_all()

    def evict(self, name: str) -> bool:
        """Evicts ``name`` if resident and idle; returns whether it was evicted."""
        with self._cond:
            res = self.resident.get(name)
            if res is None or res.in_use:
                return False
            self._evict(name)
            self._cond.notify_all()
            return True

    def forget(self, name: str) -> None:
        """Drops every trace of ``name`` (unregistered): evicts it when idle, forgets its home."""
        self.evict(name)
        with self._cond:
            self._bound.pop(name, None)
            self._homes.pop(name, None)
            for key in [k for k in self._captures if k[0] == name]:
                self._drop_capture(key)
            if self.graphs:
                self.graphs.drop(name)

    def run(self, res: Residency, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], RunTimes]:
        """Runs the resident model on CPU ``inputs``; returns its outputs as CPU tensors
        (page-locked on CUDA devices: Device.to_host) and where the time went.

        Raises:
            DeviceFault: the device failed (the executor is then marked unhealthy).
            Exception: whatever the model raises for these inputs.
        """
        queued = time.perf_counter()
        with self._run_lock:
            started = time.perf_counter()
            outputs = None
            try:
                with torch.inference_mode(), self.device.computing():
                    device_outputs, graph = self._run(res, inputs)
                    outputs = self.device.to_host(device_outputs)
                    self.device.synchronize()
            except torch.AcceleratorError as exc:
                self._failed(exc)
                # Page-locked tensors from PyTorch's host allocator are never freed after a
                # sticky CUDA error: the allocator asks the stream for its capture status on
                # free, gets the error and throws from a destructor, which aborts the process
                # (seen on H200 when the fault surfaced in a graph replay's output copy); the
                # exception keeps the frames of a copy that failed half-way alive too
                self._fault_leftovers.append((outputs, exc))
                raise DeviceFault(f"device {self.device.index} failed: {self.fault}") from exc
            finally:
                if self.healthy:  # after a sticky error an event query raises too, hiding the fault
                    res.gates.settle()
            self.stats.runs += 1
        ended = time.perf_counter()
        return outputs, RunTimes((started - queued) * 1e3, (ended - started) * 1e3, graph)

    def _run(self, res: Residency, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        """Issues the run; returns its outputs on the device, not waited for, and whether a
        graph replayed it."""
        key = self.graphs.key(res.model, res.region.offset, inputs) if self.graphs else None
        pair = self.graphs.get(key) if key else None
        if res.deferred:
            res.deferred = False
            if pair is not None:
                self.stats.graph_runs += 1  # counted before the replay: a failed one counts too
                return self.graphs.replay(pair, inputs, cold=True), True
            res.gates.swap = SwapIn(self.device, res.model.buffer, self.region_bytes(res), self.group_bytes)
        elif pair is not None and pair.warm_beats_eager:
            if res.gates.swap is not None:  # a prefetch still landing: the stream waits for all of it
                res.gates.swap.wait_all()
            self.stats.graph_runs += 1
            return self.graphs.replay(pair, inputs, cold=False), True
        args = [t.to(self.device.torch_device, non_blocking=True) for t in inputs]
        outputs = flatten(res.module(*args))
        # graphs are captured at the model's home only: elsewhere it is a guest until evicted.
        # The run that swapped the model in counts as the warm-up run (note_eager before the
        # landing check), but the capture waits for a run with every byte landed (it replays
        # the copies itself)
        if key and res.region.offset == self._homes.get(res.model.name) and key not in self._captures \
                and self.graphs.note_eager(key) and res.gates.swap is None and not self._closed:
            with self._cond:
                self._captures[key] = _Capture(key, res.model, res.region.offset, res.module, res.gates, args)
                while len(self._captures) > MAX_CAPTURES:
                    self._drop_capture(next(iter(self._captures)))
                self._capture_wake.notify()
        return outputs, False

    def idle(self) -> None:
        """Tells the capture thread that no request is routed here any more (Node.done)."""
        with self._cond:
            if self._captures:
                self._capture_wake.notify()

    def _capture_loop(self) -> None:
        """The capture thread: one step at a time of the oldest queued capture whose model is
        at its home now, each while the device is idle (no request routed here) or, under
        load, once that capture has waited CAPTURE_PATIENCE_S and no step was forced on the
        device in the last CAPTURE_PATIENCE_S: one step per patience while requests wait, not
        a whole capture back to back (on 2×H200 a device queued requests 160–180 ms behind one
        while the other served). A step holds the run lock (no run meanwhile)
        and keeps its model in use (never evicted under it); a step that captures a graph
        takes the executor's lock too (GraphCache.capture's ``copy_lock``)."""
        while True:
            with self._cond:
                while not self._closed:
                    job = self._ready_capture() if self.healthy else None
                    if job is None:
                        # a queued capture's model may come home under sustained load, when
                        # no idle() follows: looked for again after the patience
                        self._capture_wake.wait(CAPTURE_PATIENCE_S if self._captures and self.healthy else None)
                        continue
                    waited = time.monotonic() - max(job.queued_at, self._forced_at)
                    if self.queued == 0 or waited >= CAPTURE_PATIENCE_S:
                        break
                    self._capture_wake.wait(CAPTURE_PATIENCE_S - waited)
                if self._closed:
                    return
            with self._run_lock:
                with self._cond:
                    job = self._ready_capture() if self.healthy else None
                    res = self._start_step(job) if job is not None else None
                if job is not None:
                    self._step(job, res)

    def _ready_capture(self) -> _Capture | None:
        """The oldest queued capture whose model sits landed at the capture's offset now
        (``_cond`` held). A capture whose model was evicted keeps the steps it took and waits
        for the model to come home (at high load a model's stay there can be shorter than
        its capture); one that finds a new version or a new bound module there is dropped."""
        for job in list(self._captures.values()):
            res = self._at_capture_offset(job)
            if res is None:
                continue
            if not self._same_binding(job, res):
                self._drop_capture(job.key)
                continue
            return job
        return None

    @staticmethod
    def _same_binding(job: _Capture, res: Residency) -> bool:
        return res.model is job.model and res.module is job.module and res.gates is job.gates

    def _at_capture_offset(self, job: _Capture) -> Residency | None:
        """``job``'s model's residency if it sits landed at the capture's offset (``_cond`` held)."""
        res = self.resident.get(job.model.name)
        return None if res is None or res.region.offset != job.offset or res.landing else res

    def _captures_ready(self) -> int:
        """Queued captures the capture thread would take now (``_cond`` held): none on an
        unhealthy device, whose event queries raise."""
        if not self.healthy:
            return 0
        ready = 0
        for job in self._captures.values():
            res = self._at_capture_offset(job)
            ready += res is not None and self._same_binding(job, res)
        return ready

    def _start_step(self, job: _Capture) -> Residency:
        """Pins ``job``'s model for one step (``_cond`` held) and returns its residency."""
        res = self.resident[job.model.name]
        res.gates.settle()  # landed: its events must not be waited on inside a capture
        res.in_use += 1
        if job.steps is None:
            job.steps = self.graphs.capture(job.key, job.module, job.gates, job.model, job.offset, job.inputs,
                                            copy_lock=self._cond)
        self._stepping = job
        return res

    def _step(self, job: _Capture, res: Residency) -> None:
        """Runs one step of ``job`` (run lock held) and ends it: the pair enters the graph
        cache after the last step, unless the job was dropped meanwhile (forget)."""
        done, pair, fault = False, None, None
        try:
            with torch.inference_mode(), self.device.computing():
                next(job.steps)
        except StopIteration as stop:
            done, pair = True, stop.value
        except torch.AcceleratorError as exc:
            fault = exc
        except Exception:  # the thread outlives one bad capture
            log.exception("capture of %s on device %d failed", job.model.name, self.device.index)
            done = True
        with self._cond:
            self._stepping = None
            res.in_use -= 1
            if self.queued:  # requests waited behind this step, even one begun while idle
                self._forced_at = time.monotonic()
            queued = self._captures.get(job.key) is job
            if fault is not None:
                self._failed(fault)
                self._fault_leftovers.append((job, fault))  # nothing it holds may be freed now (run)
                self._captures.pop(job.key, None)
            elif done and queued:
                if pair is not None:
                    self.graphs.add(job.key, pair)
                self._drop_capture(job.key)
            elif not queued:
                job.steps.close()  # dropped during the step
            self._cond.notify_all()

    def _drop_capture(self, key: Key) -> None:
        job = self._captures.pop(key)
        if job.steps is not None and job is not self._stepping:  # a running generator cannot be closed
            job.steps.close()
        self._cond.notify_all()

    def wait_for_captures(self, timeout_s: float) -> bool:
        """Blocks until no graph capture is queued (benchmarks and tests); returns whether
        none is."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._captures and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return not self._captures

    def close(self) -> None:
        """Stops the capture thread (a step under way finishes first) and queues no more."""
        with self._cond:
            self._closed = True
            for key in list(self._captures):
                self._drop_capture(key)
            self._capture_wake.notify()
        if self._capturer is not None:
            self._capturer.join(timeout=10.0)

    def snapshot(self) -> dict:
        """Device state for stats, Redis and scheduling (JSON-serialisable)."""
        with self._cond:
            return {
                "device": self.device.index, "name": self.device.name, "kind": self.device.torch_device.type,
                "healthy": self.healthy, "fault": self.fault,
                "arena_bytes": self.arena.capacity, "used_bytes": self.arena.used, "queue": self.queued,
                "resident": {n: {"bytes": r.model.nbytes, "in_use": r.in_use, "offset": r.region.offset}
                             for n, r in self.resident.items()},
                "swap_ins": self.stats.swap_ins, "swap_in_bytes": self.stats.swap_in_bytes,
                "peer_swap_ins": self.stats.peer_swap_ins, "peer_swap_in_bytes": self.stats.peer_swap_in_bytes,
                "evictions": self.stats.evictions, "runs": self.stats.runs, "graph_runs": self.stats.graph_runs,
                "captures_queued": len(self._captures),
                "captures_ready": self._captures_ready(),
                **(self.graphs.stats() if self.graphs else {}),
            }
