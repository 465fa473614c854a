"""Redirection client: what user code calls instead of running a model itself.

    from runtime.client import Model
    logits = Model("resnet50")(image)   # image: numpy array (or CPU torch tensor)

One request per model call goes to the node's GPU server over a Unix socket; input and
output tensors travel through a shared-memory segment owned by this process (a sealed memfd
whose descriptor goes to the server over the socket: protocol.Segment). Nothing here
imports torch or touches CUDA: the action process never creates a CUDA context nor holds
model weights.
"""
from __future__ import annotations

import os
import socket
import struct
import threading

import numpy as np

from runtime.gpu_server import protocol, tokens

DEFAULT_SOCKET = "/run/torpor/gpu.sock"
DEFAULT_SHM_BYTES = 16 << 20
MAX_REPLY_PAYLOAD = 1 << 31


class ModelError(Exception):
    """A model call failed.

    Attributes:
        status: HTTP-style status — 400 bad input, 403 not allowed, 404 unknown model,
            413 over a size limit, 502 the model failed to load, 503 the GPU server is
            unavailable or has no room, 504 no reply within the client's timeout, 500 a
            device or model fault.
        code: short machine-readable reason (``bad_input``, ``unknown_model``...).

    ``str()`` gives the message followed by the status and code, so that an action that lets
    the error escape reports both in its activation's error.
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return f"{self.args[0]} (model call failed: {self.status} {self.code})"


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        a = x
    elif hasattr(x, "detach") and hasattr(x, "numpy"):  # a CPU torch tensor, without importing torch
        a = x.detach().numpy()
    else:
        a = np.asarray(x)
    # the protocol's bytes are native order; a big-endian array would be read as garbage
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


class GPUServerClient:
    """A connection to the GPU server, one socket and one shared-memory segment per thread.

    Args:
        socket_path: the server's Unix socket (default ``$TORPOR_GPU_SOCKET``, else
            ``/run/torpor/gpu.sock``).
        token: the caller's token, sent with calls (default: ``$TORPOR_FUNCTION_TOKEN``, the
            one the invoker gives an action; else the admin token of ``$TORPOR_NODE_SECRET``,
            for the node's own tools; else none).
        timeout_s: seconds one read or write of the socket may wait (for a reply, or for the
            server to take a request's bytes).
    """

    def __init__(self, socket_path: str | None = None, token: str | None = None, timeout_s: float = 120.0):
        self.socket_path = socket_path or os.environ.get("TORPOR_GPU_SOCKET") or DEFAULT_SOCKET
        if token is None:
            secret = os.environ.get("TORPOR_NODE_SECRET", "")
            token = os.environ.get("TORPOR_FUNCTION_TOKEN") or (tokens.admin_token(secret) if secret else "")
        self.token = token
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _sock(self) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.socket_path)
                # a blocking socket with the timeout in the kernel: with a timeout of Python's
                # own, every send and recv polls first (twice the system calls of a call)
                sock.settimeout(None)
                micros = max(1, round(self.timeout_s * 1e6))  # a zero timeval means no timeout
                timeval = struct.pack("ll", *divmod(micros, 1_000_000))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            except OSError as exc:
                sock.close()
                raise ModelError(503, "unavailable", f"GPU server at {self.socket_path} is unavailable: {exc}") from None
            self._local.sock = sock
            self._local.announced = None  # a new connection has seen no segment yet
        return sock

    def segment(self, nbytes: int) -> protocol.Segment:
        """This thread's shared-memory segment of at least ``nbytes`` bytes (at least
        ``DEFAULT_SHM_BYTES``), replaced by a new one when smaller."""
        segment = getattr(self._local, "segment", None)
        if segment is None or segment.size < nbytes:
            if segment is not None:
                segment.close()
            segment = self._local.segment = protocol.Segment.create(max(nbytes, DEFAULT_SHM_BYTES))
        return segment

    def call(self, header: dict, payload: bytes = b"", segment: protocol.Segment | None = None) -> tuple[dict, bytes]:
        """Sends one request and returns the reply (header, payload). ``segment``: the
        shared memory the request names (``"shm"``); its descriptor goes with the request
        when this connection has not been given it yet.

        A connection kept from an earlier call that turns out closed (the GPU server was
        restarted since) is replaced by a new one and the request sent once more: every op is
        idempotent, so a request the old server may have run does no harm run again.

        Raises:
            ModelError: the server answered with an error (its status), could not be reached
                or dropped the connection (503), or did not answer within ``timeout_s`` (504).
        """
        if self.token:
            header = {**header, "token": self.token}
        while True:
            kept = getattr(self._local, "sock", None) is not None
            try:
                sock = self._sock()
                fds = (segment.fd,) if segment is not None and self._local.announced is not segment else ()
                protocol.send(sock, header, payload, fds)
                reply, data = protocol.recv(sock, MAX_REPLY_PAYLOAD)
                break
            except ModelError:
                raise
            except protocol.HeaderTooLarge as exc:  # e.g. thousands of tensor descriptions
                raise ModelError(400, "bad_request", str(exc)) from None
            except (TimeoutError, BlockingIOError):  # EAGAIN: SO_RCVTIMEO or SO_SNDTIMEO ran out
                self._drop_socket()
                raise ModelError(504, "timeout", f"GPU server gave no reply within {self.timeout_s:g} s") from None
            except (OSError, ConnectionError, protocol.ProtocolError) as exc:
                self._drop_socket()
                if not kept:
                    raise ModelError(503, "unavailable", f"GPU server connection failed: {exc}") from None
        if segment is not None and reply.get("ok"):
            # known to the server now; after a refusal it is sent again, in case the refusal
            # came before the server took it
            self._local.announced = segment
        if not reply.get("ok"):
            raise ModelError(int(reply.get("status", 500)), reply.get("code", "error"), reply.get("error", "unknown error"))
        return reply, data

    def infer(self, model: str, inputs: list, device: int | None = None, timeout_ms: int | None = None) -> list[np.ndarray]:
        """Runs ``model`` on ``inputs`` (numpy arrays or CPU tensors) and returns its outputs.

        Raises:
            ModelError: see its ``status``.
        """
        arrays = [_as_numpy(x) for x in inputs]
        entries, end = protocol.describe(arrays)
        segment = self.segment(end + (4 << 20))
        protocol.write(segment.buf, entries, arrays)
        header = {"op": "infer", "model": model, "shm": segment.id, "inputs": entries}
        if device is not None:
            header["device"] = device
        if timeout_ms is not None:
            header["timeout_ms"] = timeout_ms
        reply, data = self.call(header, segment=segment)
        return protocol.read(data if reply.get("payload") else segment.buf, reply["outputs"], copy=True)

    def prefetch(self, model: str, device: int | None = None) -> int:
        """Starts swapping ``model`` in on a device (``device`` is a hint); returns the device."""
        return self.prefetch_info(model, device)["device"]

    def prefetch_info(self, model: str, device: int | None = None) -> dict:
        """:meth:`prefetch`, returning the whole reply: ``device``, ``swap_in`` (this call
        started a swap-in), ``path`` (``resident``, ``pcie``, ``nvlink``) and ``server_ms``."""
        return self.call({"op": "prefetch", "model": model, **({"device": device} if device is not None else {})})[0]

    def register(self, model: str) -> dict:
        """Loads (or reloads) ``model`` from the repository into the host store."""
        return self.call({"op": "register", "model": model})[0]

    def register_program(self, model: str, digest: str, inputs: list[dict], program: bytes) -> tuple[dict, bool]:
        """Registers the ``torch.export`` archive ``program`` (SHA-256 ``digest``, inputs
        ``[{"name", "dtype", "shape"}]``) as ``model``, sending the bytes only when the server
        does not hold it yet.

        Returns:
            (reply, uploaded): the reply (``model``, ``digest``, ``bytes``, ``created``) and
            whether this call sent the bytes.

        Raises:
            ModelError: 400 malformed or refused program, 409 the name holds other bytes, 413
                over the server's program limit, 502 it does not load or run, 503 unreachable.
        """
        header = {"op": "register_program", "model": model, "digest": digest, "inputs": inputs}
        try:
            return self.call(header)[0], False
        except ModelError as exc:
            if exc.status != 404:
                raise
        return self.call(header, program)[0], True

    def unregister(self, model: str) -> None:
        self.call({"op": "unregister", "model": model})

    def evict(self, model: str) -> list[int]:
        """Evicts ``model`` from every device where it is idle; returns those devices."""
        return self.call({"op": "evict", "model": model})[0]["devices"]

    def stats(self) -> dict:
        return self.call({"op": "stats"})[0]

    def health(self) -> dict:
        return self.call({"op": "health"})[0]

    def _drop_socket(self) -> None:
        # the segment stays: the inputs written to it are sent again on a new connection
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None

    def close(self) -> None:
        """Closes this thread's socket and frees its shared memory."""
        self._drop_socket()
        segment = getattr(self._local, "segment", None)
        if segment is not None:
            segment.close()
            self._local.segment = None


_default: GPUServerClient | None = None


class Model:
    """A model served by the node's GPU server, called like a function.

    ``Model("resnet50")(x)`` sends ``x`` (numpy array or CPU tensor, e.g. float32
    [1, 3, 224, 224]) and returns the output as a numpy array, or a tuple of arrays for
    models with several outputs.

    Raises:
        ModelError: on any failure (see its ``status``).
    """

    def __init__(self, name: str, client: GPUServerClient | None = None):
        global _default
        if client is None:
            _default = _default or GPUServerClient()
            client = _default
        self.name = name
        self.client = client

    def __call__(self, *inputs):
        outputs = self.client.infer(self.name, list(inputs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def prefetch(self) -> None:
        """Asks for the model to be swapped in ahead of the call (late binding)."""
        self.client.prefetch(self.name)
