"""The GPU server's HTTP side: ``/healthz`` (liveness), ``/readyz`` (readiness) and
``/metrics`` (Prometheus), served by :class:`HealthServer` on threads of its own.

*Liveness* answers as long as the process can serve HTTP: it touches no device, no lock of
the node and no model, so a long swap-in or inference never delays it.

*Readiness* means the node can serve: every device answers a tiny kernel (``2 * arange(4)``
summed, on a stream of its own so that it does not queue behind swap-ins and runs) within
the probe timeout, no device has been marked unhealthy by a fault (``Executor.healthy``),
and the model repository directory can be listed. Each check runs on a thread of its own
(:class:`Probe`), so a hung GPU or file system makes ``/readyz`` answer 503 on time instead
of hanging it. The answer names every device and what failed (docs/observability.md).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import torch
from flask import Flask, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler, make_server

from runtime.gpu_server.device import Device

log = logging.getLogger(__name__)


class Probe:
    """Runs ``check`` on a thread of its own with a deadline; callers arriving while a check
    is in flight wait for that one instead of starting another (a hung device never gets
    more than one stuck thread).

    Args:
        check: raises on failure; its return value is ignored.
        name: thread name, for debugging.
    """

    def __init__(self, check: Callable[[], Any], name: str):
        self._check = check
        self._name = name
        self._lock = threading.Lock()
        self._current: tuple[threading.Thread, dict, float] | None = None

    def run(self, timeout_s: float) -> dict:
        """Result of a check that started at most ``timeout_s`` seconds ago.

        Returns:
            ``{"ok": bool, "ms": check duration in ms}`` plus ``"error"`` (text) when not ok.
        """
        with self._lock:
            if self._current is None or not self._current[0].is_alive():
                outcome: dict = {}
                thread = threading.Thread(target=self._target, args=(outcome,), name=self._name, daemon=True)
                self._current = (thread, outcome, time.monotonic())
                thread.start()
            thread, outcome, started = self._current
        thread.join(max(0.0, started + timeout_s - time.monotonic()))
        elapsed_ms = round((time.monotonic() - started) * 1e3, 3)
        if thread.is_alive():
            return {"ok": False, "ms": elapsed_ms, "error": f"no answer within {timeout_s:g} s "
                                                           f"(the check has been running for {elapsed_ms / 1e3:.1f} s)"}
        if "error" in outcome:
            return {"ok": False, "ms": outcome["ms"], "error": outcome["error"]}
        return {"ok": True, "ms": outcome["ms"]}

    def _target(self, outcome: dict) -> None:
        started = time.monotonic()
        try:
            self._check()
        except Exception as exc:  # any failure of the check is the answer, not a crash
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        outcome["ms"] = round((time.monotonic() - started) * 1e3, 3)


def kernel_check(device: Device) -> Callable[[], None]:
    """A check that runs ``(2 * arange(4)).sum()`` on ``device`` and compares it with 12.

    On CUDA it runs on a stream of its own, created on first use, and waits for that
    stream only. Raises ``RuntimeError`` on a wrong answer and whatever torch raises on a
    device fault.
    """
    streams: list = []

    def check() -> None:
        if device.is_cuda:
            if not streams:
                streams.append(torch.cuda.Stream(device.torch_device))
            with torch.cuda.stream(streams[0]):
                value = (torch.arange(4, dtype=torch.float32, device=device.torch_device) * 2).sum().item()
        else:
            value = (torch.arange(4, dtype=torch.float32) * 2).sum().item()
        if value != 12.0:
            raise RuntimeError(f"the probe kernel computed {value} instead of 12")

    return check


def directory_check(path: str) -> Callable[[], None]:
    """A check that lists directory ``path`` (raises ``OSError`` when it cannot)."""
    return lambda: os.listdir(path)


class _QuietHandler(WSGIRequestHandler):
    # probes and scrapes every few seconds would flood the log at info level
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s %s", self.command, self.path, code)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` of one GPU server over HTTP.

    Args:
        node: the GPU server's node (``executors``, each with ``device``, ``healthy``, ``fault``).
        registry: the Prometheus registry served on ``/metrics``.
        model_repo: the model repository directory readiness checks.
        host: address to listen on.
        port: TCP port (0: a free one, see :attr:`port`).
        probe_timeout_s: longest a device or the repository may take to answer, s.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, node, registry, model_repo: str, host: str, port: int, probe_timeout_s: float):
        self.node = node
        self.registry = registry
        self.model_repo = model_repo
        self.probe_timeout_s = probe_timeout_s
        self._device_probes = [Probe(kernel_check(ex.device), f"probe-device-{ex.device.index}") for ex in node.executors]
        self._repo_probe = Probe(directory_check(model_repo), "probe-model-repo")
        self._http = make_server(host, port, self._app(), threaded=True, request_handler=_QuietHandler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port served on."""
        return self._http.server_port

    def start(self) -> "HealthServer":
        """Serves on a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="health-http", daemon=True)
        self._thread.start()
        log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)",
                 self._http.server_address[0], self.port)
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(5)
        self._http.server_close()

    def readiness(self) -> dict:
        """The readiness report: ``ready``, ``devices`` (one entry each: ``device``, ``name``,
        ``kind``, ``ready``, ``probe_ms`` when probed, ``error`` when not ready),
        ``model_repo`` (``path``, ``ready``, ``error``) and ``failing`` (one line per problem)."""
        devices, failing = [], []
        for ex, probe in zip(self.node.executors, self._device_probes):
            entry = {"device": ex.device.index, "name": ex.device.name, "kind": ex.device.torch_device.type}
            if not ex.healthy:
                # a device that faulted stays out of service even if a tiny kernel would pass now
                entry.update(ready=False, error=f"marked unhealthy: {ex.fault or 'no fault recorded'}")
            else:
                result = probe.run(self.probe_timeout_s)
                entry.update(ready=result["ok"], probe_ms=result["ms"])
                if not result["ok"]:
                    entry["error"] = f"probe kernel failed: {result['error']}"
            if not entry["ready"]:
                failing.append(f"device {ex.device.index} ({ex.device.name}): {entry['error']}")
            devices.append(entry)
        repo = self._repo_probe.run(self.probe_timeout_s)
        model_repo = {"path": self.model_repo, "ready": repo["ok"]}
        if not repo["ok"]:
            model_repo["error"] = f"cannot list the model repository: {repo['error']}"
            failing.append(f"model repository {self.model_repo}: {repo['error']}")
        return {"ready": not failing, "devices": devices, "model_repo": model_repo, "failing": failing}

    def _app(self) -> Flask:
        app = Flask("torpor-gpu-server")
        app.json.sort_keys = False

        @app.get("/healthz")
        def healthz() -> Any:
            return {"status": "ok"}

        @app.get("/readyz")
        def readyz() -> Any:
            report = self.readiness()
            return jsonify(report), 200 if report["ready"] else 503

        @app.get("/metrics")
        def metrics() -> Response:
            return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)

        @app.errorhandler(HTTPException)
        def http_error(exc: HTTPException) -> Any:
            return jsonify({"error": f"{exc.name}: use /healthz, /readyz or /metrics"}), exc.code

        return app
