"""A real ``torpor gpu-server`` process on CPU devices for the observability tests: tiny
models registered in a fresh repository, the metrics/health HTTP server on a free port."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

import models
from runtime.client import GPUServerClient
from runtime.gpu_server.arena import ALIGNMENT
from runtime.gpu_server.repository import Repository
from runtime.redis_server import free_port


class GPUServerProcess:
    """``torpor gpu-server --cpu-devices N`` serving tiny ``kinds`` of tests/models.py,
    unauthenticated (``TORPOR_GPU_INSECURE_NO_AUTH``: its clients send no token).

    Args:
        kinds: model kinds to register (each under its kind's name).
        devices: CPU devices.
        regions: tiny models each device's arena holds (arenas are 2 MiB-aligned regions).
        extra: more command-line arguments (``--redis-url``, ``--log-format``...).

    Attributes:
        natives: kind → the native module, for output checks.
        metrics_url: base URL of /metrics, /healthz, /readyz.
        log_path: the server's combined stdout and stderr.
    """

    def __init__(self, kinds: tuple[str, ...], devices: int, regions: int, extra: tuple[str, ...] = ()):
        # a Unix socket path has at most 107 bytes: pytest's tmp_path can be longer
        self.root = Path(tempfile.mkdtemp(prefix="torpor-obs-", dir="/tmp"))
        self.repo = Repository(self.root / "models")
        self.natives = {kind: models.register(self.repo, kind, kind) for kind in kinds}
        self.socket = str(self.root / "gpu.sock")
        self.port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "torpor"), "gpu-server", "--cpu-devices", str(devices),
                 "--device-memory", str(regions * ALIGNMENT), "--model-repo", str(self.repo.root),
                 "--socket", self.socket, "--torch-threads", "1", "--metrics-port", str(self.port), *extra],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "TORPOR_REDIS_URL": "", "TORPOR_GPU_INSECURE_NO_AUTH": "1"})
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpu-server exited: {self.log_path.read_text()}")
            try:
                if requests.get(self.metrics_url + "/readyz", timeout=2).status_code == 200 and os.path.exists(self.socket):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gpu-server not ready within {timeout_s} s: {self.log_path.read_text()}")

    def client(self) -> GPUServerClient:
        return GPUServerClient(self.socket, timeout_s=30)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s) and removal of the temporary folder."""
        stop_process(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


def stop_process(proc: subprocess.Popen) -> None:
    """Stops ``proc`` with SIGTERM, or SIGKILL when it has not exited 10 s later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
