"""What the fault tests (tests/test_faults_*.py) share: a real ``torpor gpu-server`` process
started with chosen flags, a model whose run time the caller sets through its input size,
and polling helpers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import models
from runtime.client import GPUServerClient, ModelError
from runtime.gpu_server.arena import ALIGNMENT
from runtime.gpu_server.repository import Repository, TensorSpec

TORPOR = str(Path(sys.executable).parent / "torpor")
# a resnet whose spatial size is free: 1x3x512x512 runs in ~0.15 s, 1x3x1024x1024 in ~0.7 s on
# one core; its weights (2.7 MB) take two 2 MiB arena regions
SLOW_CONFIG = {"hidden_sizes": [64, 128], "embedding_size": 64, "depths": [2, 2]}


def register_slow(repo: Repository, name: str = "slow"):
    """Registers the resnet of :data:`SLOW_CONFIG` with input ``pixel_values`` float32
    1x3x?x?; returns its native module."""
    module = models.build("resnet", seed=4, config=SLOW_CONFIG)
    spec = models.spec(name, "resnet", SLOW_CONFIG)
    spec.inputs = [TensorSpec("pixel_values", "float32", [1, 3, None, None])]
    repo.register(spec, models.save(module, Path(repo.root).parent / f"{name}.safetensors"))
    return module


def wait_until(condition, timeout_s: float, step_s: float = 0.05):
    """Polls ``condition`` until it returns a true value or ``timeout_s`` passes; returns its
    last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step_s)


class GPUServer:
    """``torpor gpu-server`` on ``devices`` CPU devices of ``regions`` 2 MiB regions each,
    serving ``repo`` on ``root/gpu.sock``, with ``extra`` flags (``--node-secret``...).
    ``root`` must be short: a Unix socket path has at most 107 bytes."""

    def __init__(self, root: Path, repo: Repository, devices: int = 2, regions: int = 8, extra: tuple[str, ...] = (),
                 admin_token: str = ""):
        self.root, self.repo, self.extra = root, repo, extra
        self.devices, self.regions = devices, regions
        self.socket = str(root / "gpu.sock")
        self.log_path = root / "server.log"
        self.admin_token = admin_token
        self.proc: subprocess.Popen | None = None

    def start(self) -> "GPUServer":
        """Starts the process and waits until it answers ``health`` (60 s at most).

        Raises:
            RuntimeError: it exited or did not answer.
        """
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [TORPOR, "gpu-server", "--cpu-devices", str(self.devices), "--device-memory",
                 str(self.regions * ALIGNMENT), "--model-repo", str(self.repo.root), "--socket", self.socket,
                 "--torch-threads", "1", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TORPOR_REDIS_URL": ""})
        probe = GPUServerClient(self.socket, token="", timeout_s=5)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpu-server exited: {self.log_path.read_text()[-3000:]}")
            try:
                return bool(probe.health())
            except ModelError:
                return False

        try:
            if not wait_until(answers, 60):
                raise RuntimeError("gpu-server did not answer within 60 s")
        finally:
            probe.close()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean-up, the socket file stays."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, token: str | None = None, timeout_s: float = 30) -> GPUServerClient:
        """A client with ``token`` (default: the admin token)."""
        return GPUServerClient(self.socket, token=self.admin_token if token is None else token, timeout_s=timeout_s)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")
