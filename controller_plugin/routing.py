"""Node choice: where an activation runs, and moving the work of dead nodes to live ones.

The choice itself is one Lua script (``pick_node.lua``) so that reading the cluster state
and queueing the activation happen atomically; its inputs are the node set, the
activation's models and the message. A latency predictor can replace the scoring inside
the script without touching its callers.
"""
from __future__ import annotations

import json
import logging
from importlib import resources

import redis

from controller_plugin import state

log = logging.getLogger(__name__)

PICK_NODE_LUA = resources.files(__package__).joinpath("pick_node.lua").read_text()


class NodePicker:
    """Queues activation messages on the best live node (``pick_node.lua``).

    Args:
        r: Redis client; the script is registered on it (EVALSHA, loaded on first use).
    """

    def __init__(self, r: redis.Redis):
        self._pick = r.register_script(PICK_NODE_LUA)

    def dispatch(self, message: dict) -> str | None:
        """Picks a node for ``message`` and LPUSHes it onto ``torpor:node:{id}:queue``.

        Args:
            message: the activation message (``docs/architecture.md``); its ``models`` list
                steers the choice towards nodes where they are resident.

        Returns:
            The node id, or None when no node is alive (nothing was queued).
        """
        chosen = self._pick(keys=[state.NODES_KEY],
                            args=[state.NODE_PREFIX, json.dumps(message.get("models") or []), json.dumps(message)])
        if isinstance(chosen, bytes):
            return chosen.decode()
        return chosen


def requeue_from_dead_nodes(r: redis.Redis, picker: NodePicker, *, now_ms: int, dead_after_ms: int,
                            max_attempts: int) -> int:
    """Moves the queued and in-flight messages of dead nodes onto live nodes.

    A message whose activation is already final is dropped. One that has been dispatched
    ``max_attempts`` times, or whose ``deadline`` (epoch ms) has passed, is finished as a
    whisk internal error. Others are dispatched again with ``attempt`` + 1; when no node is
    alive they are put back where they were, for a later pass.

    Args:
        now_ms: the current time, epoch ms.
        dead_after_ms: a node is dead when its alive key is gone and it was last seen longer
            ago than this (ms).
        max_attempts: dispatches an activation gets at most.

    Returns:
        How many messages were dispatched again.
    """
    moved = 0
    for node_id in state.dead_nodes(r, now_ms=now_ms, dead_after_ms=dead_after_ms):
        while (orphan := state.pop_orphan(r, node_id)) is not None:
            source, raw = orphan
            try:
                message = json.loads(raw)
                activation_id = message["activationId"]
            except (ValueError, KeyError, TypeError):
                log.error("dropped a malformed message from dead node %s", node_id)
                continue
            record = state.get_activation(r, activation_id)
            if record is None or state.is_final(record):
                continue
            attempt = int(message.get("attempt", 1))
            if attempt >= max_attempts or now_ms > int(message.get("deadline", now_ms)):
                reason = (f"The activation was lost with invoker node {node_id} after {attempt} "
                          f"attempt{'s' if attempt != 1 else ''}.")
                state.finish_activation(r, state.final_record(
                    record, state.WHISK_ERROR, {"error": reason}, start_ms=record["start"], end_ms=now_ms))
                continue
            message["attempt"] = attempt + 1
            if picker.dispatch(message) is None:
                r.rpush(source, raw)
                break
            moved += 1
            log.info("re-queued activation %s from dead node %s (attempt %d)", activation_id, node_id, attempt + 1)
    return moved
