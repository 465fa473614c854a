"""``torpor status``: the cluster's nodes and devices as Redis describes them.

Nodes are those in ``torpor:nodes`` (registered by invokers) and those with device hashes
(``torpor:node:{id}:device:{k}``, published by GPU servers), so a GPU server without an
invoker shows too. A node is *alive* while its invoker's TTL key ``torpor:node:{id}:alive``
exists; ``last_seen`` is its invoker's last heartbeat, ``updated`` a device's last
publication by the GPU server (docs/architecture.md has the key layout).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import click
import redis

from controller_plugin import state
from runtime.settings import from_kwargs, options, setting

MIB = 1 << 20


@dataclass
class StatusSettings:
    """Settings of ``torpor status``."""

    redis_url: str = setting("redis://127.0.0.1:6379/0", "TORPOR_REDIS_URL", "Redis holding the cluster state")
    interval_s: float = setting(1.0, "TORPOR_STATUS_INTERVAL_S", "refresh period of --watch", "s")


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _device(index: int, fields: dict[str, str], now: int) -> dict:
    try:
        resident = json.loads(fields.get("resident") or "[]")
    except ValueError:
        resident = []
    updated = _int(fields.get("updated"))
    return {
        "device": index, "name": fields.get("name", ""), "kind": fields.get("kind", ""),
        "healthy": fields.get("healthy") == "1", "fault": fields.get("fault", ""),
        "resident": resident if isinstance(resident, list) else [],
        "arena_bytes": _int(fields.get("arena_bytes")), "used_bytes": _int(fields.get("used_bytes")),
        "queue": _int(fields.get("queue")), "swap_ins": _int(fields.get("swap_ins")),
        "evictions": _int(fields.get("evictions")),
        "updated_age_s": None if updated is None else max(0.0, (now - updated) / 1000),
    }


def collect(client: redis.Redis) -> dict:
    """The cluster's state: ``{"time": epoch ms, "nodes": [...]}``, nodes sorted by id, each
    ``{"node", "alive", "last_seen_age_s", "queued", "running", "devices": [...]}`` and each
    device ``{"device", "name", "kind", "healthy", "fault", "resident" (model names),
    "arena_bytes", "used_bytes", "queue", "swap_ins", "evictions", "updated_age_s"}``.
    Ages are in seconds (None: never seen); missing fields are None.

    Args:
        client: Redis client with ``decode_responses=True``.

    Raises:
        redis.RedisError: Redis unreachable.
    """
    now = int(time.time() * 1000)
    device_keys: dict[str, list[tuple[int, str]]] = {}
    for key in client.scan_iter(match=state.NODE_PREFIX + "*:device:*", count=500):
        node, _, index = key[len(state.NODE_PREFIX):].rpartition(":device:")
        if _int(index) is not None:
            device_keys.setdefault(node, []).append((int(index), key))
    nodes = sorted(set(client.smembers(state.NODES_KEY)) | set(device_keys))
    pipe = client.pipeline(transaction=False)
    for node in nodes:
        pipe.exists(state.alive_key(node))
        pipe.hget(state.node_key(node), "last_seen")
        pipe.llen(state.queue_key(node))
        pipe.llen(state.inflight_key(node))
        for _, key in sorted(device_keys.get(node, [])):
            pipe.hgetall(key)
    values = iter(pipe.execute())
    out = []
    for node in nodes:
        alive, last_seen, queued, running = (next(values) for _ in range(4))
        last_seen = _int(last_seen)
        devices = [_device(index, next(values), now) for index, _ in sorted(device_keys.get(node, []))]
        out.append({"node": node, "alive": bool(alive),
                    "last_seen_age_s": None if last_seen is None else max(0.0, (now - last_seen) / 1000),
                    "queued": queued, "running": running, "devices": devices})
    return {"time": now, "nodes": out}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MIB:.1f}"


def _value(n: Any) -> str:
    return "?" if n is None else str(n)


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def rows(snapshot: dict) -> list[list[str]]:
    """The table of :func:`collect`'s result: a header row, then one row per device (a node
    without devices gets one row of its own). Faults are cut at 48 characters (``--json``
    has them whole)."""
    table = [["NODE", "ALIVE", "LAST SEEN", "QUEUED", "RUNNING", "DEVICE", "NAME", "HEALTH", "ARENA MiB",
              "QUEUE", "SWAP-INS", "EVICTIONS", "UPDATED", "RESIDENT"]]
    for n in snapshot["nodes"]:
        head = [n["node"], "yes" if n["alive"] else "no", _age(n["last_seen_age_s"]), str(n["queued"]),
                str(n["running"])]
        if not n["devices"]:
            table.append(head + ["-"] * 9)
        for i, d in enumerate(n["devices"]):
            health = "ok" if d["healthy"] else ("FAILED: " + _short(d["fault"]) if d["fault"] else "FAILED")
            table.append((head if i == 0 else [""] * len(head)) + [
                str(d["device"]), d["name"], health, f"{_mib(d['used_bytes'])}/{_mib(d['arena_bytes'])}",
                _value(d["queue"]), _value(d["swap_ins"]), _value(d["evictions"]), _age(d["updated_age_s"]),
                ", ".join(d["resident"]) or "-"])
    return table


def render(snapshot: dict) -> str:
    """:func:`rows` as aligned plain text (columns separated by two spaces)."""
    table = rows(snapshot)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    if not snapshot["nodes"]:
        lines.append("(no nodes in Redis)")
    return "\n".join(lines)


def _rich_table(snapshot: dict):
    from rich import box
    from rich.table import Table

    table_rows = rows(snapshot)
    table = Table(caption=time.strftime("%H:%M:%S", time.localtime(snapshot["time"] / 1000)),
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in table_rows[0]:
        table.add_column(name)
    for r in table_rows[1:]:
        table.add_row(*r)
    return table


def _watch(client: redis.Redis, settings: StatusSettings, as_json: bool) -> None:
    try:
        from rich.live import Live
    except ImportError:
        Live = None
    if as_json or Live is None:
        while True:
            snapshot = collect(client)
            if not as_json:
                click.clear()
            click.echo(json.dumps(snapshot) if as_json else render(snapshot))
            time.sleep(settings.interval_s)
    with Live(_rich_table(collect(client)), auto_refresh=False) as live:
        while True:
            time.sleep(settings.interval_s)
            live.update(_rich_table(collect(client)), refresh=True)


@click.command("status")
@options(StatusSettings)
@click.option("--watch", is_flag=True, help="refresh every --interval-s until Ctrl-C")
@click.option("--json", "as_json", is_flag=True, help="print the state as JSON (with --watch: one object a line)")
def command(watch: bool, as_json: bool, **kwargs: Any) -> None:
    """Show the nodes and devices of the cluster: liveness, resident models, arena use, queues, health."""
    settings = from_kwargs(StatusSettings, kwargs)
    if settings.interval_s <= 0:
        raise click.BadParameter("must be positive", param_hint="--interval-s")
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5)
    try:
        if watch:
            _watch(client, settings, as_json)  # until Ctrl-C
        else:
            snapshot = collect(client)
            click.echo(json.dumps(snapshot, indent=2) if as_json else render(snapshot))
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot read the cluster state from {settings.redis_url}: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
