"""The invoker's action containers: ``torpor runtime`` processes, their logs, and the warm pool.

A *container* here is one action-runtime process (OpenWhisk ``/init`` + ``/run`` over HTTP on
127.0.0.1) in its own process group and working folder. The pool keeps warm containers per
action (namespace, name, digest of the action record), so an updated or re-created action
never reaches a process initialised with older code.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runtime.redis_server import free_port

log = logging.getLogger(__name__)

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
MAX_RESULT_BYTES = 1024 * 1024
_TRUNCATED = "Logs were truncated because the total bytes size exceeds the limit of {} bytes."
# Env vars that configure `torpor runtime` and may pass from the invoker's environment to it;
# every other TORPOR_* / __OW_* variable (Redis URL, a dedicated image's code...) stays out of
# user code's reach.
_RUNTIME_ENV = ("TORPOR_RUNTIME_", "TORPOR_MAX_PAYLOAD_BYTES", "TORPOR_MAX_CODE_BYTES")
# Time a runtime has to accept the connection of a /run, s (its own time limit counts after).
CONNECT_TIMEOUT_S = 5.0


class ContainerError(Exception):
    """A runtime process could not be started or answered nonsense: a platform fault."""


class InitError(Exception):
    """``/init`` failed: the action's code does not load (an action developer error).

    Attributes:
        message: the runtime's error message.
        logs: the container's log lines written during the failed init (OpenWhisk format).
    """

    def __init__(self, message: str, logs: list[str]):
        super().__init__(message)
        self.message = message
        self.logs = logs


class PoolClosed(Exception):
    """The pool was closed (invoker shutting down) while a container was being acquired."""


def runtime_command() -> list[str]:
    """The command line that starts one action runtime: the ``torpor`` script beside this
    interpreter (the venv's), else the one on ``PATH``.

    Raises:
        FileNotFoundError: no ``torpor`` script anywhere.
    """
    beside = Path(sys.executable).parent / "torpor"
    found = str(beside) if beside.exists() else shutil.which("torpor")
    if not found:
        raise FileNotFoundError("the torpor script is neither beside the Python interpreter nor on PATH; "
                                "install the project (pip install -e .)")
    return [found, "runtime"]


def runtime_env(gpu_socket: str, api_host: str, max_payload_bytes: int | None = None) -> dict[str, str]:
    """Environment of an action runtime: the invoker's own, less Torpor's and OpenWhisk's
    variables (except the runtime's own settings), plus the GPU server socket, the API host and
    the invoker's payload limit (bytes; the same ``TORPOR_MAX_PAYLOAD_BYTES`` setting). The
    node secret is never passed: an action gets its own token at ``/init`` instead."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORPOR_", "__OW_")) or k.startswith(_RUNTIME_ENV)}
    env.update({"TORPOR_GPU_SOCKET": gpu_socket, "__OW_API_HOST": api_host, "PYTHONUNBUFFERED": "1",
                "TORPOR_RUNTIME_HOST": "127.0.0.1", "TORPOR_RUNTIME_PARENT_PID": str(os.getpid())})
    if max_payload_bytes is not None:
        env["TORPOR_MAX_PAYLOAD_BYTES"] = str(max_payload_bytes)
    return env


def format_log_line(epoch_s: float, stream: str, text: str) -> str:
    """One OpenWhisk log line: ``2024-01-01T00:00:00.000Z stdout: text``."""
    stamp = dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z {stream}: {text}"


@dataclass(frozen=True)
class ActionSpec:
    """What the pool needs to start, initialise and share a container for one action.

    Attributes:
        namespace, name, version: the action's identity.
        digest: hash of the action record; a different digest means different code.
        init: the ``value`` of the ``/init`` body (name, main, code, binary, env).
        timeout_ms: the action's time limit, also the ``/init`` time limit (ms).
        concurrency: activations one container may run at once.
        log_limit_bytes: log bytes kept per activation.
        updated: when this revision of the action was written (epoch ms): of two revisions,
            the later one's containers are kept and the other's stopped.
    """

    namespace: str
    name: str
    version: str
    digest: str
    init: dict
    timeout_ms: int
    concurrency: int = 1
    log_limit_bytes: int = 10 * 1024 * 1024
    updated: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        """(namespace, name, digest): containers are shared only under the same key."""
        return (self.namespace, self.name, self.digest)


@dataclass
class _Segment:
    lines: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    size: int = 0
    truncated: bool = False


class LogStream:
    """Reads one pipe (stdout or stderr) of a container line by line in a daemon thread and
    splits what it reads into per-activation segments at the sentinel line.

    Args:
        stream: ``stdout`` or ``stderr`` (written into each log line).
        pipe: the binary pipe to read until EOF.
        limit_bytes: bytes kept per segment; later lines are dropped and the segment marked
            truncated (so a chatty action cannot fill the invoker's memory).
        collect: False keeps nothing but a short tail (containers running several
            activations at once, whose lines cannot be told apart).
    """

    def __init__(self, stream: str, pipe: IO[bytes], limit_bytes: int, collect: bool = True):
        self.stream = stream
        self._limit = limit_bytes
        self._collect = collect
        self._cond = threading.Condition()
        self._current = _Segment()
        self._done: deque[_Segment] = deque()
        self._tail: deque[str] = deque(maxlen=20)
        self._orphans = 0
        self._eof = False
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True, name=f"log-{stream}")
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            now = time.time()
            with self._cond:
                # A line printed without a newline ends up in front of the sentinel.
                ends = text.endswith(SENTINEL)
                if ends:
                    text = text[: -len(SENTINEL)]
                if text or not ends:
                    self._tail.append(text)
                    if self._collect:
                        self._add(now, text)
                if ends:
                    # The rest of a segment already taken without its sentinel is dropped,
                    # or every later activation would get its predecessor's lines.
                    if self._orphans:
                        self._orphans -= 1
                    else:
                        self._done.append(self._current)
                    self._current = _Segment()
                    self._cond.notify_all()
        pipe.close()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _add(self, now: float, text: str) -> None:
        size = len(text.encode()) + 1
        if self._current.size + size > self._limit:
            self._current.truncated = True
        else:
            self._current.lines.append((now, text))
            self._current.size += size

    def clear(self) -> None:
        """Forgets everything read so far (start-up output that belongs to no activation)."""
        with self._cond:
            self._current = _Segment()
            self._done.clear()
            self._orphans = 0

    def take(self, deadline: float) -> _Segment:
        """The lines of the oldest finished activation, waiting until ``deadline``
        (``time.monotonic()`` seconds) for its sentinel; after that, or at EOF, whatever
        was read so far."""
        with self._cond:
            self._cond.wait_for(lambda: self._done or self._eof, timeout=max(0.0, deadline - time.monotonic()))
            if self._done:
                return self._done.popleft()
            if not self._eof:
                self._orphans += 1
            segment, self._current = self._current, _Segment()
            return segment

    def tail(self) -> list[str]:
        """The last lines read (at most 20), for error messages."""
        with self._cond:
            return list(self._tail)

    def join(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for EOF."""
        self._thread.join(timeout)


_ports_lock = threading.Lock()
_ports_in_use: set[int] = set()


def _reserve_port() -> int:
    # Two containers started at once could be handed the same free port by the OS.
    with _ports_lock:
        while True:
            port = free_port()
            if port not in _ports_in_use:
                _ports_in_use.add(port)
                return port


class Container:
    """One running ``torpor runtime`` process for one action.

    Use :meth:`start`; the pool tracks ``active`` (runs in progress) and ``last_used``.
    """

    def __init__(self, spec: ActionSpec, proc: subprocess.Popen, port: int, workdir: str):
        self.spec = spec
        self.proc = proc
        self.port = port
        self.workdir = workdir
        self.active = 0
        self.retired = False
        self.last_used = time.monotonic()
        collect = spec.concurrency == 1
        self.stdout = LogStream("stdout", proc.stdout, spec.log_limit_bytes, collect)
        self.stderr = LogStream("stderr", proc.stderr, spec.log_limit_bytes, collect)
        self._stopped = False
        self._kill_lock = threading.Lock()

    @classmethod
    def start(cls, spec: ActionSpec, command: list[str], env: dict[str, str], timeout_s: float) -> "Container":
        """Starts a runtime process and waits until its port accepts connections.

        Args:
            spec: the action the container will serve.
            command: the runtime's command line (see :func:`runtime_command`).
            env: its environment; ``PORT`` and ``TORPOR_ACTION_DIR`` are added.
            timeout_s: time the process has to open its port (s).

        Raises:
            ContainerError: the process exited or did not listen within ``timeout_s``.
        """
        port = _reserve_port()
        workdir = tempfile.mkdtemp(prefix=f"torpor-{spec.name.replace('/', '-')}-")
        try:
            # The runtime unpacks the action's code under TORPOR_ACTION_DIR: inside the working
            # folder it goes away with the container, even after a SIGKILL.
            proc = subprocess.Popen(command, env={**env, "PORT": str(port), "TORPOR_ACTION_DIR": workdir},
                                    cwd=workdir, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            with _ports_lock:
                _ports_in_use.discard(port)
            raise ContainerError(f"cannot start the action runtime {command}: {exc}") from exc
        container = cls(spec, proc, port, workdir)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                container.stderr.join(1.0)
                container.kill()
                raise ContainerError(f"the action runtime exited with status {proc.returncode} before listening: "
                                     + " | ".join(container.stderr.tail()[-5:]))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return container
            except OSError:
                if time.monotonic() > deadline:
                    container.kill()
                    raise ContainerError(f"the action runtime did not listen on port {port} within {timeout_s} s")
                time.sleep(0.02)

    def alive(self) -> bool:
        """True while the process runs and was not stopped."""
        return not self._stopped and self.proc.poll() is None

    def init(self) -> None:
        """``POST /init`` with the action's code; output written before it is discarded.

        Raises:
            InitError: the runtime refused the code, timed out or died; the caller removes
                the container.
        """
        self.stdout.clear()
        self.stderr.clear()
        timeout_ms = self.spec.timeout_ms
        try:
            status, body = self._post("/init", {"value": self.spec.init}, timeout_ms / 1000, timeout_ms / 1000)
        except TimeoutError:
            raise InitError(f"The action exceeded its time limits of {timeout_ms} milliseconds during initialization.",
                            self.logs(0.0)) from None
        except ConnectionError:
            raise InitError("The action did not initialize and exited unexpectedly.", self.logs(0.1)) from None
        if status == 200:
            return
        text = body.decode("utf-8", "replace")
        try:
            message = json.loads(body).get("error") or text
        except (ValueError, AttributeError):
            message = text or f"status {status}"
        raise InitError(str(message), self.logs(0.1))

    def run(self, payload: dict, timeout_s: float) -> tuple[int, bytes]:
        """``POST /run``; returns (HTTP status, body) with the body cut at one byte over
        :data:`MAX_RESULT_BYTES`.

        Raises:
            TimeoutError: no connection within :data:`CONNECT_TIMEOUT_S`, or no answer
                within ``timeout_s`` seconds.
            ConnectionError: the process died, refused the connection or broke the answer.
        """
        return self._post("/run", payload, CONNECT_TIMEOUT_S, timeout_s)

    def _post(self, path: str, payload: dict, connect_timeout_s: float, timeout_s: float) -> tuple[int, bytes]:
        # http.client rather than requests: on this hot path requests' session machinery
        # (adapters, hooks, cookie jar, header merging) cost 1-2.4 ms per activation in
        # interleaved A/B runs on a 2-core VM (bench/README.md, bench/overhead.py).
        # A new connection per request, as the runtime's gunicorn sync worker closes each one.
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=connect_timeout_s)
        try:
            conn.connect()
            conn.sock.settimeout(timeout_s)
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
            except BrokenPipeError:
                pass  # a runtime that refuses a body may answer and close before reading it all (as urllib3 allows)
            resp = conn.getresponse()
            return resp.status, resp.read(MAX_RESULT_BYTES + 1)
        except TimeoutError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionError(f"{path} of the action runtime on port {self.port} failed: {exc!r}") from exc
        finally:
            conn.close()

    def logs(self, wait_s: float = 0.1) -> list[str]:
        """Log lines of the activation that just ended, in OpenWhisk format, stdout and stderr
        merged by time, capped at the action's log limit; waits up to ``wait_s`` seconds for
        the sentinel on both streams. Empty when the container runs several activations at once."""
        if self.spec.concurrency != 1:
            return []
        deadline = time.monotonic() + wait_s
        out, err = self.stdout.take(deadline), self.stderr.take(deadline)
        lines = sorted([(t, "stdout", s) for t, s in out.lines] + [(t, "stderr", s) for t, s in err.lines],
                       key=lambda line: line[0])
        formatted, size, truncated = [], 0, out.truncated or err.truncated
        for t, stream, text in lines:
            size += len(text.encode()) + 1
            if size > self.spec.log_limit_bytes:
                truncated = True
                break
            formatted.append(format_log_line(t, stream, text))
        if truncated:
            formatted.append(format_log_line(time.time(), "stderr", _TRUNCATED.format(self.spec.log_limit_bytes)))
        return formatted

    def kill(self, grace_s: float = 0.0) -> None:
        """Stops the process group: SIGTERM and up to ``grace_s`` seconds, then SIGKILL; removes
        the working folder. Safe to call twice. (Its processes' tensor segments are memfds:
        the kernel frees them with the last descriptor and mapping, protocol.Segment.)"""
        with self._kill_lock:
            if self._stopped:
                return
            self._stopped = True
        if grace_s > 0 and self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive its leader (gunicorn workers), so it is killed even then.
        self._signal(signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        with _ports_lock:
            _ports_in_use.discard(self.port)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class ContainerPool:
    """Warm containers per action; one run at a time per container unless the action's
    concurrency allows more.

    Args:
        command: the runtime's command line.
        env: the runtime's environment.
        start_timeout_s: time a new process has to open its port (s).
        max_per_action: containers (warm or starting) per action at most; further
            activations wait for a free one.
        idle_timeout_s: a container unused this long is stopped (s).
        max_total: containers of all actions together at most; at the cap a new container
            replaces the least recently used idle one, or waits for one to become idle.
    """

    def __init__(self, command: list[str], env: dict[str, str], start_timeout_s: float = 30.0,
                 max_per_action: int = 4, idle_timeout_s: float = 600.0, max_total: int = 128):
        self._command = command
        self._env = env
        self._start_timeout_s = start_timeout_s
        self._max = max(1, max_per_action)
        self._max_total = max(1, max_total)
        self._idle_timeout_s = idle_timeout_s
        self._cond = threading.Condition()
        self._warm: dict[tuple[str, str, str], list[Container]] = {}
        self._starting: dict[tuple[str, str, str], int] = {}
        self._newest: dict[tuple[str, str], tuple[int, tuple[str, str, str]]] = {}  # action → (updated, key)
        self._all: set[Container] = set()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True, name="container-reaper")
        self._reaper.start()

    def acquire(self, spec: ActionSpec) -> tuple[Container, float | None]:
        """A container for ``spec`` with a run slot reserved: a warm one, else a new one
        (started and initialised here), else the first to come free.

        Returns:
            (container, init_ms): ``init_ms`` is the time spent starting and initialising
            a new container (ms), None for a warm one. Give it back with :meth:`release`.

        Raises:
            InitError: a new container's ``/init`` failed (the container is gone).
            ContainerError: a new container did not start.
            PoolClosed: the pool was closed.
        """
        key = spec.key
        with self._cond:
            # an activation of an older revision (accepted before an update) runs in a
            # container of its own, stopped after it: it retires nothing of the newer one
            stale = self._retire_others(key) if self._is_newest(spec) else []
            while True:
                if self._closed.is_set():
                    raise PoolClosed()
                for container in self._warm.get(key, []):
                    if container.active < spec.concurrency and container.alive():
                        container.active += 1
                        break
                else:
                    container = None
                if container is not None:
                    break
                dead = [c for c in self._warm.get(key, []) if c.active == 0 and not c.alive()]
                for c in dead:
                    self._forget(c)
                stale += dead
                if len(self._warm.get(key, [])) + self._starting.get(key, 0) < self._max:
                    if self._total() >= self._max_total:
                        victim = self._least_recently_used_idle()
                        if victim is not None:
                            self._forget(victim)
                            stale.append(victim)
                    if self._total() < self._max_total:
                        self._starting[key] = self._starting.get(key, 0) + 1
                        break
                self._cond.wait(1.0)
        for c in stale:
            c.kill()
        if container is not None:
            return container, None
        return self._start(spec)

    def _start(self, spec: ActionSpec) -> tuple[Container, float]:
        key = spec.key
        t0 = time.monotonic()
        container = None
        try:
            container = Container.start(spec, self._command, self._env, self._start_timeout_s)
            with self._cond:
                self._all.add(container)
            container.init()
        except BaseException:
            with self._cond:
                self._starting[key] -= 1
                if container is not None:
                    self._all.discard(container)
                self._cond.notify_all()
            if container is not None:
                container.kill()
            if self._closed.is_set():
                raise PoolClosed() from None
            raise
        init_ms = (time.monotonic() - t0) * 1000
        with self._cond:
            self._starting[key] -= 1
            closed = self._closed.is_set()
            if not closed:
                container.active = 1
                if self._newest.get(key[:2], (0, key))[1] == key:
                    self._warm.setdefault(key, []).append(container)
                else:  # a newer revision came while it started: it serves this activation only
                    container.retired = True
        if closed:
            container.kill()
            raise PoolClosed()
        log.info("started a container for %s/%s on port %d in %.0f ms", spec.namespace, spec.name,
                 container.port, init_ms)
        return container, init_ms

    def release(self, container: Container, discard: bool = False) -> None:
        """Gives back a run slot; ``discard`` (or a dead or retired container) stops it."""
        with self._cond:
            container.active -= 1
            container.last_used = time.monotonic()
            stop = discard or container.retired or not container.alive()
            if stop:
                self._forget(container)
            self._cond.notify_all()
        if stop:
            container.kill()

    def _total(self) -> int:
        return sum(len(cs) for cs in self._warm.values()) + sum(self._starting.values())

    def _least_recently_used_idle(self) -> Container | None:
        idle = [c for cs in self._warm.values() for c in cs if c.active == 0]
        return min(idle, key=lambda c: c.last_used, default=None)

    def _forget(self, container: Container) -> None:
        containers = self._warm.get(container.spec.key, [])
        if container in containers:
            containers.remove(container)
            if not containers:
                del self._warm[container.spec.key]
        self._all.discard(container)

    def _is_newest(self, spec: ActionSpec) -> bool:
        """Whether ``spec`` is the newest revision of its action seen (recording it if so)."""
        newest = self._newest.get(spec.key[:2])
        if newest is None or spec.updated >= newest[0]:
            self._newest[spec.key[:2]] = (spec.updated, spec.key)
            return True
        return newest[1] == spec.key

    def _retire_others(self, key: tuple[str, str, str]) -> list[Container]:
        """Takes containers of other versions of the same action out of the pool; returns the
        idle ones (to stop) and marks busy ones to stop on release."""
        idle = []
        for other in [k for k in self._warm if k[:2] == key[:2] and k != key]:
            for container in list(self._warm[other]):
                container.retired = True
                if container.active == 0:
                    self._forget(container)
                    idle.append(container)
            self._warm.pop(other, None)
        return idle

    def size(self, namespace: str | None = None, name: str | None = None) -> int:
        """Number of warm containers (of one action when namespace and name are given)."""
        with self._cond:
            return sum(len(cs) for key, cs in self._warm.items()
                       if namespace is None or key[:2] == (namespace, name))

    def containers(self) -> list[Container]:
        """A snapshot of every container the pool holds (warm, busy or starting)."""
        with self._cond:
            return list(self._all)

    def _reap_loop(self) -> None:
        period = min(1.0, max(0.05, self._idle_timeout_s / 4))
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._cond:
                idle = [c for cs in self._warm.values() for c in cs
                        if c.active == 0 and (now - c.last_used > self._idle_timeout_s or not c.alive())]
                for container in idle:
                    self._forget(container)
            for container in idle:
                log.info("stopping idle container of %s/%s", container.spec.namespace, container.spec.name)
                container.kill(grace_s=2.0)

    def close(self) -> None:
        """Kills every container, busy or not; later :meth:`acquire` calls raise PoolClosed."""
        with self._cond:
            self._closed.set()
            containers = list(self._all)
            self._warm.clear()
            self._all.clear()
            self._cond.notify_all()
        for container in containers:
            container.kill()
        self._reaper.join(2.0)
