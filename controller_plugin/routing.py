"""Node choice: where an activation runs, and moving the work of dead nodes to live ones.

The choice is one Lua script (``pick_node.lua``, after ``bookings.lua``) so that reading the
cluster state, booking a slot on the chosen device and queueing the activation happen
atomically. It scores each candidate device by predicted completion, with the arithmetic of
:class:`controller_plugin.predictor.Predictor`; this module hands it the inputs of that
arithmetic (model bytes, execution profiles, link bandwidth) from a ``Predictor``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources

import redis

from controller_plugin import state
from controller_plugin.predictor import ANY_KIND, Predictor

log = logging.getLogger(__name__)

_LUA = resources.files(__package__)
BOOKINGS_LUA = _LUA.joinpath("bookings.lua").read_text()
PICK_NODE_LUA = BOOKINGS_LUA + _LUA.joinpath("pick_node.lua").read_text()
RELEASE_LUA = BOOKINGS_LUA + "return drop_booking(ARGV[1], ARGV[2])\n"

MODELS_KEY = state.PREFIX + "models"
# A ResNet-50's fp32 weights: the size assumed for a model neither profiled nor registered.
DEFAULT_MODEL_BYTES = 102_000_000
# OpenWhisk's default action time limit, for messages without ``timeout_ms``.
DEFAULT_TIMEOUT_MS = 60_000
# How long a model registry lookup (``torpor:models``) is trusted, s.
REGISTRY_TTL_S = 60.0
REGISTRY_CACHE = 4096  # model sizes remembered at most (least recently looked up dropped first)


def epoch_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


class AlreadyMoved(Exception):
    """A re-dispatched message was no longer where it was to be moved from."""


@dataclass(frozen=True)
class Pick:
    """Where one activation was queued.

    Attributes:
        node: node id.
        device: device index proposed to the node (the message's ``gpu``), or None when no
            device was (an activation naming no model, a node without published devices).
        predicted_ms: predicted completion on that device: wait + service, ms.
        resident: how many of the activation's models are resident there.
        booking: the booking's member in ``torpor:node:{id}:booked`` (the message's
            ``booking``), or None.
    """

    node: str
    device: int | None
    predicted_ms: float
    resident: int
    booking: str | None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NodePicker:
    """Queues activation messages on the live node and device predicted to finish them first.

    Args:
        r: Redis client (with or without ``decode_responses``); the scripts are registered on
            it (EVALSHA, loaded on first use).
        predictor: source of model bytes, execution profiles (ms), link bandwidth and the
            pipelined-swap tail; a fresh ``Predictor()`` (every model at its
            ``default_exec_ms``) when None.
        kind: device kind whose profiles are used (``Predictor.profile`` falls back to the
            kind-independent one).
        default_slots: concurrent bookings a device takes when its hash has no ``slots``
            field; 0 for no limit.
        default_model_bytes: weight bytes of a model neither profiled nor registered in
            ``torpor:models``.
    """

    def __init__(self, r: redis.Redis, predictor: Predictor | None = None, *, kind: str = ANY_KIND,
                 default_slots: int = 0, default_model_bytes: int = DEFAULT_MODEL_BYTES):
        self.redis = r
        self.predictor = predictor if predictor is not None else Predictor()
        self.kind = kind
        self.default_slots = default_slots
        self.default_model_bytes = default_model_bytes
        self._pick = r.register_script(PICK_NODE_LUA)
        self._release = r.register_script(RELEASE_LUA)
        # model name -> (bytes in the registry or None, monotonic time of the lookup)
        self._registered: OrderedDict[str, tuple[int | None, float]] = OrderedDict()
        self._registered_lock = threading.Lock()

    def dispatch(self, message: dict, moved_from: tuple[str, bytes | str] | None = None) -> str | None:
        """Picks a node for ``message`` and LPUSHes it onto ``torpor:node:{id}:queue``.

        Args:
            message: the activation message (``docs/architecture.md``).
            moved_from: (list key, raw element): a re-dispatch; the element is removed from
                that list in the same script, only when the message was queued.

        Raises:
            AlreadyMoved: with ``moved_from``, the element was gone from its list (another
                dispatcher moved the message); nothing was queued.

        Returns:
            The node id, or None when no live node has a device with a free slot (nothing
            was queued).

        Raises:
            redis.RedisError: Redis failed; the message may or may not have been queued.
        """
        chosen = self.pick(message, moved_from=moved_from)
        return chosen.node if chosen is not None else None

    def pick(self, message: dict, now: int | None = None,
             moved_from: tuple[str, bytes | str] | None = None) -> Pick | None:
        """Like :meth:`dispatch` (``moved_from`` likewise), with the whole decision as the
        answer.

        The message is queued with ``gpu`` (the proposed device) and ``booking`` set, and
        the device's slot is booked until :meth:`release` or the booking's expiry: the
        later of ``deadline`` and now, plus ``timeout_ms`` (an activation started just
        before its deadline may run that long).

        Args:
            message: the activation message; its ``models`` are scored.
            now: the current time, epoch ms (default: the clock).

        Returns:
            The decision, or None when nothing was queued.

        Raises:
            redis.RedisError: Redis failed; the message may or may not have been queued.
        """
        now = epoch_ms() if now is None else now
        timeout = message.get("timeout_ms") or DEFAULT_TIMEOUT_MS
        deadline = message.get("deadline")
        expires = max(deadline if isinstance(deadline, (int, float)) else now, now) + timeout
        body = json.dumps({k: v for k, v in message.items() if k not in ("gpu", "booking")}, separators=(",", ":"))
        links = self.predictor.links
        args = [state.NODE_PREFIX, now, int(expires), body, "1" if "gpu" in message else "0",
                f"{message.get('activationId')}:{message.get('attempt', 1)}", repr(float(links.pcie_bytes_per_s)),
                repr(float(self.predictor.pipeline_tail)), int(self.default_slots),
                repr(float(self.predictor.default_exec_ms))]
        keys = [state.NODES_KEY]
        if moved_from is not None:
            keys.append(moved_from[0])
            args.append(moved_from[1])
        for name in message.get("models") or []:
            nbytes, exec_ms = self.model_inputs(name)
            args += [json.dumps(name), nbytes, repr(float(exec_ms))]
        answer = self._pick(keys=keys, args=args)
        if answer is None:
            return None
        if answer == 0:
            raise AlreadyMoved(f"activation {message.get('activationId')} is no longer in {moved_from[0]}")
        node, device, predicted, resident, booking = (_text(v) for v in answer)
        return Pick(node, int(device) if int(device) >= 0 else None, float(predicted), int(resident), booking or None)

    def release(self, node_id: str, message: dict | str | bytes) -> bool:
        """Gives back the device slot a message booked on ``node_id`` (idempotent).

        Args:
            node_id: the node the message was queued on.
            message: the message as queued (parsed or raw JSON); one without a booking, or
                not JSON, books nothing.

        Returns:
            True when a booking was dropped.

        Raises:
            redis.RedisError: Redis failed (the booking then lapses at its expiry).
        """
        if not isinstance(message, dict):
            try:
                message = json.loads(message)
            except (ValueError, TypeError):
                return False
        booking = message.get("booking") if isinstance(message, dict) else None
        if not isinstance(booking, str) or not booking:
            return False
        return bool(self._release(keys=[], args=[state.node_key(node_id), booking]))

    def model_inputs(self, name: str) -> tuple[int, float]:
        """The weight bytes and resident execution ms the script is given for model ``name``.

        Bytes come from the predictor's profile, else from the model registry
        (``torpor:models``, looked up at most every ``REGISTRY_TTL_S`` per model), else
        ``default_model_bytes``; exec ms from the profile, else ``default_exec_ms``.

        Raises:
            redis.RedisError: the registry lookup failed.
        """
        profile = self.predictor.profile(name, self.kind)
        exec_ms = profile.exec_ms if profile is not None else self.predictor.default_exec_ms
        if profile is not None and profile.bytes > 0:
            return profile.bytes, exec_ms
        nbytes = self._registry_bytes(name)
        return (nbytes if nbytes else self.default_model_bytes), exec_ms

    def _registry_bytes(self, name: str) -> int | None:
        with self._registered_lock:
            cached = self._registered.get(name)
        if cached is not None and time.monotonic() - cached[1] < REGISTRY_TTL_S:
            return cached[0]
        raw = self.redis.hget(MODELS_KEY, name)
        try:
            nbytes = int(json.loads(raw)["bytes"]) if raw is not None else None
        except (ValueError, TypeError, KeyError):
            nbytes = None
        with self._registered_lock:
            self._registered[name] = (nbytes, time.monotonic())
            self._registered.move_to_end(name)
            while len(self._registered) > REGISTRY_CACHE:
                self._registered.popitem(last=False)
        return nbytes


def check_picker_settings(profiles: str, device_slots: int) -> None:
    """Checks what :func:`build_picker` will be given, at a process's start.

    Raises:
        click.BadParameter: unreadable or malformed profiles, negative slots.
    """
    import click

    if profiles:
        try:
            Predictor().load_bench(profiles)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--profiles / TORPOR_CONTROLLER_PROFILES") from None
    if device_slots < 0:
        raise click.BadParameter("must be >= 0", param_hint="--device-slots / TORPOR_DEVICE_SLOTS")


def build_picker(r: redis.Redis, profiles: str = "", gpu_kind: str = "", device_slots: int = 0) -> NodePicker:
    """The node choice every dispatcher (controller, an invoker re-dispatching) must share:
    the latency predictor seeded from ``profiles`` (a bench/swap.py result; empty: every
    model at the default) for GPU type ``gpu_kind`` (empty: any), and the device slot limit
    ``device_slots`` (0: none).

    Raises:
        OSError, ValueError: the profiles file is unreadable or malformed.
    """
    kind = gpu_kind or ANY_KIND
    predictor = Predictor()
    if profiles:
        predictor.load_bench(profiles, kind=kind)
    return NodePicker(r, predictor, kind=kind, default_slots=device_slots)


def requeue_from_dead_nodes(r: redis.Redis, picker: NodePicker, *, now_ms: int, dead_after_ms: int,
                            max_attempts: int) -> int:
    """Moves the queued and in-flight messages of dead nodes onto live nodes.

    A message whose activation is already final is dropped. One that has been dispatched
    ``max_attempts`` times, or whose ``deadline`` (epoch ms) has passed, is finished as a
    whisk internal error. Others are dispatched again with ``attempt`` + 1, moved off the
    dead node's list in the same script; when no node takes them they stay where they are,
    for a later pass. Each message's booking on the dead node is released. Several
    controllers may run this at once: each message is moved or finished by one of them.

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
        while (orphan := state.peek_orphan(r, node_id)) is not None:
            source, raw = orphan
            try:
                message = json.loads(raw)
                activation_id = message["activationId"]
                attempt = int(message.get("attempt", 1))
                deadline = int(message.get("deadline", now_ms))
            except (ValueError, KeyError, TypeError, AttributeError):
                log.error("dropped a malformed message from dead node %s", node_id)
                r.lrem(source, 1, raw)
                continue
            # its slot on the dead node's device is free whatever happens to it now
            picker.release(node_id, message)
            record = state.get_activation(r, activation_id)
            if record is None or state.is_final(record):
                r.lrem(source, 1, raw)
                continue
            if attempt >= max_attempts or now_ms > deadline:
                if not r.lrem(source, 1, raw):  # another controller's pass has it
                    continue
                reason = (f"The activation was lost with invoker node {node_id} after {attempt} "
                          f"attempt{'s' if attempt != 1 else ''}.")
                state.finish_activation(r, state.final_record(
                    record, state.WHISK_ERROR, {"error": reason}, start_ms=record["start"], end_ms=now_ms),
                    blocking=message.get("blocking") is True)
                continue
            message["attempt"] = attempt + 1
            # queued elsewhere and taken off the dead node's list in one script: a crash of this
            # controller between the two cannot lose it, nor can two controllers move it twice
            try:
                if picker.dispatch(message, moved_from=(source, raw)) is None:
                    break  # no live node can take it: left where it is for a later pass
            except AlreadyMoved:
                continue
            moved += 1
            log.info("re-queued activation %s from dead node %s (attempt %d)", activation_id, node_id, attempt + 1)
    return moved
