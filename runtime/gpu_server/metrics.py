"""Prometheus metrics of one GPU server (served on ``/metrics`` by runtime/gpu_server/health.py).

Two kinds of series (names and meanings in docs/observability.md):

* *per request*, recorded by the server as each request ends: ``torpor_gpu_requests_total``
  by op and status, and for inference the server time, the wait before the run and the run
  itself (histograms by model, device and swap-in path);
* *per device*, read from :meth:`Executor.snapshot` of every executor at scrape time by
  :class:`ExecutorCollector` (swap-ins, bytes moved, evictions, runs, resident models, arena
  use, queue, health), plus GPU memory and utilisation from NVML on CUDA devices
  (:class:`NvmlCollector`);
* *per link*, the swap-ins in flight on each host link (:func:`link_load`, also published
  to Redis by the server for ``torpor status``).

Each :class:`ServerMetrics` has a registry of its own, so that several servers can live in
one process (the tests) without their series clashing.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import pynvml
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.gpu_server.placement import DeviceState
from runtime.gpu_server.topology import bus_id

log = logging.getLogger(__name__)

# Seconds: warm runs of small models take a few ms, swap-ins of large ones up to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def link_load(states: Sequence[DeviceState]) -> list[dict]:
    """The swap-ins in flight of each device and of its host link, from the node's policy
    views (``Node.states()``): a model counts while its weights are still arriving
    (``ResidentModel.loading``). Copies from a peer over NVLink count on the receiving
    device's host link, as the node's own device choice counts them.

    Returns:
        One dict per state, in order: ``device``, ``link`` (host link id),
        ``transfers_in_flight`` and ``bytes_in_flight`` (swap-ins landing on the device, the
        bytes of their models), ``link_transfers_in_flight`` and ``link_bytes_in_flight``
        (the same summed over the devices sharing the link).
    """
    own = []
    for s in states:
        loading = [m.bytes for m in s.resident.values() if m.loading]
        own.append({"device": s.index, "link": s.link_id, "transfers_in_flight": len(loading),
                    "bytes_in_flight": sum(loading)})
    links: dict[str, tuple[int, int]] = {}
    for d in own:
        n, nbytes = links.get(d["link"], (0, 0))
        links[d["link"]] = (n + d["transfers_in_flight"], nbytes + d["bytes_in_flight"])
    return [{**d, "link_transfers_in_flight": links[d["link"]][0], "link_bytes_in_flight": links[d["link"]][1]}
            for d in own]


class LinkCollector(Collector):
    """Per host link: swap-ins in flight and their bytes (:func:`link_load`), at each scrape.

    Args:
        node: the GPU server's node (its ``states()`` are read).
    """

    def __init__(self, node):
        self.node = node

    def collect(self) -> Iterator:
        transfers = GaugeMetricFamily("torpor_gpu_link_transfers_in_flight",
                                      "Swap-ins whose weights are still arriving over the host link",
                                      labels=["link"])
        nbytes = GaugeMetricFamily("torpor_gpu_link_bytes_in_flight",
                                   "Bytes of the models whose swap-ins are in flight on the host link",
                                   labels=["link"])
        seen = set()
        for d in link_load(self.node.states()):
            if d["link"] not in seen:
                seen.add(d["link"])
                transfers.add_metric([d["link"]], d["link_transfers_in_flight"])
                nbytes.add_metric([d["link"]], d["link_bytes_in_flight"])
        yield transfers
        yield nbytes


class ExecutorCollector(Collector):
    """Per-device series read from ``node.executors`` at each scrape.

    Args:
        node: anything with an ``executors`` list whose items have ``snapshot()`` (the GPU
            server's :class:`runtime.gpu_server.node.Node`).
    """

    def __init__(self, node):
        self.node = node

    def collect(self) -> Iterator:
        snaps = [ex.snapshot() for ex in self.node.executors]
        info = GaugeMetricFamily("torpor_gpu_device_info", "Device of the GPU server (value 1)",
                                 labels=["device", "name", "kind"])
        healthy = GaugeMetricFamily("torpor_gpu_device_healthy", "1 while the device is healthy, 0 after a fault",
                                    labels=["device"])
        by_path = {key: CounterMetricFamily(name, text, labels=["device", "path"]) for key, name, text in (
            ("swap_ins", "torpor_gpu_swap_ins",
             "Models swapped in (prefetches included), by path: pcie (host copy) or nvlink (peer copy)"),
            ("swap_in_bytes", "torpor_gpu_swap_in_bytes", "Bytes of weights copied onto the device by swap-ins, by path"),
        )}
        counters = {key: CounterMetricFamily(name, text, labels=["device"]) for key, name, text in (
            ("evictions", "torpor_gpu_evictions", "Models evicted from the device's weight arena"),
            ("runs", "torpor_gpu_runs", "Model runs (inferences) on the device"),
            ("graph_runs", "torpor_gpu_graph_runs", "Model runs replayed from a CUDA graph (warm or cold)"),
            ("graph_captures", "torpor_gpu_graph_captures", "CUDA graph pairs (warm + cold) captured"),
            ("graph_capture_seconds", "torpor_gpu_graph_capture_seconds",
             "Time the device spent capturing CUDA graphs (its executor is held meanwhile)"),
        )}
        gauges = {key: GaugeMetricFamily(name, text, labels=["device"]) for key, name, text in (
            ("arena_bytes", "torpor_gpu_arena_bytes", "Size of the device's weight arena"),
            ("used_bytes", "torpor_gpu_arena_used_bytes", "Bytes of the weight arena held by resident models"),
            ("queue", "torpor_gpu_queued_requests", "Requests routed to the device and not finished"),
            ("captures_queued", "torpor_gpu_graph_captures_queued",
             "CUDA graph captures waiting for the device to be idle or for their model to be at its home"),
            ("captures_ready", "torpor_gpu_graph_captures_ready",
             "Queued CUDA graph captures the capture thread can take now (their model at its home, the device healthy)"),
        )}
        resident = GaugeMetricFamily("torpor_gpu_resident_models", "Models resident on the device", labels=["device"])
        model_bytes = GaugeMetricFamily("torpor_gpu_resident_model_bytes", "Arena bytes of one resident model",
                                        labels=["device", "model"])
        for s in snaps:
            device = str(s["device"])
            info.add_metric([device, s["name"], s["kind"]], 1)
            healthy.add_metric([device], 1 if s["healthy"] else 0)
            for key, family in by_path.items():
                family.add_metric([device, "pcie"], s[key] - s[f"peer_{key}"])
                family.add_metric([device, "nvlink"], s[f"peer_{key}"])
            for key, family in counters.items():
                family.add_metric([device], s.get(key, 0))  # CPU devices have no graphs
            for key, family in gauges.items():
                family.add_metric([device], s[key])
            resident.add_metric([device], len(s["resident"]))
            for model, r in sorted(s["resident"].items()):
                model_bytes.add_metric([device, model], r["bytes"])
        yield info
        yield healthy
        yield from by_path.values()
        yield from counters.values()
        yield from gauges.values()
        yield resident
        yield model_bytes


class NvmlCollector(Collector):
    """GPU memory and utilisation from NVML for the node's CUDA devices (nothing on CPU
    devices or without an NVIDIA driver). Devices are matched to NVML by PCI bus id, so the
    ``device`` label is the GPU server's index even under ``CUDA_VISIBLE_DEVICES``.

    Args:
        node: the GPU server's node (its executors' devices are read once, here).
    """

    def __init__(self, node):
        self._handles: list[tuple[str, object]] = []
        cuda = [ex.device for ex in node.executors if ex.device.is_cuda]
        if not cuda:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.warning("NVML unavailable, no GPU memory/utilisation metrics: %s", exc)
            return
        for d in cuda:
            p = torch.cuda.get_device_properties(d.torch_device)
            try:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id(p.pci_domain_id, p.pci_bus_id, p.pci_device_id))
            except pynvml.NVMLError as exc:
                log.warning("no NVML handle for device %d: %s", d.index, exc)
                continue
            self._handles.append((str(d.index), handle))

    def collect(self) -> Iterator:
        if not self._handles:
            return
        used = GaugeMetricFamily("torpor_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML)",
                                 labels=["device"])
        total = GaugeMetricFamily("torpor_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["device"])
        util = GaugeMetricFamily("torpor_gpu_utilization_ratio",
                                 "Share of the last sample period in which a kernel ran (NVML, 0-1)", labels=["device"])
        for device, handle in self._handles:
            try:
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            except pynvml.NVMLError as exc:  # a GPU that fell off the bus must not break the scrape
                log.warning("NVML query of device %s failed: %s", device, exc)
                continue
            used.add_metric([device], mem.used)
            total.add_metric([device], mem.total)
            util.add_metric([device], rates.gpu / 100.0)
        yield used
        yield total
        yield util


class ServerMetrics:
    """The GPU server's registry: per-request series plus the device collectors.

    Args:
        node: the GPU server's node (read at scrape time).
    """

    def __init__(self, node):
        self.registry = CollectorRegistry()
        self.requests = Counter("torpor_gpu_requests", "Protocol requests answered, by op and HTTP-like status",
                                ["op", "status"], registry=self.registry)
        labels = ["model", "device", "path"]
        self.request_seconds = Histogram(
            "torpor_gpu_request_duration_seconds",
            "Server time of successful inferences: wait, swap-in and run (path: resident, pcie, nvlink)",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.wait_seconds = Histogram(
            "torpor_gpu_request_wait_seconds",
            "Time of successful inferences outside their run: device choice, queue, room, swap-in issue, a capture step",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prefetches = Counter("torpor_gpu_prefetches",
                                  "Prefetches answered, by device and path: resident (nothing to copy), pcie, nvlink",
                                  ["device", "path"], registry=self.registry)
        self.run_seconds = Histogram(
            "torpor_gpu_execution_duration_seconds",
            "Run time of successful inferences, waits for weights still being copied included",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        # labelled children by metrics and label values (_children): labels() validates and
        # locks on every call, and a request's metrics are on the path of its reply
        self._children_of: dict[tuple, tuple] = {}
        self.registry.register(ExecutorCollector(node))
        self.registry.register(LinkCollector(node))
        self.registry.register(NvmlCollector(node))

    def _children(self, metrics: tuple, *values: str) -> tuple:
        """The children of ``metrics`` for label ``values``, made once."""
        key = (metrics, values)
        children = self._children_of.get(key)
        if children is None:
            children = self._children_of[key] = tuple(m.labels(*values) for m in metrics)
        return children

    def request_done(self, op: str, status: int) -> None:
        """Counts one answered request (``status`` 200 for success)."""
        self._children((self.requests,), op, str(status))[0].inc()

    def prefetch_done(self, info: dict) -> None:
        """Counts one successful prefetch; ``info`` is what ``Node.prefetch`` returned
        (``device``, ``path``)."""
        self._children((self.prefetches,), str(info["device"]), info["path"])[0].inc()

    def inference_done(self, model: str, info: dict, server_s: float) -> None:
        """Records one successful inference.

        Args:
            model: the model's name.
            info: what ``Node.infer`` returned besides the outputs (``device``, ``path``,
                ``run_ms``).
            server_s: seconds from the start of placement to the end of the run.
        """
        request, run, wait = self._children((self.request_seconds, self.run_seconds, self.wait_seconds),
                                            model, str(info["device"]), info["path"])
        run_s = info["run_ms"] / 1e3
        request.observe(server_s)
        run.observe(run_s)
        wait.observe(max(0.0, server_s - run_s))
