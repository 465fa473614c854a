"""A device the GPU server runs models on: a CUDA GPU, or a CPU "device" that lets swapping,
eviction and the pipelined path run on machines without a GPU through the same code.

On CUDA, copies go on a high-priority copy stream and kernels on a compute stream; an
:class:`torch.cuda.Event` recorded on the copy stream after each copy group lets the compute
stream wait for exactly the bytes a layer needs (``Stream.wait_event`` only orders the
*stream*, the host thread never blocks). On CPU a copy has finished when ``copy_`` returns,
so the events are already complete and waiting on them is free.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


class _DoneEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU devices: work is synchronous, so always done."""

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@dataclass
class Device:
    """One execution device and its weight arena memory.

    Attributes:
        index: position among the node's devices (the ``device`` of the protocol).
        torch_device: ``cuda:N`` or ``cpu``.
        arena_bytes: size of the weight arena in bytes.
        name: human-readable device name (``NVIDIA H200``, ``cpu``).
        weights: the arena itself, a uint8 tensor of ``arena_bytes`` allocated once.
    """

    index: int
    torch_device: torch.device
    arena_bytes: int
    name: str
    weights: torch.Tensor = field(init=False, repr=False)
    copy_stream: "torch.cuda.Stream | None" = field(init=False, default=None, repr=False)
    compute_stream: "torch.cuda.Stream | None" = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.weights = torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.torch_device)
        if self.is_cuda:
            # lower number = higher priority: weight copies must not wait behind bulk traffic
            self.copy_stream = torch.cuda.Stream(self.torch_device, priority=-1)
            self.compute_stream = torch.cuda.Stream(self.torch_device)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def event(self):
        """A fresh event: ``torch.cuda.Event`` on CUDA, an always-complete one on CPU."""
        return torch.cuda.Event() if self.is_cuda else _DoneEvent()

    def copying(self):
        """Context in which copies are issued (the copy stream on CUDA)."""
        return torch.cuda.stream(self.copy_stream) if self.is_cuda else contextlib.nullcontext()

    def computing(self):
        """Context in which kernels are issued (the compute stream on CUDA)."""
        return torch.cuda.stream(self.compute_stream) if self.is_cuda else contextlib.nullcontext()

    def wait(self, event) -> None:
        """Makes the compute stream wait for ``event`` (no host blocking)."""
        if self.is_cuda:
            self.compute_stream.wait_event(event)

    def to_host(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies device ``tensors`` to the host, issued on the current stream without
        waiting: into page-locked memory from PyTorch's caching host allocator on CUDA
        (about 3× the bandwidth of a pageable copy here, and no fresh pages to fault in);
        call :meth:`synchronize` before reading them. On CPU devices the tensors themselves.
        """
        if not self.is_cuda:
            return list(tensors)
        out = []
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out.append(host)
        return out

    def synchronize(self) -> None:
        """Blocks the host until the compute stream's work is done."""
        if self.is_cuda:
            self.compute_stream.synchronize()


def discover(cpu_devices: int, device_memory: int, arena_bytes: int) -> list[Device]:
    """The node's devices: every CUDA GPU, or ``cpu_devices`` CPU devices when none is found
    or CPU devices are asked for.

    Args:
        cpu_devices: number of CPU devices to emulate (0: use the GPUs; no GPU: 1).
        device_memory: weight arena bytes of each CPU device.
        arena_bytes: weight arena bytes of each GPU (0: 60 % of its free memory).
    """
    if cpu_devices == 0 and torch.cuda.is_available():
        out = []
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            size = arena_bytes or int(free * 0.6)
            out.append(Device(i, torch.device("cuda", i), size, torch.cuda.get_device_name(i)))
        return out
    return [Device(i, torch.device("cpu"), device_memory, "cpu") for i in range(max(cpu_devices, 1))]
