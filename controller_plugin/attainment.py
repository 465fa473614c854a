"""SLO attainment counted in Redis as activations finish, per function and per node, so that
``torpor status`` shows the share of recent requests that met their SLO, whatever controller
admitted them and whatever node ran them.

One hash per clock minute, ``torpor:slo:{minute}`` (``minute`` = epoch ms // 60000 of the
activation's end), expiring after :data:`KEEP_MINUTES` minutes:

- ``action:{ns}/{name}:total``, ``action:{ns}/{name}:met`` — activations of the action that
  finished on a node, and those that met its SLO;
- ``action:{ns}/{name}:slo_ms`` — the action's SLO in ms, as its last activation carried it;
- ``node:{id}:total``, ``node:{id}:met`` — the same per node that ran them.

An activation *meets* its SLO when it succeeded (status code 0) and its latency — from its
admission by the controller (the message's ``submitted``) to the end of its run — is at most
the message's ``slo_ms`` (the action's ``slo-ms`` annotation, 100 ms by default). The invoker
counts each activation in the script that drops its message from the node's in-flight list
(:class:`Recorder`), right after storing the final record: the counters move only when the
message was still there, so a retry after a lost reply (a Redis restart) counts nothing
twice, and counting costs no extra round trip.
Activations that never ended on a node (lost with a dead node, refused at the door) are not
counted; the controller's ``torpor_action_slo_*`` gauges see those of its blocking callers.
"""
from __future__ import annotations

import redis

from controller_plugin import state
from controller_plugin.slo import DEFAULT_SLO_MS

KEEP_MINUTES = 60


def minute_key(minute: int) -> str:
    """The hash of one clock minute (``epoch_ms // 60000``)."""
    return f"{state.PREFIX}slo:{minute}"


def judge(message: dict, record: dict) -> tuple[int, float, bool]:
    """(latency ms, SLO ms, whether it met the SLO) of the activation ``message`` (the queue
    element) that ended with the final ``record``. A message without a usable ``slo_ms`` gets
    :data:`controller_plugin.slo.DEFAULT_SLO_MS`; one without ``submitted`` is timed from its
    run's start."""
    try:
        slo_ms = float(message.get("slo_ms"))
    except (TypeError, ValueError):
        slo_ms = DEFAULT_SLO_MS
    if not slo_ms > 0:
        slo_ms = DEFAULT_SLO_MS
    try:
        submitted = int(message.get("submitted"))
    except (TypeError, ValueError):
        submitted = int(record["start"])
    latency_ms = max(0, int(record["end"]) - submitted)
    success = record.get("response", {}).get("statusCode") == state.SUCCESS
    return latency_ms, slo_ms, success and latency_ms <= slo_ms


# KEYS: in-flight list, minute hash. ARGV: raw message, TTL s, SLO field, SLO ms, counters...
_DROP_AND_COUNT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
for i = 5, #ARGV do
  redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


class Recorder:
    """Drops a finished activation's message from a node's in-flight list and counts its SLO
    attainment, atomically and only once (see the module's text).

    Args:
        client: a Redis client.
    """

    def __init__(self, client: redis.Redis):
        self._script = client.register_script(_DROP_AND_COUNT)

    def finish(self, inflight_key: str, raw: bytes | str, message: dict, record: dict, node: str) -> bool:
        """Removes ``raw`` from ``inflight_key`` and, when it was there, counts the activation
        ``message`` that ended with ``record`` on ``node``; returns whether it was there.

        Raises:
            redis.RedisError: Redis failed (then nothing, or all of it, happened).
        """
        _, slo_ms, met = judge(message, record)
        action = f"action:{record['namespace']}/{record['name']}"
        counters = [f"{prefix}:{kind}" for prefix in (action, f"node:{node}")
                    for kind in (("total", "met") if met else ("total",))]
        key = minute_key(int(record["end"]) // 60000)
        return bool(self._script(keys=[inflight_key, key],
                                 args=[raw, KEEP_MINUTES * 60, f"{action}:slo_ms", repr(slo_ms), *counters]))


def read(client: redis.Redis, now_ms: int, minutes: int) -> dict:
    """Sums the counters of the last ``minutes`` clock minutes (the current one included)
    through ``client`` (``decode_responses=True``).

    Returns:
        ``{"actions": {"ns/name": {"total", "met", "slo_ms"}}, "nodes": {id: {"total",
        "met"}}}``; ``slo_ms`` is None when no minute recorded it.

    Raises:
        ValueError: ``minutes`` outside 1..:data:`KEEP_MINUTES`.
        redis.RedisError: Redis unreachable.
    """
    if not 1 <= minutes <= KEEP_MINUTES:
        raise ValueError(f"the SLO window must be 1 to {KEEP_MINUTES} minutes, not {minutes}")
    current = now_ms // 60000
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(minute_key(minute))
    out: dict[str, dict] = {"actions": {}, "nodes": {}}
    for fields in pipe.execute():  # oldest minute first, so the newest SLO wins
        for field, value in fields.items():
            kind, _, rest = field.partition(":")
            name, _, counter = rest.rpartition(":")
            group = {"action": "actions", "node": "nodes"}.get(kind)
            if group is None or not name:
                continue
            entry = out[group].setdefault(name, {"total": 0, "met": 0, **({"slo_ms": None} if kind == "action" else {})})
            if counter == "slo_ms" and kind == "action":
                entry["slo_ms"] = float(value)
            elif counter in ("total", "met"):
                entry[counter] += int(value)
    return out
