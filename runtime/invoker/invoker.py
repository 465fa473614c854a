"""The invoker (``torpor invoker``): the node agent that runs activations.

It registers the node in Redis and keeps its liveness key fresh, moves activation messages
from ``torpor:node:{id}:queue`` to ``torpor:node:{id}:inflight`` (``BLMOVE``), and runs each on
a thread: prefetch of the action's models on the GPU server (late binding: the swap-in
overlaps with everything that follows), a warm or new action container, ``/run``, and the
final OpenWhisk activation record, stored with ``controller_plugin.state.finish_activation``
(``docs/architecture.md``, ``docs/invoker.md``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import click
import redis
import requests

from controller_plugin import state
from controller_plugin.state import APPLICATION_ERROR, DEVELOPER_ERROR, SUCCESS, WHISK_ERROR
from runtime.invoker.config import InvokerSettings
from runtime.invoker.containers import (
    MAX_RESULT_BYTES, ActionSpec, Container, ContainerError, ContainerPool, InitError, PoolClosed,
    runtime_command, runtime_env,
)
from runtime.settings import from_kwargs, options

log = logging.getLogger(__name__)

ALIVE_TTL_MS = 3000
HEARTBEAT_S = 1.0
# BLMOVE blocks at most this long, so a stop request is noticed within it.
POLL_S = 1.0
PREFETCH_THREADS = 4
PREFETCH_TIMEOUT_S = 10.0
DEFAULT_LIMITS = {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1}


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


@dataclass
class Outcome:
    """How an activation ended: OpenWhisk status code (0..3), result, logs, and the cold start."""

    status_code: int
    result: object
    logs: list[str] = field(default_factory=list)
    init_ms: float | None = None
    timed_out: bool = False


class _Requeue(Exception):
    """The message goes back onto the node's queue instead of getting a record."""

    def __init__(self, message: dict):
        super().__init__()
        self.message = message


def _error(status_code: int, text: str, **kw) -> Outcome:
    return Outcome(status_code, {"error": text}, **kw)


def action_limits(action: dict | None) -> dict:
    """The action's limits (timeout ms, memory MB, logs MB, concurrency) with OpenWhisk's defaults
    for the missing ones."""
    return {**DEFAULT_LIMITS, **((action or {}).get("limits") or {})}


def action_parameters(action: dict) -> tuple[dict, dict[str, str]]:
    """Splits the action's parameters (a list of ``{key, value, init?}`` or a plain object) into
    default arguments of each run and the env given at ``/init`` (``init: true``, as strings)."""
    params = action.get("parameters") or []
    if isinstance(params, dict):
        return dict(params), {}
    run, env = {}, {}
    for p in params:
        if not isinstance(p, dict) or "key" not in p:
            continue
        value = p.get("value")
        if p.get("init"):
            env[str(p["key"])] = value if isinstance(value, str) else json.dumps(value)
        else:
            run[str(p["key"])] = value
    return run, env


def action_spec(namespace: str, name: str, action: dict, raw: bytes, timeout_ms: int) -> ActionSpec:
    """What the container pool needs from the action record ``raw`` (OpenWhisk shape, parsed
    as ``action``) of ``namespace``/``name``; ``timeout_ms`` is the activation's time limit.

    Raises:
        ValueError: the record has no ``exec`` object or non-numeric limits.
    """
    exec_ = action.get("exec")
    if not isinstance(exec_, dict):
        raise ValueError("the action record has no exec object")
    limits = action_limits(action)
    _, env = action_parameters(action)
    return ActionSpec(
        namespace=namespace, name=name, version=str(action.get("version")),
        digest=hashlib.blake2b(raw, digest_size=16).hexdigest(),
        init={"name": name, "main": exec_.get("main") or "main", "code": exec_.get("code") or "",
              "binary": bool(exec_.get("binary")), "env": env},
        timeout_ms=int(timeout_ms), concurrency=max(1, int(limits["concurrency"])),
        log_limit_bytes=int(float(limits["logs"]) * 1024 * 1024),
    )


def interpret(status: int, body: bytes) -> Outcome:
    """Maps a ``/run`` answer (status, body cut at one byte over the result limit) to an outcome,
    as OpenWhisk does: 200 + object/array is success, 200 + ``{"error"}`` an application
    error, anything else an action developer error."""
    if len(body) > MAX_RESULT_BYTES:
        return _error(DEVELOPER_ERROR,
                      f"The action produced a response that exceeded the allowed length of {MAX_RESULT_BYTES} bytes.")
    try:
        result = json.loads(body)
    except ValueError:
        result = None
    if isinstance(result, dict) and "error" in result:
        return Outcome(APPLICATION_ERROR if status == 200 else DEVELOPER_ERROR, {"error": result["error"]})
    if status == 200 and isinstance(result, (dict, list)):
        return Outcome(SUCCESS, result)
    text = body[:1000].decode("utf-8", "replace")
    return _error(DEVELOPER_ERROR, f"The action did not produce a valid JSON response: {text}")


class Invoker:
    """One node's invoker. :meth:`start` registers the node and starts the heartbeat, the
    queue consumer and the optional health server (threads); :meth:`stop` ends them.

    Args:
        settings: the invoker's configuration.
        command: the action runtime's command line (default: :func:`runtime_command`).

    Raises:
        FileNotFoundError: no ``torpor`` script to start action runtimes with.
    """

    def __init__(self, settings: InvokerSettings, command: list[str] | None = None):
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url)
        node_id = settings.node_id
        self.node_key, self.alive_key = state.node_key(node_id), state.alive_key(node_id)
        self.queue_key, self.inflight_key = state.queue_key(node_id), state.inflight_key(node_id)
        # Runtimes run in their own working folders, so a relative socket path would not reach.
        self.gpu_socket = os.path.abspath(settings.gpu_socket) if settings.gpu_socket else ""
        self.pool = ContainerPool(command or runtime_command(), runtime_env(self.gpu_socket, settings.api_host),
                                  start_timeout_s=settings.container_start_timeout_s,
                                  max_per_action=settings.max_containers_per_action,
                                  idle_timeout_s=settings.idle_timeout_s)
        self._executor = ThreadPoolExecutor(max(1, settings.pool_size), thread_name_prefix="activation")
        self._slots = threading.BoundedSemaphore(max(1, settings.pool_size))
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._running = 0
        self._running_cond = threading.Condition()
        # GPUServerClient keeps one socket per thread, so the prefetch threads share one.
        self._gpu_client = None
        self._prefetcher = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch")
        self._threads: list[threading.Thread] = []
        self._http = None

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> "Invoker":
        """Registers the node, puts back messages a previous run left in flight, and starts
        the heartbeat, the consumer and (``http_port`` > 0) the health server.

        Raises:
            redis.RedisError: Redis unreachable.
        """
        started = now_ms()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(state.NODES_KEY, self.settings.node_id)
            pipe.hset(self.node_key, mapping={"last_seen": started, "started": started,
                                              "gpu_socket": self.gpu_socket, "invoker_pid": os.getpid()})
            pipe.set(self.alive_key, 1, px=ALIVE_TTL_MS)
            pipe.execute()
        recovered = 0
        # A restart faster than the alive TTL leaves the controller unaware of the old run's
        # in-flight messages; LMOVE moves each one exactly once even if the controller also acts.
        while self.redis.lmove(self.inflight_key, self.queue_key, "LEFT", "RIGHT") is not None:
            recovered += 1
        if recovered:
            log.warning("re-queued %d activations left in flight by a previous invoker", recovered)
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._consume_loop, "consumer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.settings.http_port:
            self._start_http()
        log.info("invoker of node %s consuming %s", self.settings.node_id, self.queue_key)
        return self

    def stop(self) -> None:
        """Stops consuming, lets running activations finish for ``shutdown_grace_s``, re-queues
        the rest, stops every container and deletes the node's alive key. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for thread in self._threads:
            if thread.name == "consumer":
                thread.join()
        if not self._wait_idle(self.settings.shutdown_grace_s):
            log.warning("re-queueing %d running activations", self._running)
            self._abandon.set()
        self.pool.close()
        self._wait_idle(2.0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        self._heartbeat_stop.set()
        for thread in self._threads:
            thread.join()
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.alive_key)
                pipe.hset(self.node_key, "last_seen", now_ms())
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not delete %s: %s", self.alive_key, exc)
        if self._http is not None:
            self._http.shutdown()
        self.redis.close()
        log.info("invoker of node %s stopped", self.settings.node_id)

    def _wait_idle(self, timeout_s: float) -> bool:
        with self._running_cond:
            return self._running_cond.wait_for(lambda: self._running == 0, timeout=timeout_s)

    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(HEARTBEAT_S):
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(self.alive_key, 1, px=ALIVE_TTL_MS)
                    pipe.hset(self.node_key, "last_seen", now_ms())
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _consume_loop(self) -> None:
        while not self._stopping.is_set():
            # A slot per message taken: messages this node cannot start yet stay in its queue.
            if not self._slots.acquire(timeout=POLL_S):
                continue
            try:
                raw = self.redis.blmove(self.queue_key, self.inflight_key, POLL_S, "RIGHT", "LEFT")
            except redis.RedisError as exc:
                self._slots.release()
                log.warning("reading %s failed: %s", self.queue_key, exc)
                self._stopping.wait(POLL_S)
                continue
            if raw is None:
                self._slots.release()
                continue
            with self._running_cond:
                self._running += 1
            self._executor.submit(self._handle, raw)

    def _handle(self, raw: bytes) -> None:
        try:
            self._process(raw)
        except Exception:
            log.exception("activation message %r failed", raw[:200])
        finally:
            self._slots.release()
            with self._running_cond:
                self._running -= 1
                self._running_cond.notify_all()

    # --- one activation --------------------------------------------------------------------

    def _process(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
            if not isinstance(msg, dict) or not all(isinstance(msg.get(k), str) for k in
                                                    ("activationId", "namespace", "action")):
                raise ValueError("activationId, namespace and action must be strings")
        except ValueError as exc:
            log.error("dropping a malformed activation message %r: %s", raw[:200], exc)
            self.redis.lrem(self.inflight_key, 1, raw)
            return
        try:
            record = self.run_activation(msg)
        except _Requeue as requeue:
            self._requeue(raw, requeue.message)
            return
        state.finish_activation(self.redis, record)
        self.redis.lrem(self.inflight_key, 1, raw)
        log.info("activation %s of %s/%s: %s in %d ms", msg["activationId"], msg["namespace"], msg["action"],
                 record["response"]["status"], record["duration"])

    def _requeue(self, raw: bytes, msg: dict) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self.queue_key, json.dumps(msg))
            pipe.lrem(self.inflight_key, 1, raw)
            pipe.execute()
        log.info("re-queued activation %s (attempt %s)", msg["activationId"], msg.get("attempt"))

    def run_activation(self, msg: dict) -> dict:
        """Runs one activation message (``docs/architecture.md``) and returns its final record.

        Raises:
            _Requeue: the message must go back onto the queue (runtime shutting down, or the
                invoker stopping before it could run).
        """
        start = now_ms()
        self._prefetch(msg.get("models") or [], msg.get("gpu"))
        action, outcome = self._execute(msg)
        return self._record(msg, action, start, outcome)

    def _execute(self, msg: dict) -> tuple[dict | None, Outcome]:
        ns, name = msg["namespace"], msg["action"]
        raw = self.redis.hget(state.actions_key(ns), name)
        if raw is None:
            return None, _error(WHISK_ERROR, f"The action {ns}/{name} no longer exists: "
                                                "it was deleted after the activation was submitted.")
        try:
            action = json.loads(raw)
            timeout_ms = msg.get("timeout_ms") or action_limits(action)["timeout"]
            spec = action_spec(ns, name, action, raw, timeout_ms)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return None, _error(WHISK_ERROR, f"The action record of {ns}/{name} is malformed: {exc}")
        if msg.get("version") is not None and action.get("version") != msg["version"]:
            return action, _error(WHISK_ERROR, f"The action {ns}/{name} was updated to version "
                                                  f"{action.get('version')} after an activation of version "
                                                  f"{msg['version']} was submitted.")
        t0 = time.monotonic()
        try:
            container, init_ms = self.pool.acquire(spec)
        except InitError as exc:
            return action, _error(DEVELOPER_ERROR, exc.message, logs=exc.logs, init_ms=(time.monotonic() - t0) * 1000)
        except ContainerError as exc:
            return action, _error(WHISK_ERROR, f"The action's container did not start: {exc}")
        except PoolClosed:
            raise _Requeue(msg) from None
        outcome = self._run(msg, action, spec, container)
        outcome.init_ms = init_ms
        return action, outcome

    def _run(self, msg: dict, action: dict, spec: ActionSpec, container: Container) -> Outcome:
        defaults, _ = action_parameters(action)
        params = msg.get("params")
        value = {**defaults, **params} if isinstance(params, dict) else (params if params is not None else defaults)
        payload = {"value": value, "namespace": spec.namespace, "action_name": f"/{spec.namespace}/{spec.name}",
                   "action_version": spec.version, "activation_id": msg["activationId"],
                   "transaction_id": msg.get("transactionId") or msg["activationId"],
                   "deadline": str(now_ms() + spec.timeout_ms)}
        discard = True
        try:
            status, body = container.run(payload, spec.timeout_ms / 1000)
        except requests.Timeout:
            container.kill()
            return _error(DEVELOPER_ERROR, f"The action exceeded its time limits of {spec.timeout_ms} milliseconds.",
                          logs=container.logs(0.1), timed_out=True)
        except requests.RequestException:
            if self._abandon.is_set():
                raise _Requeue(msg) from None
            return _error(DEVELOPER_ERROR, "The action did not produce a valid response and exited unexpectedly.",
                          logs=container.logs(0.1))
        else:
            if status == 503:
                attempt = int(msg.get("attempt") or 1)
                if attempt < 2:
                    raise _Requeue({**msg, "attempt": attempt + 1})
                return _error(WHISK_ERROR, "The action's runtime was shutting down (503) twice.")
            discard = False
            outcome = interpret(status, body)
            outcome.logs = container.logs(0.1)
            return outcome
        finally:
            self.pool.release(container, discard=discard)

    def _record(self, msg: dict, action: dict | None, start: int, outcome: Outcome) -> dict:
        end = now_ms()
        ns, name = msg["namespace"], msg["action"]
        annotations = [{"key": "path", "value": f"{ns}/{name}"}]
        if action is not None:
            annotations.append({"key": "kind", "value": (action.get("exec") or {}).get("kind")})
            annotations.append({"key": "limits", "value": action_limits(action)})
        submitted = msg.get("submitted")
        annotations.append({"key": "waitTime", "value": max(0, start - int(submitted)) if submitted else 0})
        if outcome.init_ms is not None:
            annotations.append({"key": "initTime", "value": int(round(outcome.init_ms))})
        if outcome.timed_out:
            annotations.append({"key": "timeout", "value": True})
        return {
            "activationId": msg["activationId"], "namespace": ns, "name": name,
            "version": msg.get("version") or (action or {}).get("version"),
            "subject": msg.get("subject") or ns, "start": start, "end": end, "duration": end - start,
            "response": state.response_for(outcome.status_code, outcome.result),
            "logs": outcome.logs, "annotations": annotations, "publish": False,
        }

    def _prefetch(self, models: list[str], gpu: int | None) -> None:
        """Asks the GPU server to start swapping each model in, on the prefetch threads: the
        activation never waits for the answer. Failures are only logged, since the action's
        own model call loads the model anyway."""
        if not models or not self.gpu_socket:
            return
        for model in models:
            self._prefetcher.submit(self._prefetch_one, model, gpu)

    def _prefetch_one(self, model: str, gpu: int | None) -> None:
        try:
            if self._gpu_client is None:
                from runtime.client import GPUServerClient

                self._gpu_client = GPUServerClient(self.gpu_socket, timeout_s=PREFETCH_TIMEOUT_S)
            self._gpu_client.prefetch(model, gpu)
        except Exception as exc:
            log.warning("prefetch of %s failed: %s", model, exc)

    # --- health server ---------------------------------------------------------------------

    def _start_http(self) -> None:
        from flask import Flask, jsonify
        from werkzeug.serving import make_server

        app = Flask("torpor-invoker")

        @app.get("/healthz")
        def healthz():
            return jsonify({"ok": True, "node": self.settings.node_id})

        @app.get("/readyz")
        def readyz():
            if self._stopping.is_set():
                return jsonify({"ready": False, "error": "stopping"}), 503
            try:
                self.redis.ping()
            except redis.RedisError as exc:
                return jsonify({"ready": False, "error": f"Redis unreachable: {exc}"}), 503
            return jsonify({"ready": True, "node": self.settings.node_id, "containers": self.pool.size()})

        self._http = make_server(self.settings.http_host, self.settings.http_port, app, threaded=True)
        thread = threading.Thread(target=self._http.serve_forever, name="http", daemon=True)
        thread.start()
        log.info("health server on %s:%d", self.settings.http_host, self._http.server_port)


@click.command("invoker")
@options(InvokerSettings)
def command(**kwargs) -> None:
    """Run this node's invoker: consume torpor:node:{id}:queue and run the actions."""
    settings = from_kwargs(InvokerSettings, kwargs)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        invoker = Invoker(settings).start()
    except (FileNotFoundError, redis.RedisError) as exc:
        raise click.ClickException(str(exc)) from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    invoker.stop()
