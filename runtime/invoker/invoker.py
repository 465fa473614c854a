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
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import click
import redis

from controller_plugin import attainment, state
from controller_plugin.api import models_of
from controller_plugin.routing import AlreadyMoved, build_picker, check_picker_settings
from controller_plugin.state import APPLICATION_ERROR, DEVELOPER_ERROR, SUCCESS, WHISK_ERROR
from runtime.gpu_server import tokens
from runtime.invoker.config import InvokerSettings
from runtime.invoker.containers import (
    MAX_RESULT_BYTES, ActionSpec, Container, ContainerError, ContainerPool, InitError, PoolClosed,
    runtime_command, runtime_env,
)
from runtime.log_format import LogSettings, configure_from_kwargs
from runtime.settings import from_kwargs, options

log = logging.getLogger(__name__)

ALIVE_TTL_MS = 3000
HEARTBEAT_S = 1.0
# BLMOVE blocks at most this long, so a stop request is noticed within it.
POLL_S = 1.0
PREFETCH_THREADS = 4
PREFETCH_TIMEOUT_S = 10.0
GPU_PROBE_TIMEOUT_S = 1.0
# A GPU server whose liveness key lapsed while its socket still accepts connections is alive
# but stalled (its key-renewing thread got no GIL for a while: a CUDA graph instantiation or a
# pinned allocation can hold it for seconds, as on a 2xH200 node warming 200 functions); it
# counts as down, hung, only after this long.
GPU_STALL_GRACE_S = 10.0
# In-flight messages no worker here runs are looked for after every Redis failure, and this
# often anyway (a move whose answer a crash swallowed leaves no error behind).
ORPHAN_SCAN_S = 10.0
# Longest pause between two tries to store a final record while Redis is unreachable.
FINISH_RETRY_MAX_S = 2.0
# Moves one message from in flight back to the queue only if it is still in flight, so that a
# message a worker finishes at the same moment is not run again.
RECLAIM_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
ACTION_CACHE = 256  # parsed action records kept (least recently used dropped first)
DEFAULT_LIMITS = {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1}


def socket_accepts(path: str, timeout_s: float = 0.2) -> bool:
    """Whether a process listens on the Unix socket ``path``: the kernel completes a
    connection into the listen backlog even while the listener is too busy to accept it, and
    refuses it once the listener is gone."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


@dataclass
class Outcome:
    """How an activation ended: OpenWhisk status code (0..3), result, logs, and the cold start;
    ``result_json`` is the result as the runtime's JSON text when it is stored verbatim."""

    status_code: int
    result: object
    logs: list[str] = field(default_factory=list)
    init_ms: float | None = None
    timed_out: bool = False
    result_json: str | None = None


class _Redispatched(Exception):
    """The message was queued on another node; this node drops it without a record."""


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


def action_spec(namespace: str, name: str, action: dict, raw: bytes, timeout_ms: int,
                node_secret: str = "") -> ActionSpec:
    """What the container pool needs from the action record ``raw`` (OpenWhisk shape, parsed
    as ``action``) of ``namespace``/``name``; ``timeout_ms`` is the activation's time limit.
    With a ``node_secret`` the init env holds ``TORPOR_FUNCTION_TOKEN``, the action's token
    for the models of its ``model`` annotation (``runtime.gpu_server.tokens``).

    Raises:
        ValueError: the record has no ``exec`` object, non-numeric limits or a malformed
            ``model`` annotation.
    """
    exec_ = action.get("exec")
    if not isinstance(exec_, dict):
        raise ValueError("the action record has no exec object")
    limits = action_limits(action)
    _, env = action_parameters(action)
    if node_secret:
        models = models_of(action.get("annotations") or [])
        env = {**env, "TORPOR_FUNCTION_TOKEN": tokens.function_token(node_secret, namespace, name, models)}
    return ActionSpec(
        namespace=namespace, name=name, version=str(action.get("version")),
        digest=hashlib.blake2b(raw, digest_size=16).hexdigest(),
        # as OpenWhisk's invoker does, the action's identity is in the env at import time
        # (runtime.remote names the action's own models with it)
        init={"name": name, "main": exec_.get("main") or "main", "code": exec_.get("code") or "",
              "binary": bool(exec_.get("binary")),
              "env": {"__OW_NAMESPACE": namespace, "__OW_ACTION_NAME": f"/{namespace}/{name}", **env}},
        timeout_ms=int(timeout_ms), concurrency=max(1, int(limits["concurrency"])),
        log_limit_bytes=int(float(limits["logs"]) * 1024 * 1024),
        updated=int(action.get("updated") or 0),
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
        # stored as the runtime wrote it (state.record_json); json.loads also reads UTF-16 and
        # UTF-32 (with or without a byte order mark) and UTF-8 with one, which the stored
        # record's text may not hold: those are encoded again. Parsed, so valid UTF-8 if utf-8
        text = body.decode("utf-8") if json.detect_encoding(body) == "utf-8" else None
        return Outcome(SUCCESS, result, result_json=text)
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
        self.pool = ContainerPool(command or runtime_command(),
                                  runtime_env(self.gpu_socket, settings.api_host, settings.max_payload_bytes),
                                  start_timeout_s=settings.container_start_timeout_s,
                                  max_per_action=settings.max_containers_per_action,
                                  idle_timeout_s=settings.idle_timeout_s, max_total=settings.max_containers)
        self.gpu_alive_key = f"{self.node_key}:gpu"
        self._admin_token = tokens.admin_token(settings.node_secret) if settings.node_secret else ""
        self._picker = build_picker(self.redis, settings.profiles, settings.gpu_kind, settings.device_slots)
        self._reclaim = self.redis.register_script(RECLAIM_LUA)
        self._recorder = attainment.Recorder(self.redis)
        # GPU server liveness as the invoker last saw it: None until its key was first seen
        # (a node without a GPU server, or one still starting, keeps taking work)
        self._gpu_up: bool | None = None
        self._gpu_lapsed_since: float | None = None  # monotonic time its liveness key was first missed
        self._gpu_outages = 0
        self._gpu_lock = threading.Lock()
        # messages BLMOVEd by this process and not yet finished; anything else in flight after
        # a Redis failure is an orphan to put back on the queue
        self._active: set[bytes] = set()
        self._active_lock = threading.Lock()
        self._rescan = threading.Event()
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
        # (namespace, name, revision, timeout ms of the message) -> (parsed record, spec): a
        # revision id names one write of a record, so what is parsed from it never changes
        self._actions: OrderedDict[tuple[str, str, str, int | None], tuple[dict, ActionSpec]] = OrderedDict()
        self._actions_lock = threading.Lock()

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
                self._watch_gpu()
                with self.redis.pipeline(transaction=False) as pipe:
                    if self._gpu_up is not False:
                        pipe.set(self.alive_key, 1, px=ALIVE_TTL_MS)
                    if self._gpu_up is not None:
                        pipe.hset(self.node_key, "gpu_server", "up" if self._gpu_up else "down")
                    pipe.hset(self.node_key, "last_seen", now_ms())
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    # --- the node's GPU server -------------------------------------------------------------

    def _watch_gpu(self) -> None:
        """Follows the GPU server's liveness key ``torpor:node:{id}:gpu`` (renewed every half
        second, so it lapses within 1.5 s of a crash). A lapsed key means down when the
        server's socket refuses connections too (the process is gone); when the socket still
        accepts, the server is stalled, and it counts as down only once the key has stayed
        lapsed for ``GPU_STALL_GRACE_S``.

        Raises:
            redis.RedisError: Redis unreachable.
        """
        if not self.gpu_socket:
            return
        if self.redis.exists(self.gpu_alive_key):
            self._gpu_lapsed_since = None
            self._gpu_state(True, "its liveness key is back")
            return
        if self._gpu_up is None:
            return
        now = time.monotonic()
        if self._gpu_lapsed_since is None:
            self._gpu_lapsed_since = now
        if not socket_accepts(self.gpu_socket):
            self._gpu_state(False, "its liveness key lapsed and its socket refuses connections")
        elif now - self._gpu_lapsed_since >= GPU_STALL_GRACE_S:
            self._gpu_state(False, f"its liveness key lapsed {GPU_STALL_GRACE_S:g} s ago while its socket "
                                   "still accepts: it is hung")

    def _gpu_state(self, up: bool, why: str) -> None:
        """Records that the GPU server is ``up`` or not. While it is down the node's alive key
        is withheld, so the controller routes no work here; the node hash's ``gpu_server``
        field says ``up`` or ``down``. A Redis failure here is only logged: the heartbeat
        writes the same state again."""
        with self._gpu_lock:
            if up == self._gpu_up:
                return
            seen_before = self._gpu_up is not None
            self._gpu_up = up
            if not up:
                self._gpu_outages += 1
        if up and seen_before:
            log.warning("GPU server of node %s is back (%s): taking work again", self.settings.node_id, why)
        elif not up:
            log.warning("GPU server of node %s is down (%s): no work is routed here until it is back",
                        self.settings.node_id, why)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.node_key, mapping={"gpu_server": "up" if up else "down", "gpu_changed": now_ms()})
                if up:
                    pipe.set(self.alive_key, 1, px=ALIVE_TTL_MS)
                else:
                    # the GPU server's own key too: it comes back only with a live server
                    pipe.delete(self.alive_key, self.gpu_alive_key)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not record the GPU server's state: %s", exc)

    def _gpu_reachable(self) -> bool:
        """Whether the GPU server answers ``health`` within a second."""
        from runtime.client import GPUServerClient, ModelError

        client = GPUServerClient(self.gpu_socket, token=self._admin_token, timeout_s=GPU_PROBE_TIMEOUT_S)
        try:
            client.health()
            return True
        except ModelError:
            return False
        finally:
            client.close()

    def _gpu_lost(self, outages_before: int) -> bool:
        """Whether the GPU server went away since ``_gpu_outages`` was ``outages_before``: it
        is gone now (no answer and its socket refuses connections; then it is marked down at
        once) or was down at some point since. A server that does not answer while its
        socket accepts is busy, not gone: the activation is not run again elsewhere, and the
        liveness watch (``_watch_gpu``) decides whether it is hung."""
        if not self._gpu_reachable() and not socket_accepts(self.gpu_socket):
            self._gpu_state(False, "a model call of an action found it gone")
            return True
        return self._gpu_outages != outages_before

    def _after_gpu_loss(self, msg: dict, outcome: Outcome, raw: bytes) -> Outcome:
        """An activation that failed because the GPU server went away: dispatched once more
        (to a node that is alive, which this one is not while its GPU server is down), else
        ended as a whisk internal error saying so.

        Raises:
            _Redispatched: another node has the message now.
        """
        attempt = int(msg.get("attempt") or 1)
        if attempt < 2:
            try:
                node = self._picker.dispatch({**msg, "attempt": attempt + 1},
                                             moved_from=(self.inflight_key, raw))
            except AlreadyMoved:  # the controller's dead-node pass moved it meanwhile
                raise _Redispatched() from None
            if node is not None:
                log.warning("activation %s failed as the GPU server went away: retried on node %s",
                            msg["activationId"], node)
                raise _Redispatched()
        failure = outcome.result.get("error") if isinstance(outcome.result, dict) else None
        return _error(WHISK_ERROR, f"The GPU server of node {self.settings.node_id} became unavailable (503) while "
                                   f"the action ran, and no other node could take it; the action failed with: {failure}",
                      logs=outcome.logs, init_ms=outcome.init_ms)

    def _consume_loop(self) -> None:
        scanned = time.monotonic()
        while not self._stopping.is_set():
            if self._rescan.is_set() or time.monotonic() - scanned > ORPHAN_SCAN_S:
                self._put_back_orphans()
                scanned = time.monotonic()
            # A slot per message taken: messages this node cannot start yet stay in its queue.
            if not self._slots.acquire(timeout=POLL_S):
                continue
            try:
                raw = self.redis.blmove(self.queue_key, self.inflight_key, POLL_S, "RIGHT", "LEFT")
            except redis.RedisError as exc:
                self._slots.release()
                # the move may have happened with its answer lost: look for it once Redis is back
                self._rescan.set()
                log.warning("reading %s failed: %s", self.queue_key, exc)
                self._stopping.wait(POLL_S)
                continue
            if raw is None:
                self._slots.release()
                continue
            with self._active_lock:
                self._active.add(raw)
            with self._running_cond:
                self._running += 1
            self._executor.submit(self._handle, raw)

    def _put_back_orphans(self) -> None:
        """After a Redis failure: messages in flight that no worker of this invoker runs (a
        ``BLMOVE`` whose answer was lost, a worker that stopped on a Redis error) go back to
        the head of the queue. One whose activation is final by then is dropped when taken."""
        self._rescan.clear()
        try:
            for raw in self.redis.lrange(self.inflight_key, 0, -1):
                with self._active_lock:
                    busy = raw in self._active
                if not busy and self._reclaim(keys=[self.inflight_key, self.queue_key], args=[raw]):
                    log.warning("put back an orphaned activation message %r", raw[:120])
        except redis.RedisError as exc:
            self._rescan.set()
            log.warning("looking for orphaned activation messages failed: %s", exc)

    def _handle(self, raw: bytes) -> None:
        failed_on_redis = False
        left = True
        try:
            left = self._process(raw)
        except redis.RedisError as exc:
            failed_on_redis = True
            log.warning("activation message %r stays in flight, Redis failed: %s", raw[:120], exc)
        except Exception:
            left = False  # it stays in flight: the orphan scan runs it again, with its booking
            log.exception("activation message %r failed", raw[:200])
        finally:
            # the device slot the controller booked for it (routing.NodePicker) is free again once
            # the message has left this node; one put back here or left in flight keeps it
            if left and not failed_on_redis:
                try:
                    self._picker.release(self.settings.node_id, raw)
                except redis.RedisError as exc:
                    log.warning("could not release the booking of %r (it lapses at its expiry): %s", raw[:120], exc)
            with self._active_lock:
                self._active.discard(raw)
            if failed_on_redis:  # after the discard, so that the rescan finds the message orphaned
                self._rescan.set()
            self._slots.release()
            with self._running_cond:
                self._running -= 1
                self._running_cond.notify_all()

    # --- one activation --------------------------------------------------------------------

    def _process(self, raw: bytes) -> bool:
        """Runs one message taken from the queue; returns whether it left this node (stored,
        dropped, dispatched elsewhere) rather than going back onto its queue."""
        try:
            msg = json.loads(raw)
            if not isinstance(msg, dict) or not all(isinstance(msg.get(k), str) for k in
                                                    ("activationId", "namespace", "action")):
                raise ValueError("activationId, namespace and action must be strings")
        except ValueError as exc:
            log.error("dropping a malformed activation message %r: %s", raw[:200], exc)
            self.redis.lrem(self.inflight_key, 1, raw)
            return True
        # one round trip for all: whether the activation already ended, the action's current
        # revision and whether the message's revision is kept (replaced or deleted since); the
        # record itself, code included, is read only when it is not parsed already (_action)
        revision = msg.get("revision")
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(state.activation_key(msg["activationId"]))
            pipe.hget(state.revisions_key(msg["namespace"]), msg["action"])
            if isinstance(revision, str):
                pipe.exists(state.revision_key(msg["namespace"], msg["action"], revision))
            existing, current, *kept = pipe.execute()
        if existing is not None and state.is_final(json.loads(existing)):
            # a message put back after its record was stored (a crash or a Redis failure
            # between the two): running it again would run the activation twice
            log.warning("activation %s is already final: its message is dropped, not run again", msg["activationId"])
            self.redis.lrem(self.inflight_key, 1, raw)
            return True
        try:
            record, result_json = self.run_activation(msg, raw, current.decode() if current is not None else None,
                                                      bool(kept and kept[0]))
        except _Requeue as requeue:
            self._requeue(raw, requeue.message)
            return False
        except _Redispatched:  # already off this node's in-flight list (NodePicker.dispatch)
            return True
        self._store(raw, record, msg, result_json)
        return True

    def _store(self, raw: bytes, record: dict, msg: dict, result_json: str | None) -> None:
        """Stores the final record (its result as the JSON text ``result_json`` when not None),
        then drops the message from in flight and counts the
        activation's SLO attainment (``controller_plugin.attainment``) in one transaction,
        trying again while Redis is unreachable (a restart) until the invoker gives up its
        running work.

        Raises:
            redis.RedisError: Redis still fails when the invoker stops; the message stays in
                flight and runs again on the node's next start.
        """
        delay = 0.05
        while True:
            try:
                state.finish_activation(self.redis, record, blocking=msg.get("blocking") is True,
                                        result_json=result_json)
                self._recorder.finish(self.inflight_key, raw, msg, record, self.settings.node_id)
                return
            except redis.RedisError as exc:
                if self._abandon.is_set():
                    raise
                log.warning("storing the record of activation %s failed, trying again: %s",
                            record["activationId"], exc)
                self._abandon.wait(delay)
                delay = min(2 * delay, FINISH_RETRY_MAX_S)

    def _requeue(self, raw: bytes, msg: dict) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self.queue_key, json.dumps(msg))
            pipe.lrem(self.inflight_key, 1, raw)
            pipe.execute()
        log.info("re-queued activation %s (attempt %s)", msg["activationId"], msg.get("attempt"))

    def run_activation(self, msg: dict, raw: bytes, current: str | None, kept: bool) -> tuple[dict, str | None]:
        """Runs one activation message (``docs/architecture.md``) and returns its final record
        and, when the runtime's answer is the result verbatim, that result as JSON text (for
        ``state.finish_activation``'s ``result_json``).
        ``raw``: the message as taken from the in-flight list, where a re-dispatch removes it;
        ``current``: the action's current revision id (None: deleted, or a record written
        without one), ``kept``: whether the message's revision is kept as a replaced record,
        both read with the message.

        Raises:
            _Requeue: the message must go back onto the queue (runtime shutting down, or the
                invoker stopping before it could run).
            _Redispatched: the GPU server went away during the run and another node took
                the message.
        """
        start = now_ms()
        outages = self._gpu_outages
        prefetches = self._prefetch(msg.get("models") or [], msg.get("gpu"))
        action, outcome = self._execute(msg, current, kept)
        if outcome.status_code != SUCCESS and msg.get("models") and self.gpu_socket and self._gpu_lost(outages):
            outcome = self._after_gpu_loss(msg, outcome, raw)
        record = self._record(msg, action, start, outcome)
        self._log_activation(msg, record, prefetches)
        return record, outcome.result_json

    def _log_activation(self, msg: dict, record: dict, prefetches: list[Future]) -> None:
        """The activation's one log line: id, action, node, GPU and path (what the prefetches
        of its models answered by now: devices, ``resident``/``pcie``/``nvlink``), wait, swap
        (GPU server time of the prefetches that started a swap-in), init, duration, status and
        SLO (latency from submission to the end, whether it met the SLO); the same as JSON
        fields with ``--log-format json``."""
        notes = {a["key"]: a["value"] for a in record["annotations"]}
        replies = [f.result() for f in prefetches if f.done() and f.result() is not None]
        gpus = sorted({p["device"] for p in replies}) or None
        paths = sorted({p["path"] for p in replies if "path" in p}) or None  # older GPU servers say no path
        swap_ms = round(sum(p.get("server_ms", 0) for p in replies if p.get("swap_in")), 1) if paths else None
        latency_ms, slo_ms, met = attainment.judge(msg, record)
        fields = {"event": "activation", "activation_id": record["activationId"], "namespace": record["namespace"],
                  "action": record["name"], "node": self.settings.node_id, "models": msg.get("models") or [],
                  "gpu": gpus, "path": paths, "wait_ms": notes.get("waitTime"), "swap_ms": swap_ms,
                  "init_ms": notes.get("initTime"), "duration_ms": record["duration"],
                  "status": record["response"]["status"], "status_code": record["response"]["statusCode"],
                  "latency_ms": latency_ms, "slo_ms": slo_ms, "slo_met": met}
        log.info("activation %s %s/%s node %s gpu %s path %s: %s in %d ms (wait %s ms, swap %s ms, %s; SLO %g ms %s)",
                 fields["activation_id"], fields["namespace"], fields["action"], fields["node"],
                 ",".join(map(str, gpus)) if gpus else "-", ",".join(paths) if paths else "-", fields["status"],
                 fields["duration_ms"], fields["wait_ms"], "-" if swap_ms is None else swap_ms,
                 "warm" if fields["init_ms"] is None else f"init {fields['init_ms']} ms", slo_ms,
                 "met" if met else "missed", extra={"fields": fields})

    def _execute(self, msg: dict, current: str | None, kept: bool) -> tuple[dict | None, Outcome]:
        ns, name, revision = msg["namespace"], msg["action"], msg.get("revision")
        try:
            action, spec, record = self._action(msg, current, kept)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return None, _error(WHISK_ERROR, f"The action record of {ns}/{name} is malformed: {exc}")
        if action is None and isinstance(revision, str) and record is not None:
            return None, _error(WHISK_ERROR, f"The revision of the action {ns}/{name} (version "
                                                f"{msg.get('version')}) that accepted this activation is no "
                                                f"longer kept: it was replaced more than {state.REVISION_TTL_S} s "
                                                "before the activation ran.")
        if action is None:
            return None, _error(WHISK_ERROR, f"The action {ns}/{name} no longer exists: "
                                                "it was deleted after the activation was submitted.")
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

    def _action(self, msg: dict, current: str | None,
                kept: bool) -> tuple[dict | None, ActionSpec | None, bytes | None]:
        """The action record the activation runs, its spec and, when it was read, the
        action's current record (else None): the revision the controller accepted
        (``msg["revision"]``: the current record when it is that one, else the kept copy), or
        the current record for a message without one; (None, None, ...) when that record is
        gone. ``current`` and ``kept`` as for :meth:`run_activation`. A revision parsed before
        for the same time limit is not read again: a zipped action's record is megabytes.

        Raises:
            ValueError, TypeError, KeyError, AttributeError: a malformed record.
        """
        ns, name, revision = msg["namespace"], msg["action"], msg.get("revision")
        timeout_ms = msg.get("timeout_ms")
        wanted = revision if isinstance(revision, str) else current
        if wanted is not None and (wanted == current or kept):
            with self._actions_lock:
                cached = self._actions.get((ns, name, wanted, timeout_ms))
                if cached is not None:
                    self._actions.move_to_end((ns, name, wanted, timeout_ms))
                    return (*cached, None)
        record = self.redis.hget(state.actions_key(ns), name)
        if record is not None:
            action, spec = self._parsed(ns, name, record, timeout_ms)
            if not isinstance(revision, str) or action.get("revision") == revision:
                return action, spec, record
        if not isinstance(revision, str):
            return None, None, record
        raw = self.redis.get(state.revision_key(ns, name, revision))  # replaced or deleted since: the kept copy
        if raw is None:
            return None, None, record
        return (*self._parsed(ns, name, raw, timeout_ms), record)

    def _parsed(self, ns: str, name: str, raw: bytes, timeout_ms: int | None) -> tuple[dict, ActionSpec]:
        """The action record ``raw`` of ``ns``/``name`` parsed, and its spec for an activation
        of ``timeout_ms`` (None: the action's own limit), kept for the next activation of its
        revision (a record without one, written other than by ``controller_plugin.state``,
        is not kept).

        Raises:
            ValueError, TypeError, KeyError, AttributeError: a malformed record.
        """
        action = json.loads(raw)
        spec = action_spec(ns, name, action, raw, timeout_ms or action_limits(action)["timeout"],
                           self.settings.node_secret)
        revision = action.get("revision")
        if isinstance(revision, str):
            with self._actions_lock:
                self._actions[(ns, name, revision, timeout_ms)] = (action, spec)
                self._actions.move_to_end((ns, name, revision, timeout_ms))
                while len(self._actions) > ACTION_CACHE:
                    self._actions.popitem(last=False)
        return action, spec

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
        except TimeoutError:
            container.kill()
            return _error(DEVELOPER_ERROR, f"The action exceeded its time limits of {spec.timeout_ms} milliseconds.",
                          logs=container.logs(0.1), timed_out=True)
        except ConnectionError:
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

    def _prefetch(self, models: list[str], gpu: int | None) -> list[Future]:
        """Asks the GPU server to start swapping each model in, on the prefetch threads: the
        activation never waits for the answer. Failures are only logged, since the action's
        own model call loads the model anyway. Returns the futures of the replies (``device``,
        ``swap_in``, ``path``, ``server_ms``; None for a failed prefetch)."""
        if not models or not self.gpu_socket:
            return []
        return [self._prefetcher.submit(self._prefetch_one, model, gpu) for model in models]

    def _prefetch_one(self, model: str, gpu: int | None) -> dict | None:
        try:
            if self._gpu_client is None:
                from runtime.client import GPUServerClient

                self._gpu_client = GPUServerClient(self.gpu_socket, token=self._admin_token, timeout_s=PREFETCH_TIMEOUT_S)
            return self._gpu_client.prefetch_info(model, gpu)
        except Exception as exc:
            log.warning("prefetch of %s failed: %s", model, exc)
            return None

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
            if self._gpu_up is False:
                return jsonify({"ready": False, "error": f"GPU server unreachable at {self.gpu_socket}"}), 503
            return jsonify({"ready": True, "node": self.settings.node_id, "containers": self.pool.size()})

        self._http = make_server(self.settings.http_host, self.settings.http_port, app, threaded=True)
        thread = threading.Thread(target=self._http.serve_forever, name="http", daemon=True)
        thread.start()
        log.info("health server on %s:%d", self.settings.http_host, self._http.server_port)


@click.command("invoker")
@options(InvokerSettings)
@options(LogSettings)
def command(**kwargs) -> None:
    """Run this node's invoker: consume torpor:node:{id}:queue and run the actions."""
    configure_from_kwargs(kwargs, "invoker")
    settings = from_kwargs(InvokerSettings, kwargs)
    check_picker_settings(settings.profiles, settings.device_slots)
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
