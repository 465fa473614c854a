"""CUDA graphs of resident models, one pair per (model, arena offset, input signature):

- the *warm* graph replays the model's kernels;
- the *cold* graph replays the whole cold path — the group copies from pinned host memory
  on the copy stream, an event per group, and the kernels that wait on those events —
  so a model that is not resident answers with no Python in the loop (Torpor's cold path
  reaches the transfer bound only this way; DESIGN.md §3).

Graphs bake in addresses: the weights' (the model's region in the arena, hence the offset in
the key; on CUDA devices the arena sends each model back to its sticky home, arena.py), the
host buffer's (pinned, never moved) and the static input/output tensors'. A graph is
captured after the second eager run of a signature at the model's home — the first may be
the run that swapped it in — once its weights have all landed (the first run warms up cuDNN
and the allocator; elsewhere the model is a guest until evicted), off the request path and
in steps (executor.py), and replayed from then on; a model whose forward cannot be captured
(a host sync, data-dependent shapes) stays eager. Captures are thread-local (other devices'
executors keep running) and each step that captures a graph holds the executor's lock, so
that no swap-in issues copies on the copy stream while it is forked into a capture.
All graphs of one device share one memory pool for activations: they are replayed one at a
time (the executor's run lock), and each keeps its outputs alive, so no graph's outputs are
overwritten by another's replay.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Generator, Iterator

import torch

from runtime.gpu_server.device import Device
from runtime.gpu_server.swap import SwapIn

log = logging.getLogger("torpor.gpu_server.graphs")

Key = tuple
# copy group sizes tried for each cold graph, bytes; the model's size means one bulk copy
GROUP_CANDIDATES = (2 << 20, 8 << 20, 32 << 20, 1 << 62)
TIMED_RUNS = 3  # runs timed for each median taken at capture, after one untimed


@dataclass
class GraphPair:
    """Captured graphs of one key and their static tensors."""

    inputs: list[torch.Tensor]
    warm: torch.cuda.CUDAGraph
    warm_outputs: list[torch.Tensor]
    cold: torch.cuda.CUDAGraph
    cold_outputs: list[torch.Tensor]
    capture_ms: float
    pool_bytes: int
    group_bytes: int
    cold_ms: dict[int, float]
    eager_ms: float  # median eager run on the static inputs, timed at capture
    warm_ms: float  # median replay of the warm graph, timed at capture
    host: torch.Tensor  # the host buffer its cold graph copies from: unmapped under a replay, a device fault

    @property
    def warm_beats_eager(self) -> bool:
        """Whether warm runs should replay the graph: a model whose kernels are long enough
        to hide Python's launches gains nothing from a graph and may lose (BERT-large on H200:
        13.86 ms as a graph, 13.63 ms eager; bench/results/nvidia-h200x1-warm-gap.json)."""
        return self.warm_ms <= self.eager_ms


class GraphCache:
    """The graphs of one CUDA device, least recently used dropped beyond ``capacity``.

    Args:
        device: the CUDA device.
        capacity: graph pairs kept.
    """

    def __init__(self, device: Device, capacity: int = 256):
        self.device = device
        self.capacity = capacity
        self.pool = torch.cuda.graph_pool_handle()
        self.pairs: OrderedDict[Key, GraphPair] = OrderedDict()
        self.seen: Counter[Key] = Counter()
        self.uncapturable: set[Key] = set()
        # profile (:meth:`profile`) → the copy group size measured fastest for it and the
        # timings: a model captured again (its pair dropped from this cache, at the same home
        # or at a new one), or another model of the same architecture, takes it without
        # measuring again — a property of the kernels, the bytes and the link, not of the
        # offset or the weights' values
        self.chosen: dict[tuple, tuple[int, dict[int, float]]] = {}
        self.captures = 0  # successful captures since start (a pair each)
        self.capture_s = 0.0  # device time they took, s

    @staticmethod
    def key(model, offset: int, inputs: list[torch.Tensor]) -> Key:
        """(model identity, arena offset, input shapes and dtypes)."""
        return (model.name, id(model), offset, tuple((tuple(t.shape), t.dtype) for t in inputs))

    @staticmethod
    def profile(model, key: Key) -> tuple:
        """What a cold graph's best copy group size depends on: for a model built from an
        architecture, ("architecture", architecture, its config, total bytes, input
        signature) — the same kernels and the same copies, whatever the weights (functions
        fine-tuned from one base model); for a ``torch.export`` program, whose graph is its
        own whatever architecture it declares, ("model", name, identity, input signature)."""
        spec = model.spec
        if spec.architecture and spec.format != "export":
            return ("architecture", spec.architecture, json.dumps(spec.config, sort_keys=True, default=str),
                    model.nbytes, key[3])
        return ("model", key[0], key[1], key[3])

    def get(self, key: Key) -> GraphPair | None:
        pair = self.pairs.get(key)
        if pair is not None:
            self.pairs.move_to_end(key)
        return pair

    def has_cold(self, model, offset: int) -> bool:
        """Whether some input signature of ``model`` at ``offset`` has a cold graph."""
        return any(k[1] == id(model) and k[2] == offset for k in list(self.pairs))

    def cold_beats_eager(self, model, offset: int) -> bool:
        """Whether some cold graph of ``model`` at ``offset`` (its copies and kernels) replayed
        faster than the model's eager run, both timed at capture: then a swap-in back to
        ``offset`` beats running resident elsewhere, eagerly (arena.py, ``home_first``)."""
        return any(k[1] == id(model) and k[2] == offset and p.cold_ms[p.group_bytes] <= p.eager_ms
                   for k, p in list(self.pairs.items()))

    def cold_for(self, model, offset: int, inputs: list[torch.Tensor]) -> GraphPair | None:
        return self.get(self.key(model, offset, inputs))

    def replay(self, pair: GraphPair, inputs: list[torch.Tensor], cold: bool) -> list[torch.Tensor]:
        """Copies CPU ``inputs`` into the static inputs and replays; returns the static
        outputs on the device (issued on the current stream, nothing waits for them)."""
        for static, x in zip(pair.inputs, inputs):
            static.copy_(x, non_blocking=True)
        (pair.cold if cold else pair.warm).replay()
        return pair.cold_outputs if cold else pair.warm_outputs

    def note_eager(self, key: Key) -> bool:
        """Counts one eager run of ``key``; True when it is time to capture it."""
        if key in self.uncapturable or key in self.pairs:
            return False
        self.seen[key] += 1
        return self.seen[key] >= 2

    def capture(self, key: Key, module, gates, model, offset: int, static: list[torch.Tensor], copy_lock,
                group_sizes: tuple[int, ...] = GROUP_CANDIDATES) -> Generator[None, None, GraphPair | None]:
        """Captures the graphs of ``key`` in steps: a generator whose every ``next()`` does
        one step on the device and yields (the executor's capture thread runs one step at a
        time while the device is idle; the model must be resident, landed and at ``offset``
        at every step — replaying a cold graph rewrites the same bytes). Each step is one
        eager run or replay, or one capture: the eager run timed, the warm graph captured and
        timed, then one cold graph per copy group size in ``group_sizes`` (a size >= the
        model's bytes is one bulk copy) captured and timed. The fastest cold graph is kept:
        the group size — pipelined or bulk — is chosen per :meth:`profile` (architecture or
        model), device and input shape from measurement, once: a later capture of the same
        profile (this model after this cache dropped its pair, or another model of its
        architecture) takes the chosen size and captures one cold graph, untimed. The
        eager run and the graphs are timed alike (medians of a few runs on the
        device-resident ``static`` inputs), for :attr:`GraphPair.warm_beats_eager` and
        :meth:`cold_beats_eager`. The generator returns the pair (for :meth:`add`), or None
        when the forward cannot be captured (a host sync, dynamic shapes: the key stays eager
        for good, logged); closing it early discards the steps taken.

        Args:
            key: the key (:meth:`key`) of ``model`` at ``offset`` with these inputs.
            module, gates: the model's device-bound module at ``offset`` and its swap gates.
            static: the inputs on the device, kept as the graphs' static inputs.
            copy_lock: held while a graph is captured: no swap-in may put copies on the copy
                stream while a capture forks it.

        Raises:
            torch.AcceleratorError: the device failed (a sticky CUDA error).
        """
        dev = self.device
        spent = grown = 0.0

        def step(issue):
            nonlocal spent, grown
            started, before = time.perf_counter(), torch.cuda.memory_reserved(dev.torch_device)
            out = issue()
            took = time.perf_counter() - started
            spent += took
            self.capture_s += took  # abandoned captures held the device too
            # capturing empties the allocator's cache first, so only growth is the graphs'
            grown += max(0, torch.cuda.memory_reserved(dev.torch_device) - before)
            return out

        def timed(issue) -> Iterator[None]:  # one run per step; the median lands in times[-1]
            samples = []
            for _ in range(TIMED_RUNS + 1):
                samples.append(step(lambda: _time_ms(issue, dev)))
                yield
            samples = sorted(samples[1:])  # the first pays for this thread's cuBLAS handles, a graph's upload
            times.append(samples[len(samples) // 2])

        profile = self.profile(model, key)
        known = self.chosen.get(profile)
        sizes = [known[0]] if known else sorted({min(g, model.nbytes) for g in group_sizes})
        cold_ms = dict(known[1]) if known else {}
        times: list[float] = []
        best = None
        try:
            yield from timed(lambda: module(*static))
            eager_ms = times[-1]
            warm = torch.cuda.CUDAGraph()

            def capture_warm():
                with torch.cuda.graph(warm, pool=self.pool, stream=dev.compute_stream,
                                      capture_error_mode="thread_local"):
                    return flatten(module(*static))
            with copy_lock:
                warm_out = step(capture_warm)
            yield
            yield from timed(warm.replay)
            warm_ms = times[-1]
            for size in sizes:
                with copy_lock:
                    cold, cold_out = step(lambda: self._capture_cold(module, gates, model, offset, static, size))
                yield
                if not known:
                    yield from timed(cold.replay)
                    cold_ms[size] = times[-1]
                if best is None or cold_ms[size] < cold_ms[best[0]]:
                    best = (size, cold, cold_out)
        except torch.AcceleratorError:
            raise
        except Exception as exc:  # capture refuses host syncs, dynamic shapes...: this key stays eager
            log.info("model %s cannot be captured for %s: %s", model.name, key[3], exc)
            self.uncapturable.add(key)
            return None
        size, cold, cold_out = best
        self.chosen[profile] = (size, cold_ms)
        return GraphPair(static, warm, warm_out, cold, cold_out, spent * 1e3, int(grown), size, cold_ms, eager_ms,
                         warm_ms, model.buffer)

    def add(self, key: Key, pair: GraphPair) -> None:
        """Keeps a captured pair (:meth:`capture`), dropping the least recently used beyond
        the capacity."""
        self.captures += 1
        self.pairs[key] = pair
        while len(self.pairs) > self.capacity:
            self.pairs.popitem(last=False)

    def _capture_cold(self, module, gates, model, offset: int, static: list[torch.Tensor], group_bytes: int):
        dev = self.device
        cold = torch.cuda.CUDAGraph()
        dst = dev.weights[offset:offset + model.nbytes]
        with torch.cuda.graph(cold, pool=self.pool, stream=dev.compute_stream, capture_error_mode="thread_local"):
            dev.copy_stream.wait_stream(dev.compute_stream)  # fork the copy stream into the capture
            gates.swap = SwapIn(dev, model.buffer, dst, group_bytes, captured=True)
            try:
                cold_out = flatten(module(*static))
            finally:
                gates.swap = None
            dev.compute_stream.wait_stream(dev.copy_stream)  # join it back
        return cold, cold_out

    def drop(self, name: str) -> None:
        """Forgets every graph of model ``name`` (unregistered or re-registered), and what was
        counted or learnt about it (group sizes learnt for its architecture stay: they hold
        for every model of that architecture)."""
        for key in [k for k in list(self.pairs) if k[0] == name]:
            del self.pairs[key]
        for key in [k for k in self.chosen if k[:2] == ("model", name)]:
            del self.chosen[key]
        for key in [k for k in self.seen if k[0] == name]:
            del self.seen[key]
        self.uncapturable = {k for k in self.uncapturable if k[0] != name}

    def stats(self) -> dict:
        """Graph count, capture time of the graphs kept (ms), pool growth attributed to
        captures (bytes), and the captures since start with the device time of every capture
        step, finished or abandoned (s). Reads a snapshot of the pairs: :meth:`get` reorders
        them under the executor's run lock while this runs under its other lock."""
        pairs = list(self.pairs.items())
        return {"graphs": 2 * len(pairs), "capture_ms": sum(p.capture_ms for _, p in pairs),
                "graph_captures": self.captures, "graph_capture_seconds": self.capture_s,
                "group_bytes": {k[0]: p.group_bytes for k, p in pairs},
                "pool_bytes": sum(p.pool_bytes for _, p in pairs)}


def _time_ms(issue, dev: Device) -> float:
    """Wall time of ``issue()`` (a graph replay, an eager run) on the compute stream, ms."""
    dev.compute_stream.synchronize()
    started = time.perf_counter()
    issue()
    dev.compute_stream.synchronize()
    return (time.perf_counter() - started) * 1e3


def flatten(out) -> list[torch.Tensor]:
    """A model's output (tensor, or nested tuple/list of tensors) as a flat list."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    raise TypeError(f"model returned {type(out).__name__}, expected tensors")
