"""Starting a private ``redis-server`` for ``torpor up`` and the tests.

The binary is ``$TORPOR_REDIS_SERVER``, else ``redis-server`` on ``PATH``, else the copy that
``make device-bundle`` unpacks from Debian's packages under ``.device/redis`` (run with
``LD_LIBRARY_PATH`` pointing at the libraries unpacked beside it).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

BUNDLE = Path(__file__).resolve().parent.parent / ".device" / "redis"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary() -> tuple[str, dict[str, str]]:
    """Path of ``redis-server`` and the environment to run it with.

    Raises:
        FileNotFoundError: no redis-server anywhere; the message says how to get one.
    """
    env = dict(os.environ)
    explicit = os.environ.get("TORPOR_REDIS_SERVER")
    if explicit:
        return explicit, env
    found = shutil.which("redis-server")
    if found:
        return found, env
    bundled = BUNDLE / "usr" / "bin" / "redis-server"
    if bundled.exists():
        libs = [str(p) for p in (BUNDLE / "usr" / "lib" / "x86_64-linux-gnu", BUNDLE / "usr" / "lib") if p.exists()]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        return str(bundled), env
    raise FileNotFoundError("redis-server not found: install it (apt-get install redis-server) or run make device-bundle")


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1 with append-only persistence in ``data_dir``.

    Args:
        data_dir: working directory for the AOF files (created).
        port: TCP port; 0 picks a free one.
    """

    def __init__(self, data_dir: Path, port: int = 0):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        """Starts the server and waits until it answers PING.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout_s`` seconds.
        """
        binary, env = find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
             "--notify-keyspace-events", ""],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
