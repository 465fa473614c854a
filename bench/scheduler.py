"""Decision latency of the controller's node choice (issue 4): ``NodePicker.dispatch`` — one
EVALSHA of ``pick_node.lua`` that scores every device, books a slot and queues the message —
timed from Python, round trip included, against a private loopback redis-server.

    .venv/bin/python bench/scheduler.py [--decisions 20000] [--out bench/results/scheduler-X.json]

The cluster in Redis: ``--nodes`` × ``--gpus`` devices published as the GPU server publishes
them, ``--functions`` functions each with its own model (sizes and exec times cycled from the
simulator's H200 model set, one predictor profile each), every model resident on one device
and a ``--replicas`` share of them on a second one. Each decision is for a function drawn
uniformly (seeded). The queues are drained as an invoker would: once ``--outstanding``
activations are queued cluster-wide, the oldest is taken off its node's queue (RPOP) and its
booking released, untimed — a steady state of that many activations waiting or running.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import redis

from controller_plugin import state
from controller_plugin.predictor import Predictor
from controller_plugin.routing import RELEASE_LUA, NodePicker
from controller_plugin.simulator import H200_MODELS
from runtime.redis_server import RedisServer
from runtime.settings import from_kwargs, options, setting

ARENA_BYTES = int(0.6 * 141e9)  # the GPU server's default arena share of an H200


@dataclass
class SchedulerBenchSettings:
    """What ``bench/scheduler.py`` measures."""

    nodes: int = setting(8, "TORPOR_BENCH_NODES", "invoker nodes in Redis")
    gpus: int = setting(4, "TORPOR_BENCH_GPUS", "devices per node")
    functions: int = setting(1000, "TORPOR_BENCH_FUNCTIONS", "functions, each with its own model")
    replicas: float = setting(0.25, "TORPOR_BENCH_REPLICAS", "share of models also resident on a second device")
    decisions: int = setting(20000, "TORPOR_BENCH_DECISIONS", "timed dispatch decisions")
    warmup: int = setting(500, "TORPOR_BENCH_WARMUP", "untimed decisions first")
    outstanding: int = setting(64, "TORPOR_BENCH_OUTSTANDING", "activations kept queued cluster-wide")
    seed: int = setting(0, "TORPOR_BENCH_SEED", "random seed")
    out: str = setting("", "TORPOR_BENCH_OUT", "result file (default bench/results/scheduler-<cpu>.json)")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def scheduling() -> str:
    """This process's CPU scheduling policy and priority, e.g. ``SCHED_OTHER nice 0``."""
    policy = os.sched_getscheduler(0)
    if policy in (os.SCHED_FIFO, os.SCHED_RR):
        name = "SCHED_FIFO" if policy == os.SCHED_FIFO else "SCHED_RR"
        return f"{name} {os.sched_getparam(0).sched_priority}"
    return f"SCHED_OTHER nice {os.nice(0)}"


def default_out(cpu: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)|\bcpu\b", "", cpu.lower())).strip("-")
    return Path(__file__).resolve().parent / "results" / f"scheduler-{slug}-{os.cpu_count()}cores.json"


def populate(r: redis.Redis, cfg: SchedulerBenchSettings, rng: random.Random) -> tuple[list[str], Predictor]:
    """Writes the nodes, their devices and the model registry; returns the model names and a
    predictor holding their profiles."""
    predictor = Predictor()
    names = []
    for i in range(cfg.functions):
        spec = H200_MODELS[i % len(H200_MODELS)]
        name = f"fn{i:04d}-{spec.name}"
        names.append(name)
        predictor.set_profile(name, spec.bytes, spec.exec_ms, "NVIDIA H200")
        r.hset(state.PREFIX + "models", name, json.dumps({"name": name, "bytes": spec.bytes}))
    devices = [(f"node{n}", k) for n in range(cfg.nodes) for k in range(cfg.gpus)]
    resident: dict[tuple[str, int], list[str]] = {d: [] for d in devices}
    for name in names:
        for device in rng.sample(devices, 2 if rng.random() < cfg.replicas else 1):
            resident[device].append(name)
    now = int(time.time() * 1000)
    sizes = {name: H200_MODELS[i % len(H200_MODELS)].bytes for i, name in enumerate(names)}
    for n in range(cfg.nodes):
        node_id = f"node{n}"
        r.sadd(state.NODES_KEY, node_id)
        r.hset(state.node_key(node_id), mapping={"last_seen": now, "started": now, "gpu_socket": "/run/torpor/gpu.sock",
                                                 "devices": json.dumps([{"device": k, "name": "NVIDIA H200", "kind": "cuda",
                                                                         "arena_bytes": ARENA_BYTES}
                                                                        for k in range(cfg.gpus)])})
        r.set(state.alive_key(node_id), 1, px=3_600_000)  # no heartbeat here: alive for the run
        for k in range(cfg.gpus):
            models = resident[(node_id, k)]
            r.hset(state.device_key(node_id, k), mapping={
                "resident": json.dumps(sorted(models)), "arena_bytes": ARENA_BYTES,
                "used_bytes": sum(sizes[m] for m in models), "queue": 0, "healthy": 1, "kind": "cuda",
                "name": "NVIDIA H200", "swap_ins": 0, "evictions": 0, "fault": "", "updated": now})
    return names, predictor


def message(name: str, i: int) -> dict:
    """An activation message as the controller's API builds it."""
    now = int(time.time() * 1000)
    return {"activationId": f"{i:032x}", "namespace": "guest", "action": name.split("-")[0], "version": "0.0.1",
            "params": {"image": "https://example.com/cat.jpg", "top": 5}, "models": [name], "gpu": None,
            "timeout_ms": 60000, "deadline": now + 90000, "submitted": now, "attempt": 1, "subject": "guest",
            "blocking": True}


def percentile(sorted_ms: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of sorted samples, nearest rank."""
    return sorted_ms[min(len(sorted_ms) - 1, max(0, round(q * len(sorted_ms)) - 1))]


def run(cfg: SchedulerBenchSettings) -> dict:
    """Runs the benchmark; returns the result record (also written to the out file)."""
    rng = random.Random(cfg.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        names, predictor = populate(r, cfg, rng)
        picker = NodePicker(r, predictor, kind="NVIDIA H200")
        pending: deque[str] = deque()
        timings, local, drained = [], 0, 0
        for i in range(cfg.warmup + cfg.decisions):
            msg = message(names[rng.randrange(len(names))], i)
            start = time.perf_counter()
            node = picker.dispatch(msg)
            elapsed = time.perf_counter() - start
            if node is None:
                raise RuntimeError("no node took the activation: the cluster in Redis is not as populated")
            if i == cfg.warmup - 1:
                r.config_resetstat()  # from here on, EVALSHA in commandstats is the pick alone
            if i >= cfg.warmup:
                timings.append(elapsed * 1000)
            pending.append(node)
            while len(pending) > cfg.outstanding:
                oldest = pending.popleft()
                booking = json.loads(r.rpop(state.queue_key(oldest)))["booking"]
                # NodePicker.release's script, run by EVAL so that EVALSHA counts picks only
                r.eval(RELEASE_LUA, 0, state.node_key(oldest), booking)
                drained += 1
                local += booking.endswith("|0")  # no host copy: the model was resident there
        script = r.info("commandstats").get("cmdstat_evalsha", {})
        version = r.info("server")["redis_version"]
        r.close()
    timings.sort()
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "host": socket.gethostname(),
                     "python": platform.python_version(), "redis": version,
                     # a shared machine: what else ran, and the priority this process and its
                     # redis-server ran at (e.g. under `chrt -f 10`)
                     "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                     "scheduling": scheduling()},
        "settings": asdict(cfg),
        "decision_ms": {"p50": percentile(timings, 0.5), "p90": percentile(timings, 0.9),
                        "p99": percentile(timings, 0.99), "p999": percentile(timings, 0.999),
                        "max": timings[-1], "mean": statistics.fmean(timings)},
        "script_us_in_redis": {"mean": script.get("usec_per_call"), "calls": script.get("calls")},
        "decisions_per_s": len(timings) / (sum(timings) / 1000),
        "resident_share": local / drained if drained else None,
        "models_per_device": cfg.functions * (1 + cfg.replicas) / (cfg.nodes * cfg.gpus),
    }


@click.command()
@options(SchedulerBenchSettings)
def command(**kwargs) -> None:
    """Time the controller's node choice against a loopback redis-server."""
    cfg = from_kwargs(SchedulerBenchSettings, kwargs)
    result = run(cfg)
    out = Path(cfg.out) if cfg.out else default_out(result["hardware"]["cpu"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    d = result["decision_ms"]
    click.echo(f"{cfg.decisions} decisions, {cfg.nodes} nodes x {cfg.gpus} GPUs, {cfg.functions} functions: "
               f"p50 {d['p50']:.3f} ms, p99 {d['p99']:.3f} ms, max {d['max']:.3f} ms "
               f"(script {result['script_us_in_redis']['mean']} us in Redis on average) -> {out}")


if __name__ == "__main__":
    command()
