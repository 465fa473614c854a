"""Latency prediction shared by the GPU server (device choice) and the controller (node choice).

A request's completion on a candidate device is predicted as

    queue wait + service, service = exec                                  (model resident)
                          service = max(transfer, exec) + tail * exec    (copied in first)

because Torpor's pipelined swap runs each layer group as soon as its weights land: a cold
run ends a little after its last byte arrives (DESIGN.md §3: a cold ResNet-152 answers in
4.52 ms against a 4.37 ms transfer bound and 2.6 ms warm; ResNet-50 1.93 vs 1.86 and 0.91).
``tail`` = 0.08 reproduces both within 2%.

Transfers share a link fairly: ``n`` transfers on one link each get ``1/n`` of its bandwidth.
Default bandwidths are the H200 measurements of DESIGN.md §3: pinned host→GPU 55 GB/s over
PCIe, GPU→GPU 387 GB/s over NVLink.

Execution times are learned online per (model, device kind) as an exponentially weighted
moving average, seeded from the bench results (``bench/results/*-swap.json``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from runtime.gpu_server.placement import Decision, DeviceState, Policy, choose_device

PCIE_BYTES_PER_S = 55e9  # pinned host→GPU, H200 (DESIGN.md §3)
NVLINK_BYTES_PER_S = 387e9  # GPU→GPU, H200 (DESIGN.md §3)
PIPELINE_TAIL = 0.08  # share of exec time left after the last copy group lands (fit above)
ANY_KIND = "*"


@dataclass
class LinkModel:
    """Bandwidth of each link kind, with fair sharing among concurrent transfers.

    Attributes:
        pcie_bytes_per_s: host→device bandwidth of one host link, bytes/s.
        nvlink_bytes_per_s: device→device bandwidth over NVLink, bytes/s.
    """

    pcie_bytes_per_s: float = PCIE_BYTES_PER_S
    nvlink_bytes_per_s: float = NVLINK_BYTES_PER_S

    def bandwidth(self, kind: str) -> float:
        """Bytes/s of link ``kind`` (``pcie`` or ``nvlink``).

        Raises:
            ValueError: unknown kind.
        """
        if kind == "pcie":
            return self.pcie_bytes_per_s
        if kind == "nvlink":
            return self.nvlink_bytes_per_s
        raise ValueError(f"unknown link kind {kind!r}: expected 'pcie' or 'nvlink'")

    def transfer_ms(self, nbytes: float, kind: str = "pcie", in_flight: int = 0) -> float:
        """Time to move ``nbytes`` over a link already carrying ``in_flight`` transfers, ms.

        The new transfer gets ``1/(in_flight + 1)`` of the bandwidth, assuming the others
        last at least as long (an upper bound when they finish earlier).
        """
        return nbytes * (in_flight + 1) / self.bandwidth(kind) * 1000.0

    def inflicted_ms(self, nbytes: float, kind: str, others: int | Sequence[float]) -> float:
        """Delay a new transfer of ``nbytes`` adds to the transfers already on the link, summed, ms.

        Under fair sharing a transfer with ``r`` bytes left is slowed by ``min(nbytes, r)``
        bytes' worth of link time. ``others`` is either their remaining bytes or, when only
        their number is known, a count (each then assumed to outlast the new one).
        """
        bw = self.bandwidth(kind)
        if isinstance(others, int):
            return others * nbytes / bw * 1000.0
        return sum(min(nbytes, r) for r in others) / bw * 1000.0


@dataclass
class Profile:
    """What one model costs on one device kind.

    Attributes:
        bytes: weight bytes.
        exec_ms: current estimate of a resident run, ms.
        samples: runs observed so far.
    """

    bytes: int
    exec_ms: float
    samples: int = 0


@dataclass
class Prediction:
    """A predicted request completion on one device, all in ms."""

    total_ms: float
    queue_ms: float
    transfer_ms: float
    exec_ms: float


@dataclass
class Predictor:
    """Predicts request latency from link bandwidths and per-model execution profiles.

    Attributes:
        links: link bandwidths.
        alpha: weight of a new observation in the moving average of execution times.
        default_exec_ms: execution estimate of a model never profiled, ms.
        pipeline_tail: see the module docstring.
    """

    links: LinkModel = field(default_factory=LinkModel)
    alpha: float = 0.2
    default_exec_ms: float = 10.0
    pipeline_tail: float = PIPELINE_TAIL
    profiles: dict[tuple[str, str], Profile] = field(default_factory=dict)

    def set_profile(self, model: str, nbytes: int, exec_ms: float, kind: str = ANY_KIND) -> Profile:
        """Seeds (or resets) the profile of ``model`` on device ``kind`` (``*``: any kind)."""
        profile = Profile(int(nbytes), float(exec_ms))
        self.profiles[(model, kind)] = profile
        return profile

    def profile(self, model: str, kind: str = ANY_KIND) -> Profile | None:
        """The profile of ``model`` on ``kind``, else its kind-independent one, else ``None``."""
        return self.profiles.get((model, kind)) or self.profiles.get((model, ANY_KIND))

    def exec_ms(self, model: str, kind: str = ANY_KIND) -> float:
        """Estimated resident execution time of ``model`` on ``kind``, ms."""
        p = self.profile(model, kind)
        return p.exec_ms if p is not None else self.default_exec_ms

    def observe(self, model: str, kind: str, exec_ms: float) -> None:
        """Folds one measured execution time (ms) into the profile of (model, kind)."""
        p = self.profiles.get((model, kind))
        if p is None:
            seed = self.profile(model, kind)
            p = self.set_profile(model, seed.bytes if seed else 0, seed.exec_ms if seed else exec_ms, kind)
        p.exec_ms += self.alpha * (exec_ms - p.exec_ms)
        p.samples += 1

    def load_bench(self, path: str | Path, kind: str = ANY_KIND) -> list[str]:
        """Seeds profiles from a swap bench result: ``{"models": {NAME: {"bytes", "served_warm_ms", ...}}}``.

        Returns:
            The model names loaded.

        Raises:
            OSError: unreadable file. ValueError: not that shape.
        """
        models = read_bench(path)
        for name, (nbytes, exec_ms) in models.items():
            self.set_profile(name, nbytes, exec_ms, kind)
        return list(models)

    def service_ms(self, exec_ms: float, transfer_ms: float) -> float:
        """Device time of one request whose model first takes ``transfer_ms`` to arrive, ms."""
        if transfer_ms <= 0:
            return exec_ms
        return max(transfer_ms, exec_ms) + self.pipeline_tail * exec_ms

    def predict(self, model: str, device: DeviceState, path: str = "auto", in_flight: int = 0,
                cold_start_ms: float | None = None) -> Prediction:
        """Predicted completion of one request for ``model`` on ``device``.

        Args:
            model: model name.
            device: the device view (``queue_ms`` is the wait before it can start).
            path: ``resident``, ``pcie``, ``nvlink``, ``cold`` (container start of
                ``cold_start_ms``, which runs while the device serves others), or ``auto``
                (resident when ready there, else ``pcie``).
            in_flight: transfers already on the link the copy would use.
            cold_start_ms: container start time for path ``cold``.

        Raises:
            ValueError: unknown path, or ``cold`` without ``cold_start_ms``.
        """
        exec_ms = self.exec_ms(model, device.kind)
        if path == "auto":
            path = "resident" if device.ready(model) else "pcie"
        if path == "resident":
            return Prediction(device.queue_ms + exec_ms, device.queue_ms, 0.0, exec_ms)
        if path == "cold":
            if cold_start_ms is None:
                raise ValueError("path 'cold' needs cold_start_ms")
            start = max(cold_start_ms, device.queue_ms)
            return Prediction(start + exec_ms, device.queue_ms, cold_start_ms, exec_ms)
        p = self.profile(model, device.kind)
        transfer = self.links.transfer_ms(p.bytes if p else 0, path, in_flight)
        return Prediction(device.queue_ms + self.service_ms(exec_ms, transfer), device.queue_ms, transfer, exec_ms)


def read_bench(path: str | Path) -> dict[str, tuple[int, float]]:
    """Model name → (bytes, warm execution ms) from a swap bench result file.

    Raises:
        OSError: unreadable file. ValueError: not ``{"models": {NAME: {"bytes", "served_warm_ms"}}}``.
    """
    data = json.loads(Path(path).read_text())
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path}: expected a non-empty object under 'models'")
    out = {}
    for name, rec in models.items():
        try:
            nbytes, exec_ms = int(rec["bytes"]), float(rec["served_warm_ms"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: model {name!r} needs numeric 'bytes' and 'served_warm_ms'") from None
        if nbytes <= 0 or exec_ms <= 0:
            raise ValueError(f"{path}: model {name!r} has non-positive bytes or served_warm_ms")
        out[name] = (nbytes, exec_ms)
    return out


def choose_node(model_name: str, model_bytes: int, nodes: Mapping[str, Sequence[DeviceState]],
                predictor: Predictor, transfers_in_flight: Mapping[str, Mapping[str, int]] | None = None,
                policy: Policy | None = None, now: float | None = None) -> tuple[str, Decision] | None:
    """The node (and its device decision) predicted to serve a request soonest.

    Runs the node-level policy (:func:`runtime.gpu_server.placement.choose_device`) on each
    node's devices and keeps the lowest score: a node holding the model wins by not paying
    the copy (model locality), a loaded one loses by its queue. Ties go to a node where the
    model is resident, then to the less loaded device (``DeviceState.load``), then to the
    smallest node id.

    Args:
        nodes: node id → its device views.
        transfers_in_flight: node id → link id → transfers on that link.
        (others as :func:`~runtime.gpu_server.placement.choose_device`)

    Returns:
        ``(node id, decision)``, or ``None`` when no node can take the model.
    """
    best: tuple[tuple, str, Decision] | None = None
    for node_id in sorted(nodes):
        flights = (transfers_in_flight or {}).get(node_id, {})
        decision = choose_device(model_name, model_bytes, nodes[node_id], predictor, flights, policy, now)
        if decision is None:
            continue
        load = next((d.load for d in nodes[node_id] if d.index == decision.device), 0.0)
        key = (decision.score_ms, decision.path != "resident", load, node_id)
        if best is None or key < best[0]:
            best = (key, node_id, decision)
    return None if best is None else (best[1], best[2])
