"""All of the controller's Redis access: actions, activations, throttling and node liveness.

The key layout is the one of ``docs/architecture.md`` (prefix ``torpor:``). Two more keys
belong to the controller alone (throttling):

- ``torpor:namespace:{ns}:running`` — sorted set: activation id → epoch ms after which the
  slot is freed even if no final record ever arrives (a crashed invoker);
- ``torpor:namespace:{ns}:rate:{minute}`` — string counter of the invocations of one clock
  minute (``epoch_ms // 60000``), expiring after 2 minutes.

An activation record is the OpenWhisk record (``activationId``, ``namespace``, ``name``,
``version``, ``subject``, ``start``, ``end``, ``duration``, ``response``, ``logs``,
``annotations``, ``publish``). The controller writes it *pending* (``end`` 0,
``response.status`` ``"pending"``); the invoker replaces it with the final record through
:func:`finish_activation`, which also wakes a blocking caller.
"""
from __future__ import annotations

import json
import uuid
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import redis

PREFIX = "torpor:"
NODES_KEY = PREFIX + "nodes"
NODE_PREFIX = PREFIX + "node:"
ACTIVATION_TTL_S = 7 * 24 * 3600
# A replaced or deleted action revision is kept this long for the activations accepted with
# it: far longer than an activation waits and runs on a working node (at most 5 min of run);
# one that waited longer ends as a whisk error saying its revision is no longer kept.
REVISION_TTL_S = 3600
DONE_TTL_S = 300
RATE_TTL_S = 120

SUCCESS, APPLICATION_ERROR, DEVELOPER_ERROR, WHISK_ERROR = 0, 1, 2, 3
STATUS_MESSAGES = {
    SUCCESS: "success",
    APPLICATION_ERROR: "application error",
    DEVELOPER_ERROR: "action developer error",
    WHISK_ERROR: "whisk internal error",
}
PENDING_STATUS = "pending"

# Activation ids are read from the index in pages of this many.
_SCAN_PAGE = 200


def _text(value: str | bytes) -> str:
    # Callers may hand in a client without decode_responses (the invoker's, say).
    return value.decode() if isinstance(value, bytes) else value


def actions_key(namespace: str) -> str:
    return f"{PREFIX}actions:{namespace}"


def revisions_key(namespace: str) -> str:
    """The hash of ``namespace``'s action names to the ``revision`` of their current record,
    written with the record: an invoker learns the revision without reading the whole
    record (its code is up to 48 MiB zipped)."""
    return f"{PREFIX}revisions:{namespace}"


def revision_key(namespace: str, name: str, revision: str) -> str:
    """Where a replaced or deleted action record stays for :data:`REVISION_TTL_S` (names
    hold no ``/`` nor ``:``, so the key is unambiguous)."""
    return f"{PREFIX}action:{namespace}/{name}:rev:{revision}"


def activation_key(activation_id: str) -> str:
    return f"{PREFIX}activation:{activation_id}"


def done_key(activation_id: str) -> str:
    return f"{PREFIX}activation:{activation_id}:done"


def activations_key(namespace: str) -> str:
    return f"{PREFIX}activations:{namespace}"


def node_key(node_id: str) -> str:
    return NODE_PREFIX + node_id


def alive_key(node_id: str) -> str:
    return f"{NODE_PREFIX}{node_id}:alive"


def queue_key(node_id: str) -> str:
    return f"{NODE_PREFIX}{node_id}:queue"


def inflight_key(node_id: str) -> str:
    return f"{NODE_PREFIX}{node_id}:inflight"


def device_key(node_id: str, index: int) -> str:
    return f"{NODE_PREFIX}{node_id}:device:{index}"


def running_key(namespace: str) -> str:
    return f"{PREFIX}namespace:{namespace}:running"


def rate_key(namespace: str, minute: int) -> str:
    return f"{PREFIX}namespace:{namespace}:rate:{minute}"


# --- actions -------------------------------------------------------------------------------

def get_action(r: redis.Redis, namespace: str, name: str) -> dict | None:
    """The action record ``name`` of ``namespace``, or None when there is none."""
    raw = r.hget(actions_key(namespace), name)
    return json.loads(raw) if raw is not None else None


def create_action(r: redis.Redis, record: dict) -> bool:
    """Stores a new action record, with a new ``revision`` (set in ``record`` too, and in
    :func:`revisions_key`); False (and nothing written) when the name is taken."""
    namespace, name = record["namespace"], record["name"]
    key = actions_key(namespace)
    record["revision"] = new_revision()

    def create(pipe: redis.client.Pipeline) -> bool:
        if pipe.hexists(key, name):
            return False
        pipe.multi()
        pipe.hset(key, name, json.dumps(record))
        pipe.hset(revisions_key(namespace), name, record["revision"])
        return True

    return r.transaction(create, key, value_from_callable=True)


def new_revision() -> str:
    """A revision id: unique per write of an action record, unlike its user-settable
    ``version`` (a deleted action created again starts at 0.0.1 again)."""
    return uuid.uuid4().hex


def replace_action(r: redis.Redis, namespace: str, name: str,
                   build: Callable[[dict | None], dict]) -> dict:
    """Writes ``build(current record or None)`` as the action, with a new ``revision`` (in
    :func:`revisions_key` too), atomically against concurrent updates; the record it replaces is kept for
    :data:`REVISION_TTL_S` under its revision (:func:`revision_key`).

    ``build`` may be called more than once (it is retried when another writer got there
    first) and may raise to abandon the update; its exception propagates.
    """
    key = actions_key(namespace)

    def update(pipe: redis.client.Pipeline) -> dict:
        raw = pipe.hget(key, name)
        current = json.loads(raw) if raw is not None else None
        record = {**build(current), "revision": new_revision()}
        pipe.multi()
        pipe.hset(key, name, json.dumps(record))
        pipe.hset(revisions_key(namespace), name, record["revision"])
        if current is not None:
            _keep_revision(pipe, namespace, name, current, raw)
        return record

    return r.transaction(update, key, value_from_callable=True)


def _keep_revision(pipe: redis.client.Pipeline, namespace: str, name: str, record: dict, raw: str) -> None:
    # activations accepted with this revision still run it (OpenWhisk runs the revision it
    # accepted), however the action changes meanwhile
    if isinstance(record.get("revision"), str):
        pipe.set(revision_key(namespace, name, record["revision"]), raw, ex=REVISION_TTL_S)


def delete_action(r: redis.Redis, namespace: str, name: str) -> dict | None:
    """Deletes the action; returns the deleted record, or None when there was none."""
    key = actions_key(namespace)

    def delete(pipe: redis.client.Pipeline) -> dict | None:
        raw = pipe.hget(key, name)
        if raw is None:
            return None
        record = json.loads(raw)
        pipe.multi()
        pipe.hdel(key, name)
        pipe.hdel(revisions_key(namespace), name)
        _keep_revision(pipe, namespace, name, record, raw)
        return record

    return r.transaction(delete, key, value_from_callable=True)


def list_actions(r: redis.Redis, namespace: str, skip: int, limit: int) -> list[dict]:
    """Action records of ``namespace`` sorted by name, ``limit`` of them after the first ``skip``."""
    key = actions_key(namespace)
    names = sorted(r.hkeys(key))[skip:skip + limit]
    if not names:
        return []
    return [json.loads(raw) for raw in r.hmget(key, names) if raw is not None]


def count_actions(r: redis.Redis, namespace: str) -> int:
    """Number of actions in ``namespace``."""
    return int(r.hlen(actions_key(namespace)))


# --- throttling ----------------------------------------------------------------------------

class Throttled(Exception):
    """A namespace is over one of its limits; ``str(exc)`` is OpenWhisk's 429 message."""


# KEYS: running set, rate counter, activation record, activation index.
# ARGV: now ms (the record's start), hold-until ms, activation id, concurrent limit,
# per-minute limit, rate TTL s, pending record JSON, record TTL s.
_ADMIT_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local in_flight = redis.call('ZCARD', KEYS[1])
local this_minute = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if this_minute > tonumber(ARGV[5]) then
  redis.call('ZREM', KEYS[1], ARGV[3])
  return {1, this_minute}
end
if in_flight > tonumber(ARGV[4]) then
  redis.call('ZREM', KEYS[1], ARGV[3])
  return {2, in_flight}
end
redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[8])
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[8]) * 1000)
return {0, 0}
"""
_admit_script = None  # registered at first use (redis-py's Script works on any client)


def admit(r: redis.Redis, record: dict, *, hold_until_ms: int, concurrent_limit: int,
          per_minute_limit: int) -> None:
    """Counts one invocation against its namespace's limits, takes an in-flight slot and
    stores the pending ``record`` (as :func:`put_pending`), in one script: one round trip,
    and no slot is ever held without its record.

    Every attempt counts towards the per-minute limit, admitted or not (as in OpenWhisk); the
    clock minute and the expiry of older slots come from the record's ``start`` (epoch ms).
    The slot is given back by :func:`finish_activation` or :func:`release`, or lapses at
    ``hold_until_ms`` (epoch ms).

    Raises:
        Throttled: over ``per_minute_limit`` invocations this clock minute, or over
            ``concurrent_limit`` activations in flight; no slot is held and no record
            stored then.
    """
    namespace, activation_id, now_ms = record["namespace"], record["activationId"], record["start"]
    keys = [running_key(namespace), rate_key(namespace, now_ms // 60000), activation_key(activation_id),
            activations_key(namespace)]
    args = [now_ms, hold_until_ms, activation_id, concurrent_limit, per_minute_limit, RATE_TTL_S,
            json.dumps(record), ACTIVATION_TTL_S]
    global _admit_script
    if _admit_script is None:
        _admit_script = r.register_script(_ADMIT_LUA)
    refused, count = _admit_script(keys=keys, args=args, client=r)
    if refused == 1:
        raise Throttled(f"Too many requests in the last minute (count: {count}, allowed: {per_minute_limit}).")
    if refused == 2:
        raise Throttled(f"Too many concurrent requests in flight (count: {count - 1}, "
                        f"allowed: {concurrent_limit}).")


def release(r: redis.Redis, namespace: str, activation_id: str) -> None:
    """Gives back the in-flight slot of an activation (no-op when it holds none)."""
    r.zrem(running_key(namespace), activation_id)


# --- activations ---------------------------------------------------------------------------

def new_activation_id() -> str:
    """A fresh activation id: 32 lowercase hex characters."""
    return secrets.token_hex(16)


def pending_record(activation_id: str, action: dict, subject: str, now_ms: int) -> dict:
    """The record of an activation of ``action`` that is queued but not finished.

    ``start`` is the submission time (epoch ms); ``end`` and ``duration`` are 0 and
    ``response.status`` is ``"pending"`` until the invoker finishes it.
    """
    return {
        "activationId": activation_id,
        "namespace": action["namespace"],
        "name": action["name"],
        "version": action["version"],
        "subject": subject,
        "start": now_ms,
        "end": 0,
        "duration": 0,
        "response": {"status": PENDING_STATUS, "statusCode": None, "success": False, "result": {}},
        "logs": [],
        "annotations": [
            {"key": "path", "value": f"{action['namespace']}/{action['name']}"},
            {"key": "kind", "value": action["exec"]["kind"]},
            {"key": "limits", "value": action["limits"]},
        ],
        "publish": False,
    }


def put_pending(r: redis.Redis, record: dict) -> None:
    """Stores a pending record (TTL 7 days) and indexes it under its namespace by ``start``.

    Index entries older than the records' TTL are dropped at the same time.
    """
    index = activations_key(record["namespace"])
    pipe = r.pipeline(transaction=True)
    pipe.set(activation_key(record["activationId"]), json.dumps(record), ex=ACTIVATION_TTL_S)
    pipe.zadd(index, {record["activationId"]: record["start"]})
    pipe.zremrangebyscore(index, "-inf", record["start"] - ACTIVATION_TTL_S * 1000)
    pipe.execute()


def discard_activation(r: redis.Redis, namespace: str, activation_id: str) -> None:
    """Removes an activation that was never dispatched: record, index entry and slot."""
    pipe = r.pipeline(transaction=True)
    pipe.delete(activation_key(activation_id))
    pipe.zrem(activations_key(namespace), activation_id)
    pipe.zrem(running_key(namespace), activation_id)
    pipe.execute()


def get_activation(r: redis.Redis, activation_id: str) -> dict | None:
    """The activation record (pending or final), or None when unknown or expired."""
    raw = r.get(activation_key(activation_id))
    return json.loads(raw) if raw is not None else None


def is_final(record: dict) -> bool:
    """True when the record is finished (it has an ``end`` time)."""
    return bool(record.get("end"))


def wait_done(r: redis.Redis, activation_id: str, timeout_ms: int) -> dict | None:
    """Blocks until the activation's done marker arrives or ``timeout_ms`` passes.

    Returns:
        The final record (carried by the marker of a blocking activation, else read from
        Redis once the marker is taken), or None on timeout.
    """
    popped = r.blpop([done_key(activation_id)], timeout=max(timeout_ms, 1) / 1000)
    if popped is None:
        return None
    marker = _text(popped[1])
    if marker.startswith("{"):
        return json.loads(marker)
    return get_activation(r, activation_id)


def iter_activations(r: redis.Redis, namespace: str, *, name: str | None = None,
                     since_ms: int | None = None, upto_ms: int | None = None) -> Iterator[dict]:
    """Final activation records of ``namespace``, newest submission first.

    Args:
        name: only activations of this action.
        since_ms, upto_ms: only activations submitted in this closed range (epoch ms).
    """
    index = activations_key(namespace)
    high = upto_ms if upto_ms is not None else "+inf"
    low = since_ms if since_ms is not None else "-inf"
    offset = 0
    while True:
        ids = r.zrevrangebyscore(index, high, low, start=offset, num=_SCAN_PAGE)
        if not ids:
            return
        offset += len(ids)
        for raw in r.mget([activation_key(_text(i)) for i in ids]):
            if raw is None:
                continue
            record = json.loads(raw)
            if is_final(record) and record["namespace"] == namespace and (name is None or record["name"] == name):
                yield record


def response_for(status_code: int, result: Any) -> dict:
    """The ``response`` of a final record.

    Args:
        status_code: 0 success, 1 application error, 2 action developer error,
            3 whisk internal error.
        result: the action's JSON object (or array); errors are ``{"error": message}``.

    Raises:
        ValueError: ``status_code`` is not one of the four.
    """
    if status_code not in STATUS_MESSAGES:
        raise ValueError(f"activation status code must be 0..3, not {status_code!r}")
    return {"status": STATUS_MESSAGES[status_code], "statusCode": status_code,
            "success": status_code == SUCCESS, "result": result}


def final_record(pending: dict, status_code: int, result: Any, *, start_ms: int, end_ms: int,
                 logs: list[str] | tuple[str, ...] = (), wait_time_ms: int | None = None,
                 init_time_ms: int | None = None) -> dict:
    """The final record of a pending one.

    Args:
        pending: the pending record (as :func:`get_activation` returns it).
        status_code, result: see :func:`response_for`.
        start_ms, end_ms: when the run started and ended (epoch ms); ``duration`` is their
            difference.
        logs: the activation's log lines.
        wait_time_ms: time from submission to start, annotated as ``waitTime`` (ms).
        init_time_ms: time spent in ``/init`` on a cold start, annotated as ``initTime`` (ms);
            None on a warm start.

    Raises:
        ValueError: bad ``status_code``, or ``end_ms`` before ``start_ms``.
    """
    if end_ms < start_ms:
        raise ValueError(f"end {end_ms} ms is before start {start_ms} ms")
    annotations = [a for a in pending["annotations"] if a["key"] not in ("waitTime", "initTime")]
    if wait_time_ms is not None:
        annotations.append({"key": "waitTime", "value": wait_time_ms})
    if init_time_ms is not None:
        annotations.append({"key": "initTime", "value": init_time_ms})
    return {**pending, "start": start_ms, "end": end_ms, "duration": end_ms - start_ms,
            "response": response_for(status_code, result), "logs": list(logs), "annotations": annotations}


def record_json(record: dict, result_json: str | None = None) -> str:
    """The JSON text of an activation record; with ``result_json`` (the JSON text of
    ``record["response"]["result"]``, e.g. as an action runtime wrote it) that text stands
    for the result instead of an encoding of it: the result is the bulk of a record and
    encoding it again costs ~0.6 ms per 1,000 floats. ``response`` is then the record's last
    field and ``result`` the last of ``response``."""
    if result_json is None:
        return json.dumps(record)
    response = record["response"]
    head = json.dumps({k: v for k, v in record.items() if k != "response"})
    status = json.dumps({k: v for k, v in response.items() if k != "result"})
    return f'{head[:-1]}, "response": {status[:-1]}, "result": {result_json}}}}}'


def finish_activation(r: redis.Redis, record: dict, blocking: bool = False,
                      result_json: str | None = None) -> None:
    """Stores a final activation record and wakes whoever waits for it.

    In one transaction: the record is written to ``torpor:activation:{id}`` (TTL 7 days),
    indexed in ``torpor:activations:{ns}`` if it was not, its namespace's in-flight slot is
    given back, and the done marker is pushed onto ``torpor:activation:{id}:done`` (TTL 5
    minutes): the record itself for a ``blocking`` activation, whose caller then needs no
    second read (:func:`wait_done`), else the activation id.

    Args:
        record: a final activation record, e.g. from :func:`final_record`.
        blocking: whether a caller waits for the activation (the message's ``blocking``).
        result_json: the result as JSON text, stored verbatim (:func:`record_json`).

    Raises:
        ValueError: the record is not final (no ``end``) or its ``response.statusCode`` is
            not 0..3.
    """
    if not is_final(record):
        raise ValueError("activation record has no end time: it is not final")
    status_code = record.get("response", {}).get("statusCode")
    if status_code not in STATUS_MESSAGES:
        raise ValueError(f"activation response.statusCode must be 0..3, not {status_code!r}")
    activation_id, namespace = record["activationId"], record["namespace"]
    text = record_json(record, result_json)
    pipe = r.pipeline(transaction=True)
    pipe.set(activation_key(activation_id), text, ex=ACTIVATION_TTL_S)
    pipe.zadd(activations_key(namespace), {activation_id: record["start"]}, nx=True)
    pipe.zrem(running_key(namespace), activation_id)
    pipe.lpush(done_key(activation_id), text if blocking else activation_id)
    pipe.expire(done_key(activation_id), DONE_TTL_S)
    pipe.execute()


# --- nodes ---------------------------------------------------------------------------------

def live_nodes(r: redis.Redis) -> list[str]:
    """Ids of known nodes whose alive key is set."""
    ids = sorted(_text(i) for i in r.smembers(NODES_KEY))
    if not ids:
        return []
    alive = r.mget([alive_key(i) for i in ids])
    return [i for i, a in zip(ids, alive) if a is not None]


def dead_nodes(r: redis.Redis, *, now_ms: int, dead_after_ms: int) -> list[str]:
    """Ids of known nodes without their alive key and not seen for ``dead_after_ms`` (ms)."""
    ids = sorted(_text(i) for i in r.smembers(NODES_KEY))
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for node_id in ids:
        pipe.exists(alive_key(node_id))
        pipe.hget(node_key(node_id), "last_seen")
    answers = pipe.execute()
    dead = []
    for i, node_id in enumerate(ids):
        alive, last_seen = answers[2 * i], answers[2 * i + 1]
        try:
            seen_ms = int(float(last_seen)) if last_seen is not None else None
        except ValueError:
            seen_ms = None
        if not alive and (seen_ms is None or now_ms - seen_ms > dead_after_ms):
            dead.append(node_id)
    return dead


def peek_orphan(r: redis.Redis, node_id: str) -> tuple[str, str] | None:
    """The oldest message of a node's in-flight list, else of its queue, left in place (a
    re-dispatch moves it atomically: NodePicker.dispatch with ``moved_from``).

    Returns:
        (the list key it is in, the raw message), or None when both are empty.
    """
    for key in (inflight_key(node_id), queue_key(node_id)):
        raw = r.lindex(key, -1)
        if raw is not None:
            return key, raw
    return None
