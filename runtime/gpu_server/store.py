"""The host model store: every registered model's weights once per node, in host memory
(page-locked when CUDA is present, so copies run at full link speed), laid out in
execution order (layout.py), each in a buffer of exactly its size (host_buffer)."""
from __future__ import annotations

import copy
import json
import logging
import mmap
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from runtime.gpu_server import zoo
from runtime.gpu_server.layout import ALIGNMENT, Binding, Layout, Slot, bind, named_weights, pack, trace_layout
from runtime.gpu_server.repository import (EXTRA_WEIGHTS_FILE, LAYOUT_FILE, ModelLoadError, ModelSpec, Repository,
                                           VersionGone, build)


VERSION_CHECK_S = 1.0  # how long a loaded model is served without checking its current version, s
# how long the store keeps a dropped model's host buffer (host_buffer) at least, s: a request
# that took the model before the drop may still issue copies from it after waiting for device
# room (up to the server's room timeout, which the server adds)
RETIRE_GRACE_S = 30.0

CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's context, not one

log = logging.getLogger("torpor.gpu_server.store")


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host tensor of exactly ``nbytes`` bytes, page-aligned, page-locked when ``pin``.

    PyTorch's pinned allocator (``pin_memory=True``) rounds every allocation up to the next
    power of two and keeps freed blocks for its own reuse: +50 % of host memory over the
    bench models (a 1.27 GiB BERT-large takes 2 GiB), never given back. Here the pages come
    from an anonymous mapping of the exact size, are page-locked in place with
    ``cudaHostRegister``, and are unlocked (``cudaHostUnregister``) just before the mapping
    goes with the last tensor that views it. If registration fails the buffer comes from
    ``pin_memory=True`` after all, with a warning.
    """
    pages = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(pages, dtype=np.uint8, count=nbytes)
    tensor = torch.from_numpy(array)  # keeps the array, and so the mapping, alive
    if not pin:
        return tensor
    cudart = torch.cuda.cudart()
    try:
        error = cudart.cudaHostRegister(tensor.data_ptr(), max(nbytes, 1), CUDA_HOST_REGISTER_PORTABLE)
        registered = int(error) == 0
    except Exception as exc:  # a binding that differs from the one this was written against
        error, registered = exc, False
    if not registered or not tensor.is_pinned():
        if registered:
            cudart.cudaHostUnregister(tensor.data_ptr())
        # the failed call's error stays this loader thread's last CUDA error; loader threads
        # launch no kernels, so no later check of theirs mistakes it for a device fault
        reason = error if isinstance(error, Exception) else cudart.cudaGetErrorString(error)
        log.warning("cudaHostRegister of %d bytes failed (%s): using PyTorch's pinned allocator", nbytes, reason)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    # not at interpreter exit: the process's pages go with it, and CUDA may be shut down by then
    weakref.finalize(array, cudart.cudaHostUnregister, tensor.data_ptr()).atexit = False
    return tensor


@dataclass
class HostModel:
    """A registered model: its flat weight buffer and a weightless template to run it.

    Attributes:
        spec: the repository description.
        layout: where each weight sits in ``buffer``.
        buffer: uint8 tensor of ``layout.total_bytes`` bytes on the CPU (page-locked under
            CUDA; host_buffer).
        template: the module with every weight on the ``meta`` device; executors copy it and
            bind the copy to the model's bytes on their device.
    """

    spec: ModelSpec
    layout: Layout
    buffer: torch.Tensor
    template: nn.Module

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes

    def instantiate(self, weights: torch.Tensor) -> nn.Module:
        """A runnable module whose weights are views of the flat uint8 ``weights``."""
        return self.bound(weights)[0]

    def bound(self, weights: torch.Tensor) -> tuple[nn.Module, Binding]:
        """:meth:`instantiate`, with the module's :class:`Binding` to point it at other bytes
        of the same layout later without looking its weights up again."""
        module = copy.deepcopy(self.template)
        return module, bind(module, self.layout, weights)


def load(spec: ModelSpec, pin: bool) -> HostModel:
    """Packs ``spec``'s weights into one host buffer in first-use order.

    A safetensors model registered with its layout (repository.write_layout) is packed
    straight from its files: the template is built on the ``meta`` device (no weight
    initialisation, which costs seconds per large model on a CPU) and no forward pass runs.
    Anything else — other formats, older registrations, an architecture whose construction
    needs real tensors, a layout that no longer names the template's weights (the
    architecture's library changed) — is built on the CPU, traced and packed.

    Raises:
        VersionGone: the version folder was collected meanwhile (resolve the name again).
        ModelLoadError: it does not build, load or run on its declared inputs, or its files
            disagree with its layout.
    """
    started = time.perf_counter()
    packed = _load_packed(spec, pin)
    if packed is not None:
        log.debug("loaded %s from its stored layout: %d bytes in %.1f ms", spec.name, packed.nbytes,
                  (time.perf_counter() - started) * 1e3)
        return packed
    module = build(spec)
    try:
        layout = trace_layout(module, tuple(i.example() for i in spec.inputs))
    except Exception as exc:  # the forward pass can raise anything; it means the inputs do not fit
        raise ModelLoadError(f"model {spec.name} does not run on its declared inputs: {type(exc).__name__}: {exc}") from exc
    buffer = host_buffer(layout.total_bytes, pin)
    pack(module, layout, buffer)
    template = module.to("meta")
    log.debug("loaded %s by building and tracing it: %d bytes in %.1f ms", spec.name, layout.total_bytes,
              (time.perf_counter() - started) * 1e3)
    return HostModel(spec, layout, buffer, template)


def _load_packed(spec: ModelSpec, pin: bool) -> HostModel | None:
    """The fast path of :func:`load`; None when it does not apply."""
    folder = Path(spec.path)
    if spec.format != "safetensors" or not spec.architecture or not (folder / LAYOUT_FILE).is_file():
        return None
    try:
        layout = Layout.from_json(json.loads((folder / LAYOUT_FILE).read_text()))
    except FileNotFoundError as exc:
        raise VersionGone(f"model {spec.name}: version {spec.path} was collected while loading") from exc
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"model {spec.name}: {folder / LAYOUT_FILE}: {exc}") from exc
    try:
        with torch.device("meta"):
            template = zoo.build(spec.architecture, spec.config)
    except Exception:  # e.g. a constructor that reads a tensor's value: the CPU path builds it
        return None
    if set(named_weights(template)) != {n for s in layout.slots for n in s.names}:
        return None
    if layout.total_bytes > 2 * max(spec.bytes, 1) + len(layout.slots) * ALIGNMENT:
        raise ModelLoadError(f"model {spec.name}: {folder / LAYOUT_FILE} claims {layout.total_bytes} bytes for "
                             f"{spec.bytes} bytes of weights")
    allocating = time.perf_counter()
    buffer = host_buffer(layout.total_bytes, pin)
    log.debug("host buffer of %s: %d bytes in %.1f ms (page-locked: %s)", spec.name, layout.total_bytes,
              (time.perf_counter() - allocating) * 1e3, pin)
    files = [folder / spec.weights] + [p for p in (folder / EXTRA_WEIGHTS_FILE,) if p.is_file()]
    view = memoryview(buffer.numpy())
    try:
        with ExitStack() as stack:
            opened = []
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                stack.callback(os.close, fd)
                opened.append((path, fd, *_safetensors_header(spec.name, path, fd)))
            for slot in layout.slots:
                source = next(((p, fd, base, header, n) for p, fd, base, header in opened for n in slot.names
                               if n in header), None)
                if source is None:
                    raise ModelLoadError(f"model {spec.name}: weight {slot.names[0]} is in its layout but not in its files")
                path, fd, base, header, name = source
                start = _slot_start(spec.name, path, header, name, slot)
                # one copy, page cache → host buffer, with the GIL released: safetensors'
                # get_tensor copied each weight into a fresh tensor first (a second copy, and new
                # pages to fault in per weight); 8 loads at once on 2 cores spent 278 ms median
                # copying that way, 143 ms this way
                if not _read_exactly(fd, view[slot.offset:slot.offset + slot.nbytes], base + start):
                    raise ModelLoadError(f"model {spec.name}: {path} ends inside weight {name}")
    except FileNotFoundError as exc:
        raise VersionGone(f"model {spec.name}: version {spec.path} was collected while loading") from exc
    except OSError as exc:
        raise ModelLoadError(f"model {spec.name} does not load: {type(exc).__name__}: {exc}") from exc
    return HostModel(spec, layout, buffer, template)


# safetensors' dtype names (its format's specification) → torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header, bytes


def _safetensors_header(model: str, path: Path, fd: int) -> tuple[int, dict]:
    """The file offset of the data section of the safetensors file open as ``fd`` (bytes) and its
    header: tensor name → ``{"dtype", "shape", "data_offsets": [start, end]}`` within that section.

    Raises:
        ModelLoadError: the header is truncated, too long or not a JSON object.
        OSError: the file does not read (FileNotFoundError is never raised once it is open).
    """
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 <= length <= min(MAX_HEADER_BYTES, size - 8):
        raise ModelLoadError(f"model {model}: {path} is not a safetensors file: header of {length} bytes in a file of "
                             f"{size}")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"model {model}: {path}: malformed safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"model {model}: {path}: malformed safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    return 8 + length, header


def _read_exactly(fd: int, into: memoryview, offset: int) -> bool:
    """Fills ``into`` from file ``fd`` at byte ``offset``; False when the file ends first.
    One read returns at most ~2 GiB on Linux (a large embedding is more), hence the loop.

    Raises:
        OSError: the file does not read.
    """
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True


def _slot_start(model: str, path: Path, header: dict, name: str, slot: Slot) -> int:
    """Where weight ``name`` of ``path``'s ``header`` starts in its data section, bytes; it
    runs ``slot.nbytes`` bytes from there.

    Raises:
        ModelLoadError: its entry is malformed, or its dtype, shape or size differ from ``slot``'s.
    """
    entry = header[name]
    try:
        dtype, shape, (start, end) = SAFETENSORS_DTYPES.get(entry["dtype"]), tuple(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"model {model}: {path}: malformed entry for weight {name}: {entry!r}") from exc
    if shape != slot.shape or dtype != slot.dtype:
        raise ModelLoadError(f"model {model}: weight {name} is {shape} {dtype or entry['dtype']} in its file and "
                             f"{slot.shape} {slot.dtype} in its layout")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start and end - start == slot.nbytes):
        raise ModelLoadError(f"model {model}: {path}: weight {name} spans bytes {start}..{end}, not {slot.nbytes}")
    return start


class ModelStore:
    """Registered models by name, loaded from a :class:`Repository` on first use.

    The repository is the source of truth: a loaded model is checked against the name's
    current version at most every :data:`VERSION_CHECK_S`, so a registration the server was
    not told about (``torpor model register`` without ``--gpu-socket``) is served within that
    time, and a model unregistered on disk is unknown again. A model that failed to load stays
    failed (each call raises the same error at once) until a new version is registered, even
    with the same files. Loads of one model are serialised: concurrent first requests load it
    once. A load reads every file from the one version folder it
    resolved (repository.py: a registration replacing the model meanwhile is not seen), and
    resolves once more when that version was collected before its files were opened.

    At most ``max_loads`` models load at once: a load is CPU-bound (reading and packing the
    weights; without a stored layout also building and tracing the module in Python), and
    hundreds of first requests loading in parallel
    thrash the cores and starve the server's other threads of the GIL (its liveness key
    lapsed that way on a 2×H200 node warming 200 functions with 64 loads at once).

    A dropped model (a new version, unregistered) keeps its host buffer for ``retire_grace_s``
    more: copies from it may still be in flight (page-locked memory unmapped under a DMA is a
    device fault, not a wrong answer).

    Args:
        repository: where model folders live.
        pin: page-lock the host buffers (True when CUDA devices are served).
        max_loads: models loading at once at most (>= 1).
        retire_grace_s: how long a dropped model's buffer is kept at least, s: longer than a
            request may wait for device room after taking the model (the server passes its
            room timeout plus :data:`RETIRE_GRACE_S`).
    """

    def __init__(self, repository: Repository, pin: bool, max_loads: int = 2, retire_grace_s: float = RETIRE_GRACE_S):
        self.repository = repository
        self.pin = pin
        self.retire_grace_s = retire_grace_s
        # loads run on these threads only: each thread that runs CPU kernels gets an OpenMP
        # team of its own, and loads on the connection threads (one per client) exhausted
        # the threads a process may have (libgomp: Thread creation failed)
        self._loader = ThreadPoolExecutor(max(1, max_loads), thread_name_prefix="model-load")
        self._models: dict[str, HostModel] = {}
        self._checked: dict[str, float] = {}  # name → when its loaded version was last found current
        self._failed: dict[str, tuple[str, ModelLoadError]] = {}  # name → (version folder, error)
        # called with a name whose loaded version the repository no longer holds, before its
        # new version is served (the node evicts the old copies from its devices)
        self.on_replaced: Callable[[str], None] | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._retired: deque[tuple[float, HostModel]] = deque()  # dropped models, kept retire_grace_s

    def get(self, name: str) -> HostModel:
        """The loaded model ``name``, loading it if needed.

        Raises:
            KeyError: not in the repository.
            ModelLoadError: it does not load (cached until its files change).
        """
        model = self._models.get(name)
        if model is not None and time.monotonic() - self._checked.get(name, 0.0) < VERSION_CHECK_S:
            return model
        self._release_retired()
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            model = self._models.get(name)
            try:
                current = str(self.repository.resolve(name))
            except KeyError:
                if self.drop(name) is not None:
                    self._replaced(name)
                raise
            if model is not None and model.spec.path == current:
                self._checked[name] = time.monotonic()
                return model
            if model is not None:  # a newer version (or a broken one) replaces it, served or not
                self.drop(name)
                self._replaced(name)
            failed = self._failed.get(name)
            if failed and failed[0] == current:
                raise failed[1]
            spec = self.repository.spec(name)
            try:
                model = self._loader.submit(self._load, name, spec).result()
            except ModelLoadError as exc:
                if not isinstance(exc, VersionGone):  # a property of the timing, not of the files
                    self._failed[name] = (spec.path, exc)
                raise
            self._failed.pop(name, None)
            self._models[name] = model
            self._checked[name] = time.monotonic()
            return model

    def _replaced(self, name: str) -> None:
        if self.on_replaced is not None:
            self.on_replaced(name)

    def _load(self, name: str, spec: ModelSpec) -> HostModel:
        try:
            return load(spec, self.pin)
        except VersionGone:
            return load(self.repository.spec(name), self.pin)

    def loaded(self) -> list[str]:
        return sorted(self._models)

    def drop(self, name: str) -> HostModel | None:
        """Forgets ``name``; its host memory goes with the last reference, kept at least
        ``retire_grace_s`` from now."""
        self._failed.pop(name, None)
        self._checked.pop(name, None)
        model = self._models.pop(name, None)
        if model is not None:
            with self._guard:
                self._retired.append((time.monotonic() + self.retire_grace_s, model))
        self._release_retired()
        return model

    def _release_retired(self) -> None:
        """Lets go of the dropped models whose grace is over (called on drops and on each
        version check of a model, about once a :data:`VERSION_CHECK_S` per model in use)."""
        now = time.monotonic()
        released = []
        with self._guard:
            while self._retired and self._retired[0][0] <= now:
                released.append(self._retired.popleft())
        released.clear()  # outside the lock: the last reference may unregister the pages
