"""Execution-order layout of a model's weights in one flat host buffer.

One traced forward pass records the order in which each weight (parameter or buffer) is
first touched by an operator, and which module was running at that moment. Weights are then
packed in that order, each at an ``ALIGNMENT``-byte boundary, so a prefix of the buffer is
exactly what the first layers need and a copy can be cut into groups that gate the layers
one after another (PipeSwitch, Bai et al., OSDI '20; Torpor, Yu et al., ATC '25 §4).
Tied weights (two names, one storage view) are stored once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALIGNMENT = 256  # bytes; CUDA kernels need at most 256-byte aligned operands


@dataclass(frozen=True)
class Slot:
    """One stored tensor: ``nbytes`` bytes at ``offset`` of the flat buffer.

    ``names`` holds every module attribute path (``layer1.0.conv1.weight``) that shares it.
    """

    names: tuple[str, ...]
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Layout:
    """Where each weight lives in the flat buffer, and which module first needs which bytes.

    Attributes:
        slots: stored tensors in first-use order.
        total_bytes: buffer size in bytes (a multiple of ``ALIGNMENT``).
        first_use_end: module path → end offset (bytes) of the last weight that module's own
            operators touch first; a module may run once the buffer is present up to there.
        traced: whether the order came from a forward pass (False: state-dict order).
    """

    slots: list[Slot]
    total_bytes: int
    first_use_end: dict[str, int] = field(default_factory=dict)
    traced: bool = True

    def slot_of(self) -> dict[str, Slot]:
        """Weight name → its slot (tied names map to one slot)."""
        return {n: s for s in self.slots for n in s.names}

    def to_json(self) -> dict:
        """A JSON-serialisable form (dtypes by name, ``float32``...); :meth:`from_json` reads it."""
        return {"total_bytes": self.total_bytes, "traced": self.traced, "first_use_end": self.first_use_end,
                "slots": [{"names": list(s.names), "offset": s.offset, "nbytes": s.nbytes, "shape": list(s.shape),
                           "dtype": str(s.dtype).removeprefix("torch.")} for s in self.slots]}

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        """The layout :meth:`to_json` described.

        Raises:
            ValueError: a field is missing or malformed, an unknown dtype, a weight named in
                two slots, slots that overlap, are misaligned, disagree with their shape and
                dtype, or run past ``total_bytes``, or a ``first_use_end`` that is not the
                aligned end of a slot.
        """
        try:
            slots = []
            for s in data["slots"]:
                dtype = getattr(torch, s["dtype"])
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"unknown dtype {s['dtype']!r}")
                names, shape = s["names"], s["shape"]
                if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                    raise ValueError(f"slot names {names!r} must be a non-empty list of strings")
                if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise ValueError(f"slot shape {shape!r} must be a list of non-negative integers")
                slots.append(Slot(tuple(names), int(s["offset"]), int(s["nbytes"]), tuple(shape), dtype))
            first_use_end = {str(k): int(v) for k, v in data["first_use_end"].items()}
            layout = cls(slots, int(data["total_bytes"]), first_use_end, bool(data["traced"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed layout: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:
            raise ValueError(f"malformed layout: {exc}") from exc
        named = [n for slot in layout.slots for n in slot.names]
        if len(named) != len(set(named)):
            raise ValueError("malformed layout: a weight is named in two slots")
        end = 0
        for slot in sorted(layout.slots, key=lambda s: s.offset):
            numel = 1
            for d in slot.shape:
                numel *= d
            if slot.offset < end or slot.offset % ALIGNMENT or slot.nbytes != numel * slot.dtype.itemsize:
                raise ValueError(f"malformed layout: slot {slot.names[0]} at {slot.offset} ({slot.nbytes} bytes)")
            end = slot.offset + slot.nbytes
        if end > layout.total_bytes:
            raise ValueError(f"malformed layout: slots end at {end}, past total_bytes {layout.total_bytes}")
        ends = {_align(s.offset + s.nbytes) for s in layout.slots}
        if not set(layout.first_use_end.values()) <= ends:
            raise ValueError("malformed layout: a first_use_end is not the aligned end of a slot")
        return layout


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


class _FirstUse(TorchDispatchMode):
    """Records, per storage pointer, the order of first use and the module then running."""

    def __init__(self, storages: dict[int, list[str]], module_stack: list[str]):
        super().__init__()
        self.storages = storages
        self.stack = module_stack
        self.order: list[tuple[int, str]] = []
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                ptr = a.untyped_storage().data_ptr()
                if ptr in self.storages and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.order.append((ptr, self.stack[-1]))
        return func(*args, **(kwargs or {}))


def named_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by attribute path, tied ones included."""
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out[f"{prefix}.{name}" if prefix else name] = t
    return out


def trace_layout(module: nn.Module, example_inputs: tuple[torch.Tensor, ...] | None) -> Layout:
    """Packs ``module``'s weights in first-use order, running ``module(*example_inputs)`` once.

    Args:
        module: a CPU module in eval mode.
        example_inputs: CPU tensors for one forward pass; ``None`` keeps state-dict order.

    Raises:
        whatever the forward pass raises on ``example_inputs`` (wrong shapes, dtypes).
    """
    weights = named_weights(module)
    by_view: dict[tuple, list[str]] = {}
    for name, t in weights.items():
        by_view.setdefault(_key(t), []).append(name)
    storages: dict[int, list[str]] = {}
    for names in by_view.values():
        storages.setdefault(weights[names[0]].untyped_storage().data_ptr(), []).extend(names)

    order: list[tuple[int, str]] = []
    traced = example_inputs is not None
    if traced:
        stack = [""]
        paths = {m: p for p, m in module.named_modules()}
        handles = []
        def leave(_module, _args, _output) -> None:
            stack.pop()

        for mod, path in paths.items():
            handles.append(mod.register_forward_pre_hook(lambda m, a, p=path: stack.append(p)))
            handles.append(mod.register_forward_hook(leave))
        mode = _FirstUse(storages, stack)
        try:
            with torch.no_grad(), mode:
                module(*example_inputs)
        finally:
            for h in handles:
                h.remove()
        order = mode.order

    first_user = {ptr: path for ptr, path in order}
    ranked = [ptr for ptr, _ in order] + [p for p in storages if p not in first_user]
    slots: list[Slot] = []
    first_use_end: dict[str, int] = {}
    offset = 0
    for ptr in ranked:
        for names in by_view.values():
            t = weights[names[0]]
            if t.untyped_storage().data_ptr() != ptr:
                continue
            nbytes = t.numel() * t.element_size()
            slots.append(Slot(tuple(names), offset, nbytes, tuple(t.shape), t.dtype))
            offset = _align(offset + nbytes)
            if ptr in first_user:
                path = first_user[ptr]
                first_use_end[path] = max(first_use_end.get(path, 0), offset)
    return Layout(slots, max(offset, ALIGNMENT), first_use_end, traced)


def pack(module: nn.Module, layout: Layout, buffer: torch.Tensor) -> None:
    """Copies ``module``'s weights into the flat uint8 ``buffer`` (``layout.total_bytes`` long)."""
    weights = named_weights(module)
    for slot in layout.slots:
        src = weights[slot.names[0]].contiguous().view(-1).view(torch.uint8)
        buffer[slot.offset:slot.offset + slot.nbytes].copy_(src)


class Binding:
    """The weights of one module, found once, that :meth:`to` points at a flat buffer.

    Looking each weight's owner up by name costs most of a first binding (about 9 of 11 ms for
    the 320 weights of a ResNet-50 here); an executor keeps the Binding of a module it may
    bind again at another arena offset. Binding again on the same device re-points the
    tensors made the first time in place (``Tensor.set_``) rather than making new ones: about
    4x less Python per weight, and it runs under the executor's lock on every swap-in that
    moves a model.

    Args:
        module: a module built from the layout's architecture (weights on any device).
        layout: the module's layout.
    """

    def __init__(self, module: nn.Module, layout: Layout):
        self.targets: list[tuple[Slot, list[tuple[nn.Module, str, bool]]]] = []
        for slot in layout.slots:
            owners = []
            for name in slot.names:
                owner_path, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                owners.append((owner, attr, attr in owner._parameters))
            self.targets.append((slot, owners))
        # per slot, the (stride, tensors) the last :meth:`to` made; and their device
        self._made: list[tuple[tuple[int, ...], list[torch.Tensor]]] = []
        self._device: torch.device | None = None

    def to(self, buffer: torch.Tensor) -> None:
        """Points every weight at its bytes in the flat uint8 ``buffer`` (no copy); ``buffer``
        may live on any device; tied names get the same view."""
        if buffer.device == self._device:
            storage, base = buffer.untyped_storage(), buffer.storage_offset()
            with torch.no_grad():
                for (slot, owners), (stride, tensors) in zip(self.targets, self._made):
                    start, misaligned = divmod(base + slot.offset, tensors[0].element_size())
                    if misaligned:
                        raise ValueError(f"byte {base + slot.offset} is not aligned for {slot.dtype}")
                    for (owner, attr, is_parameter), t in zip(owners, tensors):
                        t.set_(storage, start, slot.shape, stride)
                        # installed again: a forward may have replaced the registered tensor
                        (owner._parameters if is_parameter else owner._buffers)[attr] = t
            return
        self._device, self._made = None, []  # a failure half-way must not leave a prefix to re-point
        for slot, owners in self.targets:
            view = buffer[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
            tensors = []
            for owner, attr, is_parameter in owners:
                if is_parameter:
                    tensors.append(nn.Parameter(view, requires_grad=False))
                    owner._parameters[attr] = tensors[-1]
                else:
                    tensors.append(view)
                    owner._buffers[attr] = view
            self._made.append((view.stride(), tensors))
        self._device = buffer.device


def bind(module: nn.Module, layout: Layout, buffer: torch.Tensor) -> Binding:
    """Points every weight of ``module`` at its bytes in the flat uint8 ``buffer`` (no copy);
    returns the :class:`Binding`, to point them at another buffer later.

    ``buffer`` may live on any device; tied names get the same view.
    """
    binding = Binding(module, layout)
    binding.to(buffer)
    return binding
