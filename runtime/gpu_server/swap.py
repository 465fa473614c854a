"""Pipelined swap-in: a model's flat weight buffer is copied onto a device in fixed-size
groups, in execution order, with one event per group; each module of the running model
waits — on the compute stream — only for the group that holds the last byte of the weights
it touches first (PipeSwitch, Bai et al., OSDI '20; Torpor, Yu et al., ATC '25). So the
first layers run while the later ones are still in flight.

A swap may start before the request's input arrives (prefetch, late binding): the gate
hooks installed on the module consult the swap in progress whenever the module runs.
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.gpu_server.device import Device

GROUP_BYTES = 2 * 1024 * 1024  # Torpor's copy group size
# A copy between two GPUs costs PyTorch a cross-device stream handshake per call (tens of us
# measured on H200s, bench/results), so peer copies use larger groups: at 393 GB/s NVLink a
# 64 MiB group lands in 0.17 ms, still far ahead of the layers it feeds.
PEER_GROUP_BYTES = 64 * 1024 * 1024


class SwapIn:
    """The copy of one model's bytes to one device region, issued group by group.

    Args:
        device: destination device (its copy stream carries the copies).
        src: uint8 source buffer (pinned host memory, or a peer device's region).
        dst: uint8 destination view of the arena, same length as ``src``.
        group_bytes: bytes per copy group; ``len(src)`` or more means one bulk copy.
        captured: issued inside a CUDA graph capture: its events belong to the graph, so
            other threads must never query them (CUDA forbids it while capturing); it
            reports itself done.
    """

    def __init__(self, device: Device, src: torch.Tensor, dst: torch.Tensor, group_bytes: int = GROUP_BYTES,
                 captured: bool = False):
        self.device = device
        self.captured = captured
        self.nbytes = src.numel()
        self.group_bytes = max(1, group_bytes)
        self.events = []
        with device.copying():
            for start in range(0, self.nbytes, self.group_bytes):
                end = min(start + self.group_bytes, self.nbytes)
                dst[start:end].copy_(src[start:end], non_blocking=True)
                event = device.event()
                event.record()
                self.events.append(event)
        self.waited = -1

    def wait_for(self, end: int) -> None:
        """Makes the compute stream wait until bytes ``[0, end)`` have landed."""
        group = min((max(end, 1) - 1) // self.group_bytes, len(self.events) - 1)
        if group > self.waited:
            self.device.wait(self.events[group])
            self.waited = group

    def wait_all(self) -> None:
        self.wait_for(self.nbytes)

    def done(self) -> bool:
        """True once every group has landed (host-side query, never blocks)."""
        return self.captured or self.events[-1].query()


class Gates:
    """Forward pre-hooks that make each module wait for its own weights of a swap in progress.

    Args:
        module: the device-bound module.
        first_use_end: module path → end byte of the weights it touches first (layout.py).
    """

    def __init__(self, module: nn.Module, first_use_end: dict[str, int]):
        self.swap: SwapIn | None = None
        self._handles = []
        for path, end in first_use_end.items():
            mod = module.get_submodule(path) if path else module
            self._handles.append(mod.register_forward_pre_hook(self._hook(end)))

    def _hook(self, end: int):
        def hook(_module, _args):
            if self.swap is not None:
                self.swap.wait_for(end)
        return hook

    def settle(self) -> None:
        """Drops the swap once it has fully landed and a run has waited for all of it."""
        if self.swap is not None and self.swap.done():
            self.swap.wait_all()
            self.swap = None
