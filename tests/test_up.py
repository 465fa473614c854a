"""`torpor up` as a user runs it: the whole stack in the foreground, stopped with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis


def wait_for_line(path: Path, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def test_up_stops_everything_and_says_so_when_one_of_its_processes_dies(tmp_path):
    torpor = Path(sys.executable).parent / "torpor"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([str(torpor), "up", "--state-dir", str(tmp_path / "state"), "--cpu-devices", "1"],
                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for_line(log, "Ctrl-C to stop", 120), log.read_text()
        redis_url = next(line.split(": ", 1)[1] for line in log.read_text().splitlines() if line.startswith("Redis: "))
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        invoker = int(r.hget("torpor:node:node0", "invoker_pid"))
        os.kill(invoker, signal.SIGKILL)  # a crash of one part
        assert up.wait(30) == 1
        assert "invoker exited with -9" in log.read_text() and "Everything else was stopped" in log.read_text()
        gpu_socket = tmp_path / "state" / "run" / "gpu.sock"
        assert not gpu_socket.exists()  # the GPU server stopped and removed its socket
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(30)
