"""``torpor status``: the cluster's nodes, devices and SLO attainment as Redis describes them.

Nodes are those in ``torpor:nodes`` (registered by invokers) and those with device hashes
(``torpor:node:{id}:device:{k}``, published by GPU servers), so a GPU server without an
invoker shows too. A node is *alive* while its invoker's TTL key ``torpor:node:{id}:alive``
exists; ``last_seen`` is its invoker's last heartbeat, ``updated`` a device's last
publication by the GPU server. A device's *link load* is the swap-ins in flight on its host
link (all devices of the node behind that link). SLO attainment, per function and per node,
is read from the per-minute counters the invokers keep (``controller_plugin.attainment``)
over the last ``--slo-window-min`` minutes (docs/architecture.md has the key layout).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import click
import redis

from controller_plugin import attainment, state
from controller_plugin.slo import PERCENTILE
from runtime.settings import from_kwargs, options, setting

MIB = 1 << 20


@dataclass
class StatusSettings:
    """Settings of ``torpor status``."""

    redis_url: str = setting("redis://127.0.0.1:6379/0", "TORPOR_REDIS_URL", "Redis holding the cluster state")
    interval_s: float = setting(1.0, "TORPOR_STATUS_INTERVAL_S", "refresh period of --watch", "s")
    slo_window_min: int = setting(5, "TORPOR_STATUS_SLO_WINDOW_MIN",
                                  f"window of SLO attainment: the activations that ended in the last N "
                                  f"minutes count (1-{attainment.KEEP_MINUTES})", "min")


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
        "evictions": _int(fields.get("evictions")), "link": fields.get("link"),
        "transfers_in_flight": _int(fields.get("transfers_in_flight")),
        "bytes_in_flight": _int(fields.get("bytes_in_flight")),
        "link_transfers_in_flight": _int(fields.get("link_transfers_in_flight")),
        "link_bytes_in_flight": _int(fields.get("link_bytes_in_flight")),
        "updated_age_s": None if updated is None else max(0.0, (now - updated) / 1000),
    }


def _share(met: int, total: int) -> float | None:
    return met / total if total else None


def collect(client: redis.Redis, slo_window_min: int = 5) -> dict:
    """The cluster's state: ``{"time": epoch ms, "nodes": [...], "slo": {...}}``.

    ``nodes`` are sorted by id, each ``{"node", "alive", "last_seen_age_s", "queued",
    "running", "slo_total", "slo_met", "slo_attainment", "devices": [...]}`` and each device
    ``{"device", "name", "kind", "healthy", "fault", "resident" (model names),
    "arena_bytes", "used_bytes", "queue", "swap_ins", "evictions", "link" (host link id),
    "transfers_in_flight", "bytes_in_flight" (swap-ins landing on the device),
    "link_transfers_in_flight", "link_bytes_in_flight" (on its whole host link),
    "updated_age_s"}``. ``slo`` is ``{"window_min", "functions" (how many finished an
    activation in the window), "functions_meeting" (those whose attainment is at least the
    SLO percentile, 98 %), "actions": [{"action" ("ns/name"), "slo_ms", "total", "met",
    "attainment", "meeting"}]}``, actions sorted by name. Attainment is ``met / total``
    (None without activations); ages are in seconds (None: never seen); missing fields are
    None; bytes are bytes.

    Args:
        client: Redis client with ``decode_responses=True``.
        slo_window_min: minutes of finished activations SLO attainment counts.

    Raises:
        redis.RedisError: Redis unreachable.
        ValueError: ``slo_window_min`` outside 1..60.
    """
    now = int(time.time() * 1000)
    counted = attainment.read(client, now, slo_window_min)
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
        slo = counted["nodes"].get(node, {"total": 0, "met": 0})
        out.append({"node": node, "alive": bool(alive),
                    "last_seen_age_s": None if last_seen is None else max(0.0, (now - last_seen) / 1000),
                    "queued": queued, "running": running, "slo_total": slo["total"], "slo_met": slo["met"],
                    "slo_attainment": _share(slo["met"], slo["total"]), "devices": devices})
    actions = []
    for name, c in sorted(counted["actions"].items()):
        share = _share(c["met"], c["total"])
        actions.append({"action": name, "slo_ms": c["slo_ms"], "total": c["total"], "met": c["met"],
                        "attainment": share, "meeting": share is not None and share >= PERCENTILE / 100})
    slo = {"window_min": slo_window_min, "functions": sum(1 for a in actions if a["total"]),
           "functions_meeting": sum(1 for a in actions if a["meeting"]), "actions": actions}
    return {"time": now, "nodes": out, "slo": slo}


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


def _percent(met: int, total: int) -> str:
    return "-" if not total else f"{100 * met / total:.1f}% ({met}/{total})"


def _link_load(d: dict) -> str:
    if d["link_transfers_in_flight"] is None:
        return "?"
    if not d["link_transfers_in_flight"]:
        return "idle"
    return f"{d['link_transfers_in_flight']} ({_mib(d['link_bytes_in_flight'])} MiB)"


def rows(snapshot: dict) -> list[list[str]]:
    """The node table of :func:`collect`'s result: a header row, then one row per device (a
    node without devices gets one row of its own). SLO is the node's share of activations
    that met their SLO in the window; LINK LOAD the swap-ins in flight on the device's host
    link and their bytes. Faults are cut at 48 characters (``--json`` has them whole)."""
    table = [["NODE", "ALIVE", "LAST SEEN", "QUEUED", "RUNNING", "SLO", "DEVICE", "NAME", "HEALTH", "ARENA MiB",
              "QUEUE", "SWAP-INS", "EVICTIONS", "LINK", "LINK LOAD", "UPDATED", "RESIDENT"]]
    for n in snapshot["nodes"]:
        head = [n["node"], "yes" if n["alive"] else "no", _age(n["last_seen_age_s"]), str(n["queued"]),
                str(n["running"]), _percent(n["slo_met"], n["slo_total"])]
        if not n["devices"]:
            table.append(head + ["-"] * 11)
        for i, d in enumerate(n["devices"]):
            health = "ok" if d["healthy"] else ("FAILED: " + _short(d["fault"]) if d["fault"] else "FAILED")
            table.append((head if i == 0 else [""] * len(head)) + [
                str(d["device"]), d["name"], health, f"{_mib(d['used_bytes'])}/{_mib(d['arena_bytes'])}",
                _value(d["queue"]), _value(d["swap_ins"]), _value(d["evictions"]), d["link"] or "?", _link_load(d),
                _age(d["updated_age_s"]), ", ".join(d["resident"]) or "-"])
    return table


def slo_rows(snapshot: dict) -> list[list[str]]:
    """The function table of :func:`collect`'s result: a header row, then per function its
    SLO, the activations that ended in the window, the share that met the SLO, and whether
    that share reaches the SLO percentile (98 %)."""
    table = [["FUNCTION", "SLO ms", "REQUESTS", "SLO ATTAINMENT", "MEETS SLO"]]
    for a in snapshot["slo"]["actions"]:
        table.append([a["action"], "?" if a["slo_ms"] is None else f"{a['slo_ms']:g}", str(a["total"]),
                      _percent(a["met"], a["total"]), "yes" if a["meeting"] else "no"])
    return table


def _slo_caption(snapshot: dict) -> str:
    slo = snapshot["slo"]
    return (f"SLO attainment over the last {slo['window_min']} min: {slo['functions_meeting']} of "
            f"{slo['functions']} functions meet their SLO (P{PERCENTILE:g})")


def _text_table(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]


def render(snapshot: dict) -> str:
    """:func:`rows` and :func:`slo_rows` as aligned plain text (columns separated by two
    spaces), the function table after a blank line and a caption."""
    lines = _text_table(rows(snapshot))
    if not snapshot["nodes"]:
        lines.append("(no nodes in Redis)")
    lines += ["", _slo_caption(snapshot)]
    if snapshot["slo"]["actions"]:
        lines += _text_table(slo_rows(snapshot))
    return "\n".join(lines)


def _rich_tables(snapshot: dict):
    from rich import box
    from rich.console import Group
    from rich.table import Table

    tables = []
    for table_rows, caption in ((rows(snapshot), time.strftime("%H:%M:%S", time.localtime(snapshot["time"] / 1000))),
                                (slo_rows(snapshot), _slo_caption(snapshot))):
        table = Table(caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
        for name in table_rows[0]:
            table.add_column(name)
        for r in table_rows[1:]:
            table.add_row(*r)
        tables.append(table)
    return Group(*tables)


def _watch(client: redis.Redis, settings: StatusSettings, as_json: bool) -> None:
    try:
        from rich.live import Live
    except ImportError:
        Live = None
    if as_json or Live is None:
        while True:
            snapshot = collect(client, settings.slo_window_min)
            if not as_json:
                click.clear()
            click.echo(json.dumps(snapshot) if as_json else render(snapshot))
            time.sleep(settings.interval_s)
    with Live(_rich_tables(collect(client, settings.slo_window_min)), auto_refresh=False) as live:
        while True:
            time.sleep(settings.interval_s)
            live.update(_rich_tables(collect(client, settings.slo_window_min)), refresh=True)


@click.command("status")
@options(StatusSettings)
@click.option("--watch", is_flag=True, help="refresh every --interval-s until Ctrl-C")
@click.option("--json", "as_json", is_flag=True, help="print the state as JSON (with --watch: one object a line)")
def command(watch: bool, as_json: bool, **kwargs: Any) -> None:
    """Show the nodes and devices of the cluster (liveness, resident models, arena use, queues, link load,
    health) and SLO attainment per node and per function."""
    settings = from_kwargs(StatusSettings, kwargs)
    if settings.interval_s <= 0:
        raise click.BadParameter("must be positive", param_hint="--interval-s")
    if not 1 <= settings.slo_window_min <= attainment.KEEP_MINUTES:
        raise click.BadParameter(f"must be 1 to {attainment.KEEP_MINUTES}", param_hint="--slo-window-min")
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5)
    try:
        if watch:
            _watch(client, settings, as_json)  # until Ctrl-C
        else:
            snapshot = collect(client, settings.slo_window_min)
            click.echo(json.dumps(snapshot, indent=2) if as_json else render(snapshot))
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot read the cluster state from {settings.redis_url}: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
