"""The node's link topology, read from NVML — never hard-coded.

Two facts matter to the scheduler (runtime/gpu_server/placement.py):

* which devices share a host link: GPUs behind one PCIe switch (NVML common ancestor
  ``SINGLE`` or ``MULTIPLE``, ``PIX``/``PXB`` in ``nvidia-smi topo -m``) share its uplink, so
  their host copies share its bandwidth; GPUs that meet only at a host bridge or above
  have links of their own;
* which pairs of GPUs reach each other over NVLink (``nvmlDeviceGetP2PStatus`` with the
  NVLink capability), so that a model resident on one can be copied peer to peer.

Without NVML (no driver, no GPU) every CPU "device" gets a link of its own and no NVLink,
which is what the CPU devices of the GPU server model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pynvml


@dataclass(frozen=True)
class DeviceLinks:
    """One device's place in the topology.

    Attributes:
        index: device index (CUDA order when PCI bus ids were given to :func:`discover`).
        pci_bus_id: NVML's PCI bus id (``00000000:18:00.0``), ``None`` for CPU devices.
        link_id: id of its host link; devices sharing a PCIe switch share it.
        nvlink_peers: indices of the devices it reaches over NVLink.
    """

    index: int
    pci_bus_id: str | None
    link_id: str
    nvlink_peers: frozenset[int]


@dataclass(frozen=True)
class Topology:
    """Links of all devices of a node.

    Attributes:
        source: ``nvml`` (read from the driver) or ``cpu`` (fallback).
        devices: one entry per device, by index.
    """

    source: str
    devices: tuple[DeviceLinks, ...]

    def link_of(self, index: int) -> str:
        """Host link id of device ``index``."""
        return self.devices[index].link_id

    def peers(self, index: int) -> set[int]:
        """NVLink peers of device ``index``."""
        return set(self.devices[index].nvlink_peers)

    def as_dict(self) -> dict:
        """JSON-serialisable form (for stats and Redis)."""
        return {"source": self.source, "devices": [
            {"index": d.index, "pci_bus_id": d.pci_bus_id, "link_id": d.link_id,
             "nvlink_peers": sorted(d.nvlink_peers)} for d in self.devices]}


def bus_id(domain: int, bus: int, device: int) -> str:
    """NVML's PCI bus id string from its parts (e.g. torch's ``pci_domain_id``, ``pci_bus_id``,
    ``pci_device_id`` of ``torch.cuda.get_device_properties``)."""
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


def cpu_topology(count: int) -> Topology:
    """``count`` CPU devices, each with its own link (``cpu:k``) and no NVLink.

    Raises:
        ValueError: ``count`` < 1.
    """
    if count < 1:
        raise ValueError("a node has at least one device")
    return Topology("cpu", tuple(DeviceLinks(i, None, f"cpu:{i}", frozenset()) for i in range(count)))


def group_links(bus_ids: Sequence[str], share_link: Callable[[int, int], bool],
                nvlink: Callable[[int, int], bool], source: str = "nvml") -> Topology:
    """Builds a topology from pairwise facts about devices ``0..len(bus_ids)-1``.

    Args:
        bus_ids: PCI bus id of each device.
        share_link: whether devices i and j sit behind one PCIe switch. Sharing is made
            transitive (a switch with three GPUs is one link).
        nvlink: whether i and j reach each other over NVLink.
        source: recorded as :attr:`Topology.source`.
    """
    n = len(bus_ids)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    peers: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if share_link(i, j):
                parent[root(j)] = root(i)
            if nvlink(i, j):
                peers[i].add(j)
                peers[j].add(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    link = {}
    for members in groups.values():
        name = "pcie:" + min(bus_ids[i] for i in members)
        for i in members:
            link[i] = name
    return Topology(source, tuple(DeviceLinks(i, bus_ids[i], link[i], frozenset(peers[i])) for i in range(n)))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def discover(pci_bus_ids: Sequence[str] | None = None, cpu_devices: int = 1) -> Topology:
    """The topology of this node's GPUs from NVML, or CPU devices when NVML has none.

    Args:
        pci_bus_ids: the GPUs to describe, in the order the caller indexes them (pass
            CUDA's order, see :func:`bus_id`, so that indices match ``cuda:N``). ``None``:
            every GPU NVML sees, in NVML's order.
        cpu_devices: device count of the CPU fallback.

    Raises:
        pynvml.NVMLError: NVML works but a listed bus id is unknown to it.
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return cpu_topology(cpu_devices)
    try:
        if pci_bus_ids is None:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            handles = [pynvml.nvmlDeviceGetHandleByPciBusId(b) for b in pci_bus_ids]
        if not handles:
            return cpu_topology(cpu_devices)
        ids = [_text(pynvml.nvmlDeviceGetPciInfo(h).busId) for h in handles]

        def share_link(i: int, j: int) -> bool:
            level = pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
            return level <= pynvml.NVML_TOPOLOGY_MULTIPLE

        def nvlink(i: int, j: int) -> bool:
            try:
                status = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
            except pynvml.NVMLError:
                return False
            return status == pynvml.NVML_P2P_STATUS_OK

        return group_links(ids, share_link, nvlink)
    finally:
        pynvml.nvmlShutdown()
