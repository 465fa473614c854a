"""The GPU server process: serves the protocol of docs/gpu-server-protocol.md on a Unix
socket, one thread per connection, and publishes its devices' state to Redis."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import socketserver
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np
import torch

from runtime.gpu_server import protocol, tokens
from runtime.gpu_server.config import GPUServerSettings
from runtime.gpu_server.device import discover
from runtime.gpu_server.executor import DeviceFault, NoRoom
from runtime.gpu_server.metrics import ServerMetrics, link_load
from runtime.gpu_server.node import NoHealthyDevice, Node
from runtime.gpu_server.programs import ProgramError, ProgramRegistry
from runtime.gpu_server.repository import ModelLoadError, Repository
from runtime.gpu_server.store import RETIRE_GRACE_S, ModelStore
from runtime.gpu_server.topology import bus_id, cpu_topology
from runtime.gpu_server.topology import discover as discover_topology
from runtime.log_format import LogSettings, configure_from_kwargs
from runtime.settings import from_kwargs, options

log = logging.getLogger("torpor.gpu_server")

# Ops a function token may use (on its own models); every other op but health needs the
# admin token when the node has a secret (docs/faults.md, case 11).
FUNCTION_OPS = frozenset({"infer", "prefetch", "register_program"})
OPEN_OPS = frozenset({"health"})
GPU_ALIVE_MIN_MS = 1500  # the TTL of torpor:node:{id}:gpu is 3 publish periods, at least this
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
F16_POSITIVE_NON_FINITE = 0x7C00  # +inf as int16 bits; NaNs above (all_finite)
F16_NEGATIVE_NON_FINITE = 0xFC00  # -inf as uint16 bits; NaNs above
TOKEN_CACHE = 1024  # verified tokens remembered (Service._authorize)


class RequestError(Exception):
    """A request the server refuses; ``status`` and ``code`` go back to the caller."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def validate(spec_inputs, arrays: list[np.ndarray], model: str) -> None:
    """Checks count, dtype, shape (``None`` dims are free), finiteness of float inputs, and the
    registered id range (``high``) and length (``max_len``) of token inputs of ``arrays``.

    Raises:
        RequestError: 400 naming the first problem.
    """
    if len(arrays) != len(spec_inputs):
        raise RequestError(400, "bad_input", f"model {model} takes {len(spec_inputs)} inputs "
                           f"({', '.join(i.name for i in spec_inputs)}), got {len(arrays)}")
    for spec, a in zip(spec_inputs, arrays):
        if protocol.dtype_name(a.dtype) != spec.dtype:
            raise RequestError(400, "bad_input", f"input {spec.name} of model {model} must be {spec.dtype}, got {a.dtype.name}")
        if len(a.shape) != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape, a.shape)) \
                or any(s == 0 for s in a.shape):
            want = "x".join("?" if d is None else str(d) for d in spec.shape)
            raise RequestError(400, "bad_input", f"input {spec.name} of model {model} must have shape {want}, got "
                               f"{'x'.join(map(str, a.shape))}")
        if a.dtype.kind == "f" and not all_finite(a):
            raise RequestError(400, "bad_input", f"input {spec.name} of model {model} contains NaN or infinity")
        if spec.high is not None and (a.min() < 0 or a.max() >= spec.high):  # zero-size refused above
            raise RequestError(400, "bad_input", f"input {spec.name} of model {model} holds values outside "
                               f"0..{spec.high - 1} (the rows of the table it indexes)")
        if spec.max_len is not None and a.shape[-1] > spec.max_len:
            raise RequestError(400, "bad_input", f"input {spec.name} of model {model} is {a.shape[-1]} long, over "
                               f"the model's {spec.max_len} positions")


def all_finite(a: np.ndarray) -> bool:
    """Whether no value of the float16, float32 or float64 array ``a`` is NaN or infinite.

    Two reductions that allocate nothing (``np.isfinite`` would allocate a boolean array of
    the input's size, above the mmap threshold for an image: ``limit_heap_growth``). float32
    and float64 take the minimum and the maximum: a NaN makes both NaN, an infinity is one of
    them. float16 is read as integers instead (NumPy's float16 min and max convert every
    value: 2.4 ms for 1x3x224x224 values, against 11 µs as integers): an infinity or a NaN
    has all exponent bits set, which puts it at or above 0x7c00 as an int16 when positive
    and at or above 0xfc00 as a uint16 when negative, and every finite value below both.
    Either way the cost is mostly reading the input that the client has just written from
    another core (bench/README.md).
    """
    if not a.size:
        return True
    if a.dtype == np.float16:
        return int(a.view(np.int16).max()) < F16_POSITIVE_NON_FINITE and \
            int(a.view(np.uint16).max()) < F16_NEGATIVE_NON_FINITE
    return math.isfinite(a.min()) and math.isfinite(a.max())


class Service:
    """Turns protocol requests into calls on the :class:`Node`."""

    def __init__(self, node: Node, settings: GPUServerSettings):
        self.node = node
        self.settings = settings
        self.metrics = ServerMetrics(node)
        self.programs = ProgramRegistry(node.store.repository, settings.max_program_bytes)
        # an HMAC and a JSON decode per request otherwise; a connection sends one token again
        # and again. Only valid tokens are kept (verify raises on the others).
        self._verify = functools.lru_cache(maxsize=TOKEN_CACHE)(tokens.verify)

    def handle(self, header: dict, payload: bytes, attached: dict[str, protocol.Segment],
               fds: list[int]) -> tuple[dict, bytes]:
        """Answers one request.

        Args:
            header, payload: the request.
            attached: this connection's shared-memory segments by id.
            fds: descriptors the request carried: a segment's, when the request names one
                (``shm``), becomes the connection's segment; the caller closes what is left.

        Raises:
            RequestError: the status and code for the caller.
        """
        self._authorize(header)
        if fds and isinstance(header.get("shm"), str) and header["shm"]:
            self._attach(header["shm"], fds.pop(), attached)
        op = header.get("op")
        if op == "register_program":  # the one op whose request carries a payload
            return self.op_register_program(header, payload)
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise RequestError(400, "bad_request", f"unknown op {op!r}")
        return handler(header, attached)

    def _authorize(self, header: dict) -> None:
        """Checks the caller's ``token`` against the op and its model when the node has a secret.

        Raises:
            RequestError: 403 ``forbidden`` for a missing or invalid token, a function token
                asking for an admin op, or a function token naming a model that is not its
                action's (nor one of the programs its action registered).
        """
        secret = self.settings.node_secret
        op = header.get("op")
        if not isinstance(op, str):
            raise RequestError(400, "bad_request", f"field 'op' must be a string, not {type(op).__name__}")
        if not secret or op in OPEN_OPS:
            return
        token = header.get("token")
        if not isinstance(token, str) or not token:
            raise RequestError(403, "forbidden", f"op {op!r} needs a token: this GPU server checks its callers")
        try:
            claims = self._verify(secret, token)
        except tokens.TokenError as exc:
            raise RequestError(403, "forbidden", f"invalid token: {exc}") from None
        if claims.get("admin"):
            return
        action = f"{claims['ns']}/{claims['action']}"
        if op not in FUNCTION_OPS:
            raise RequestError(403, "forbidden", f"action {action} may not use op {op!r}: a function token "
                               f"allows {', '.join(sorted(FUNCTION_OPS))} of the action's own models")
        model = header.get("model")
        if isinstance(model, str) and not tokens.allows(claims, model):  # a malformed name gets its 400 later
            raise RequestError(403, "forbidden", f"action {action} may not use model {model!r}: its models are "
                               f"{', '.join(claims['models']) or 'none'} (annotation 'model')")

    def _model_name(self, header: dict) -> str:
        name = header.get("model")
        if not isinstance(name, str) or not name:
            raise RequestError(400, "bad_request", "field 'model' must be a non-empty string")
        try:
            return protocol.check_model_name(name)
        except ValueError as exc:
            raise RequestError(400, "bad_request", str(exc)) from None

    def _hint(self, header: dict) -> int | None:
        hint = header.get("device")
        devices = len(self.node.executors)
        if hint is not None and (not protocol.is_int(hint) or not 0 <= hint < devices):
            raise RequestError(400, "bad_request", f"field 'device' must be a device index from 0 to {devices - 1}")
        return hint

    def _load(self, name: str):
        try:
            return self.node.store.get(name)
        except KeyError:
            raise RequestError(404, "unknown_model", f"unknown model {name!r}") from None
        except ModelLoadError as exc:
            raise RequestError(502, "model_load_failed", str(exc)) from None

    def _attach(self, shm_name: str, fd: int, attached: dict[str, protocol.Segment]) -> None:
        """Maps the segment ``fd`` as this connection's one segment, called ``shm_name``.

        Raises:
            RequestError: 400 when it is no memfd sealed against shrinking.
        """
        try:
            shm = protocol.Segment.attach(fd, shm_name, self.settings.max_input_bytes + protocol.SEGMENT_SLACK_BYTES)
        except (protocol.ProtocolError, OSError) as exc:
            raise RequestError(400, "bad_request", f"cannot map shared memory {shm_name!r}: {exc}") from None
        for old in attached.values():  # a client has one segment per connection at a time
            old.close()
        attached.clear()
        attached[shm_name] = shm

    def op_infer(self, header: dict, attached: dict[str, protocol.Segment]) -> tuple[dict, bytes]:
        shm_name = header.get("shm")
        if not isinstance(shm_name, str) or not shm_name:
            raise RequestError(400, "bad_request", "field 'shm' must name a shared-memory segment")
        entries = header.get("inputs")
        if not isinstance(entries, list):
            raise RequestError(400, "bad_request", "field 'inputs' must be a list of tensor descriptions")
        # malformed descriptions are refused with their reason by protocol.read below
        total = sum(e["nbytes"] for e in entries if isinstance(e, dict) and isinstance(e.get("nbytes"), int))
        if total > self.settings.max_input_bytes:
            raise RequestError(413, "too_large", f"inputs of {total} bytes exceed the limit of {self.settings.max_input_bytes} bytes")
        shm = attached.get(shm_name)
        if shm is None:
            raise RequestError(400, "bad_request", f"unknown shared-memory segment {shm_name!r}: send its file "
                               "descriptor with the first request that names it on a connection")
        name = self._model_name(header)
        model = self._load(name)
        try:
            arrays = protocol.read(shm.buf, entries, copy=False)
        except protocol.ProtocolError as exc:
            raise RequestError(400, "bad_input", str(exc)) from None
        validate(model.spec.inputs, arrays, name)
        timeout_ms = header.get("timeout_ms", 1e9)
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or timeout_ms < 0:
            raise RequestError(400, "bad_request", "field 'timeout_ms' must be a non-negative number")
        timeout_s = min(self.settings.room_timeout_s, timeout_ms / 1000)
        started = time.perf_counter()
        try:
            outputs, info = self.node.infer(name, [torch.from_numpy(a) for a in arrays], self._hint(header), timeout_s)
        except NoRoom as exc:
            raise RequestError(503, "no_room", str(exc)) from None
        except (NoHealthyDevice, DeviceFault) as exc:
            raise RequestError(500, "device_fault", str(exc)) from None
        except (IndexError, ValueError) as exc:
            raise RequestError(400, "bad_input", f"model {name} rejected its input: {exc}") from None
        server_s = time.perf_counter() - started  # placement and run; the rest is the protocol's overhead
        self.metrics.inference_done(name, info, server_s)
        arrays_out = [o.numpy() for o in outputs]
        start = max(int(e["offset"]) + int(e["nbytes"]) for e in entries) if entries else 0
        out_entries, end = protocol.describe(arrays_out, start)
        reply = {"ok": True, "outputs": out_entries, "device": info["device"], "swap_in": info["swap_in"], "path": info["path"],
                 "server_ms": server_s * 1e3, "queue_ms": info["queue_ms"], "run_ms": info["run_ms"],
                 "graph": info["graph"]}
        if end <= shm.size:
            protocol.write(shm.buf, out_entries, arrays_out)
            return reply, b""
        out_entries, end = protocol.describe(arrays_out, 0)
        blob = bytearray(end)
        protocol.write(memoryview(blob), out_entries, arrays_out)
        reply["outputs"] = out_entries
        return reply, bytes(blob)

    def op_prefetch(self, header: dict, attached: dict) -> tuple[dict, bytes]:
        name = self._model_name(header)
        self._load(name)
        started = time.perf_counter()
        try:
            info = self.node.prefetch(name, self._hint(header), self.settings.room_timeout_s)
        except NoRoom as exc:
            raise RequestError(503, "no_room", str(exc)) from None
        except NoHealthyDevice as exc:
            raise RequestError(500, "device_fault", str(exc)) from None
        self.metrics.prefetch_done(info)
        return {"ok": True, **info, "server_ms": (time.perf_counter() - started) * 1e3}, b""

    def op_register(self, header: dict, attached: dict) -> tuple[dict, bytes]:
        name = self._model_name(header)
        self.node.forget(name)
        model = self._load(name)
        return {"ok": True, "model": name, "bytes": model.nbytes}, b""

    def op_register_program(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        name = self._model_name(header)
        try:
            created = self.programs.register(name, header.get("digest"), header.get("inputs"), payload)
        except ProgramError as exc:
            raise RequestError(exc.status, exc.code, str(exc)) from None
        if created:
            log.info("registered program %s (%d bytes)", name, len(payload))
        model = self._load(name)
        return {"ok": True, "model": name, "digest": header["digest"], "bytes": model.nbytes, "created": created}, b""

    def op_unregister(self, header: dict, attached: dict) -> tuple[dict, bytes]:
        self.node.forget(self._model_name(header))
        return {"ok": True}, b""

    def op_evict(self, header: dict, attached: dict) -> tuple[dict, bytes]:
        name = self._model_name(header)
        return {"ok": True, "devices": [e.device.index for e in self.node.executors if e.evict(name)]}, b""

    def op_stats(self, header: dict, attached: dict) -> tuple[dict, bytes]:
        return {"ok": True, "models": self.node.store.loaded(), "devices": [e.snapshot() for e in self.node.executors]}, b""

    def op_health(self, header: dict, attached: dict) -> tuple[dict, bytes]:
        devices = [{"device": e.device.index, "healthy": e.healthy, "fault": e.fault} for e in self.node.executors]
        return {"ok": True, "healthy": all(d["healthy"] for d in devices), "devices": devices}, b""


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        service: Service = self.server.service  # type: ignore[attr-defined]
        attached: dict[str, protocol.Segment] = {}
        fds: list[int] = []
        try:
            while True:
                try:
                    header, payload = protocol.recv(self.request, max(service.settings.max_input_bytes,
                                                                      service.settings.max_program_bytes), fds,
                                                    frame_timeout_s=service.settings.frame_timeout_s)
                except (ConnectionError, OSError):
                    return
                except protocol.ProtocolError as exc:
                    _reply(self.request, {"ok": False, "status": 400, "code": "bad_request", "error": str(exc)})
                    return
                began = time.perf_counter()
                try:
                    reply, data = service.handle(header, payload, attached, fds)
                except RequestError as exc:
                    reply, data = {"ok": False, "status": exc.status, "code": exc.code, "error": str(exc)}, b""
                except Exception as exc:  # a bug or a model fault must not kill the connection thread silently
                    log.exception("request %s failed", header.get("op"))
                    reply, data = {"ok": False, "status": 500, "code": "internal", "error": f"{type(exc).__name__}: {exc}"}, b""
                finally:
                    _close_all(fds)
                # counted before the caller can see the reply, so that a scrape after it counts it
                _account(service, header, reply, time.perf_counter() - began)
                if not _reply(self.request, reply, data):
                    return
        finally:
            _close_all(fds)
            for shm in attached.values():
                shm.close()


def _close_all(fds: list[int]) -> None:
    """Closes and forgets descriptors a request carried but no op took."""
    while fds:
        os.close(fds.pop())


def _account(service: Service, header: dict, reply: dict, seconds: float) -> None:
    """Counts one answered request and logs it at debug level (op, model, status, device, path,
    ms; for an inference also the run's queue_ms, run_ms and whether a graph replayed it)."""
    op = header.get("op")
    op = op if isinstance(op, str) and hasattr(service, f"op_{op}") else "unknown"  # bounded label values
    status = 200 if reply.get("ok") else reply.get("status", 500)
    service.metrics.request_done(op, status)
    if log.isEnabledFor(logging.DEBUG):
        fields = {"op": op, "model": header.get("model"), "status": status, "device": reply.get("device"),
                  "path": reply.get("path"), "ms": round(seconds * 1e3, 3), "graph": reply.get("graph")}
        for k in ("queue_ms", "run_ms"):
            if k in reply:
                fields[k] = round(reply[k], 3)
        where = "".join(f", {k} {fields[k]}" for k in ("device", "path", "queue_ms", "run_ms", "graph")
                        if fields.get(k) is not None)
        log.debug("%s %s: %s in %.1f ms%s", op, fields["model"], status, fields["ms"], where, extra={"fields": fields})


def _reply(sock, reply: dict, data: bytes = b"") -> bool:
    """Sends a reply; False when the caller is gone (it gave up or was killed: the work it
    asked for was done into the void, and nothing else is owed to it)."""
    try:
        try:
            protocol.send(sock, reply, data)
        except protocol.HeaderTooLarge as exc:
            if reply.get("ok"):  # a model with thousands of outputs, say
                reply = {"ok": False, "status": 500, "code": "internal", "error": f"the reply: {exc}"}
            else:  # an error that echoes a long piece of the request: its status stands
                reply = {**reply, "error": reply["error"][:protocol.ERROR_ECHO_CHARS] + " ... (cut)"}
            protocol.send(sock, reply)
        return True
    except OSError:
        return False


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    # socketserver's default backlog of 5 turns a burst of action containers connecting at
    # once (cold starts) into EAGAIN, i.e. spurious 503s; the kernel caps it at somaxconn
    request_queue_size = 4096

    def __init__(self, path: str, service: Service, mode: int, group: str = ""):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        gid = _group_id(group) if group else -1
        # the socket is born owner-only: nobody connects before its mode and group are set
        umask = os.umask(0o177)
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(umask)
        os.chown(path, -1, gid)
        os.chmod(path, mode)
        self.service = service


def _group_id(group: str) -> int:
    """The id of ``group`` (a name or a number).

    Raises:
        click.BadParameter: no such group.
    """
    import grp

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise click.BadParameter(f"no group {group!r}", param_hint="--socket-group") from None


def keep_alive(settings: GPUServerSettings, stop: threading.Event) -> None:
    """Sets this server's liveness key ``torpor:node:{id}:gpu`` (its pid, expiring after three
    publish periods, at least GPU_ALIVE_MIN_MS) every period until ``stop`` is set. The invoker
    withholds the node from scheduling while that key is gone. A thread of its own that takes
    no executor lock, so a long capture or swap-in cannot make a live server look dead."""
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    alive_ms = max(GPU_ALIVE_MIN_MS, int(3000 * settings.publish_interval_s))
    while not stop.is_set():
        try:
            client.set(f"torpor:node:{settings.node_id}:gpu", os.getpid(), px=alive_ms)
        except redis.RedisError as exc:
            log.warning("cannot refresh the liveness key: %s", exc)
        stop.wait(settings.publish_interval_s)


def publish(node: Node, settings: GPUServerSettings, stop: threading.Event) -> None:
    """Writes each device's state to ``torpor:node:{id}:device:{k}`` every publish period
    until ``stop`` is set."""
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    while not stop.is_set():
        try:
            pipe = client.pipeline()
            snaps = [e.snapshot() for e in node.executors]
            links = {d.pop("device"): d for d in link_load(node.states())}  # link, transfers/bytes in flight
            for s in snaps:
                pipe.hset(f"torpor:node:{settings.node_id}:device:{s['device']}", mapping={
                    "resident": json.dumps(sorted(s["resident"])), "arena_bytes": s["arena_bytes"],
                    "used_bytes": s["used_bytes"], "queue": s["queue"], "healthy": int(s["healthy"]),
                    "kind": s["kind"], "name": s["name"], "swap_ins": s["swap_ins"], "evictions": s["evictions"],
                    "fault": s["fault"], **links[s["device"]], "updated": int(time.time() * 1000)})
            pipe.hset(f"torpor:node:{settings.node_id}", "devices", json.dumps(
                [{"device": s["device"], "name": s["name"], "kind": s["kind"], "arena_bytes": s["arena_bytes"]} for s in snaps]))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot publish device state: %s", exc)
        stop.wait(settings.publish_interval_s)


def limit_heap_growth(mmap_threshold: int) -> None:
    """Makes glibc serve allocations of ``mmap_threshold`` bytes or more with their own
    mappings (``mallopt(M_MMAP_THRESHOLD)``). Each connection has its own thread, and tensors
    that threads allocate and free in glibc's per-thread arenas would otherwise stay resident
    as free but unreturnable memory: the resident set grew ~20 MiB a minute in a soak with
    action containers coming and going. No-op elsewhere than glibc, or with 0."""
    import ctypes
    import ctypes.util

    if mmap_threshold <= 0:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return
    if not mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) was refused", mmap_threshold)


def check_authentication(settings: GPUServerSettings) -> None:
    """Refuses to run without a node secret unless unauthenticated mode was asked for
    explicitly, and then warns loudly (docs/faults.md, case 11).

    Raises:
        click.UsageError: no ``node_secret`` and no ``insecure_no_auth``.
    """
    if settings.node_secret:
        return
    if not settings.insecure_no_auth:
        raise click.UsageError(
            "no node secret: set TORPOR_NODE_SECRET (--node-secret) to the secret this node's invoker has, or run "
            "unauthenticated explicitly with --insecure-no-auth (TORPOR_GPU_INSECURE_NO_AUTH=1)")
    log.warning("UNAUTHENTICATED GPU server (--insecure-no-auth, no TORPOR_NODE_SECRET): every process that can open "
                "%s may use every model and admin op; the socket's mode and group are the only access control",
                settings.socket)


def set_switch_interval(ms: float) -> None:
    """Sets Python's thread switch interval to ``ms`` milliseconds (0: leave Python's 5 ms).

    Raises:
        click.BadParameter: not 0 and not a finite value in [0.001, 1000] ms (below 1 µs
            Python rounds to its floor; above, busy threads would keep the GIL for seconds).
    """
    if ms == 0:
        return
    if not (math.isfinite(ms) and 0.001 <= ms <= 1000):
        raise click.BadParameter(f"{ms} ms: give 0 (Python's default) or 0.001 to 1000 ms",
                                 param_hint="--gil-switch-interval-ms")
    sys.setswitchinterval(ms / 1e3)


def serve(settings: GPUServerSettings) -> None:
    """Runs the GPU server until SIGTERM/SIGINT.

    Raises:
        click.UsageError: no node secret and no explicit ``insecure_no_auth`` (check_authentication).
        click.BadParameter: a switch interval out of range (set_switch_interval).
    """
    check_authentication(settings)
    limit_heap_growth(settings.mmap_threshold)
    set_switch_interval(settings.gil_switch_interval_ms)
    # full fp32 by default: served outputs then equal native fp32 execution on any device;
    # TF32 convolutions (PyTorch's own default) are faster and differ by ~1e-3 relative
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = settings.cudnn_tf32
    devices = discover(settings.cpu_devices, settings.device_memory, settings.arena_bytes)
    serves_gpus = any(d.is_cuda for d in devices)
    # with GPUs, the host's tensor work is mostly copies (packed loads, outputs), and torch's
    # intra-op pool of a thread per core under each of several concurrent loads oversubscribed
    # the cores that launch kernels; a load without a stored layout traces its forward pass on
    # this one thread, slower, but without taking every core
    threads = settings.torch_threads or (1 if serves_gpus else 0)
    if threads:
        torch.set_num_threads(threads)
    store = ModelStore(Repository(settings.model_repo), pin=serves_gpus,
                       max_loads=settings.max_loads, retire_grace_s=settings.room_timeout_s + RETIRE_GRACE_S)
    if serves_gpus:
        props = [torch.cuda.get_device_properties(d.torch_device) for d in devices]
        topology = discover_topology([bus_id(p.pci_domain_id, p.pci_bus_id, p.pci_device_id) for p in props])
    else:
        topology = cpu_topology(len(devices))
    node = Node(store, devices, settings.group_bytes, settings.policy, topology, settings.cuda_graphs)
    server = Server(settings.socket, Service(node, settings), int(settings.socket_mode, 8), settings.socket_group)
    stop = threading.Event()
    if settings.redis_url:
        threading.Thread(target=keep_alive, args=(settings, stop), daemon=True).start()
        threading.Thread(target=publish, args=(node, settings, stop), daemon=True).start()
    health = None
    if settings.metrics_port:
        from runtime.gpu_server.health import HealthServer  # Flask: only for this HTTP side

        health = HealthServer(node, server.service.metrics.registry, settings.model_repo, settings.metrics_host,
                              settings.metrics_port, settings.probe_timeout_s).start()

    def shutdown(*_):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    log.info("serving %d device(s) on %s: %s", len(devices), settings.socket,
             ", ".join(f"{d.index}:{d.name} arena {d.arena_bytes / 2**20:.0f} MiB" for d in devices))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        if health is not None:
            health.stop()
        node.close()
        server.server_close()
        if os.path.exists(settings.socket):
            os.unlink(settings.socket)


@click.command("gpu-server")
@options(GPUServerSettings)
@options(LogSettings)
def command(**kwargs) -> None:
    """Run the node's GPU server (the only process that touches CUDA)."""
    configure_from_kwargs(kwargs, "gpu-server")
    serve(from_kwargs(GPUServerSettings, kwargs))
