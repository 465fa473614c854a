"""The soak (issue 6, case 12): hundreds of functions on CPU devices, the trace replayed
(compressed) through the whole stack for minutes, every output checked against native
execution, and the GPU server's host memory watched.

``torpor soak`` (or ``python -m loadgen.soak``) starts a private stack (``runtime.up.Stack``:
Redis, controller, invoker, GPU server) with a node secret, so function tokens are checked
throughout, builds the demo models (``runtime.demo``), deploys ``--functions`` demo functions,
calls one function of each model once (so that every model's host copy is loaded before memory
is first measured), then replays the schedule and writes ``soak-<date>.json`` to
``--out-dir``:

- ``requests``, ``completed``, ``failed``: the replay's counts; ``wrong_outputs``: completed
  requests whose output differs from native execution (``NativeReference.check``);
- ``lost``: requests that got no final answer at all (no HTTP answer, or accepted and never
  finished within ``--settle-s``); ``refused``: requests the controller turned away at the
  door (429/503, nothing queued); ``pending_activations``: activation records still pending in
  Redis after the run, the platform's own count of lost work;
- ``rss_start_mb``, ``rss_end_mb``: the GPU server's resident set size after the warm-up and
  at the end; ``rss_samples``: ``[seconds, RSS, anonymous RSS, shared-memory RSS (MiB),
  threads]`` every 10 s along the run (mapped client segments count as shared memory);
- the latency percentiles, error tally, GPU server counters and the settings.

The run's command line is recorded in the file (``command``). Exit status 1 when any request
was lost or any output was wrong.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import redis
import requests

from controller_plugin import state
from loadgen.replay import FunctionLoad, InvokeResult, replay, summary
from loadgen.trace import default_trace_path, load_trace, schedule
from runtime.settings import from_kwargs, options, setting

ACTIVATION_HEADER = "X-OpenWhisk-Activation-Id"
RSS_SAMPLE_S = 10.0
POLL_S = 0.5


@dataclasses.dataclass
class SoakSettings:
    """Settings of the soak run; every field is also a flag and an env var."""

    functions: int = setting(500, "TORPOR_SOAK_FUNCTIONS", "demo functions to deploy and replay")
    minutes: int = setting(30, "TORPOR_SOAK_MINUTES", "trace minutes to replay", "min")
    speedup: float = setting(3.0, "TORPOR_SOAK_SPEEDUP", "trace seconds per real second (30 min at 3x: 10 real minutes)")
    rate_scale: float = setting(0.01, "TORPOR_SOAK_RATE_SCALE",
                                "factor on the trace's per-minute counts (the full trace is ~84 req/s for 500 functions)")
    seed: int = setting(0, "TORPOR_SOAK_SEED", "seed of function sampling and arrival times")
    concurrency: int = setting(64, "TORPOR_SOAK_CONCURRENCY", "requests outstanding at once at most")
    cpu_devices: int = setting(2, "TORPOR_SOAK_CPU_DEVICES", "CPU devices of the GPU server")
    node_containers: int = setting(96, "TORPOR_SOAK_NODE_CONTAINERS",
                                   "action containers on the node at most (TORPOR_INVOKER_NODE_CONTAINERS)")
    idle_timeout_s: float = setting(120.0, "TORPOR_SOAK_IDLE_TIMEOUT", "an idle action container is stopped after this", "s")
    settle_s: float = setting(300.0, "TORPOR_SOAK_SETTLE_S",
                              "how long an accepted request whose blocking wait ended is polled for its record", "s")
    state_dir: str = setting(".state/soak", "TORPOR_SOAK_STATE_DIR", "directory of the soak's Redis, models and logs")
    out_dir: str = setting("loadgen/results", "TORPOR_SOAK_OUT_DIR", "where soak-<date>.json goes")
    trace: str = setting("", "TORPOR_TRACE", "trace .npy (default: ../shared/traces/torpor_samples.npy)")
    progress: bool = setting(True, "TORPOR_SOAK_PROGRESS", "show a progress bar on stderr")


class SoakClient:
    """Blocking OpenWhisk invocations that tell lost requests from failed and refused ones.

    Called as an :data:`loadgen.replay.Invoke` from many threads. A 202 (the blocking wait
    ended first) is followed by polling the activation until it is final or ``settle_s``
    passes. ``lost`` counts requests without a final answer, ``refused`` those the controller
    turned away before queueing anything (429, or 503 without an activation id).
    """

    def __init__(self, api_host: str, auth: str, settle_s: float, timeout_s: float = 130.0):
        self.base = f"{api_host}/api/v1/namespaces/_"
        self.auth = tuple(auth.split(":", 1))
        self.settle_s, self.timeout_s = settle_s, timeout_s
        self.lost: list[str] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.auth = self.auth
            # a kept-alive connection that the server closes as a request goes out loses that
            # request with no way to tell whether it was queued: one connection per request
            session.headers["Connection"] = "close"
        return session

    def _lose(self, why: str) -> None:
        with self._lock:
            self.lost.append(why)

    def __call__(self, action: str, params: dict) -> InvokeResult:
        begin = time.perf_counter()
        http = self._session()
        try:
            response = http.post(f"{self.base}/actions/{action}", params={"blocking": "true"}, json=params,
                                 timeout=self.timeout_s)
        except requests.RequestException as exc:
            self._lose(f"no answer: {type(exc).__name__}: {str(exc)[:200]}")
            return None, f"lost: no answer ({type(exc).__name__})", (time.perf_counter() - begin) * 1e3
        activation_id = response.headers.get(ACTIVATION_HEADER)
        record = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
        if response.status_code == 202 and activation_id:
            record = self._settle(http, activation_id)
            if record is None:
                self._lose(f"activation {activation_id} never finished")
                return None, "lost: accepted, never finished", (time.perf_counter() - begin) * 1e3
        latency_ms = (time.perf_counter() - begin) * 1e3
        if isinstance(record, dict) and isinstance(record.get("response"), dict):
            outcome = record["response"]
            if outcome.get("success"):
                return outcome.get("result"), None, latency_ms
            return None, f"{outcome.get('status')}: {(outcome.get('result') or {}).get('error')}", latency_ms
        if response.status_code in (429, 503) and not activation_id:
            with self._lock:
                self.refused += 1
        return None, f"HTTP {response.status_code}: {response.text[:300]}", latency_ms

    def _settle(self, http: requests.Session, activation_id: str) -> dict | None:
        deadline = time.monotonic() + self.settle_s
        while time.monotonic() < deadline:
            try:
                response = http.get(f"{self.base}/activations/{activation_id}", timeout=30)
                if response.status_code == 200:
                    return response.json()
            except requests.RequestException:
                pass
            time.sleep(POLL_S)
        return None


def memory(pid: int) -> dict[str, float]:
    """``VmRSS``, ``RssAnon``, ``RssShmem`` (MiB) and ``Threads`` of process ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            fields[key] = int(value)
    return fields


def pending_activations(redis_url: str, namespace: str = "guest") -> int:
    """Activation records of ``namespace`` in Redis that are still pending (never finished)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ids = r.zrange(state.activations_key(namespace), 0, -1)
        pending = 0
        for start in range(0, len(ids), 500):
            for raw in r.mget([state.activation_key(i) for i in ids[start:start + 500]]):
                pending += raw is not None and not state.is_final(json.loads(raw))
        return pending
    finally:
        r.close()


def run_soak(s: SoakSettings) -> dict[str, Any]:
    """Runs the soak described in the module docstring and returns its result dict.

    Raises:
        click.ClickException: a warm-up call failed.
        FileNotFoundError: no trace.
    """
    from runtime import demo
    from runtime.client import GPUServerClient
    from runtime.gpu_server import tokens
    from runtime.gpu_server.repository import Repository
    from runtime.up import Stack, UpSettings

    state_dir = Path(s.state_dir).resolve()
    repo = Repository(state_dir / "models")
    specs = demo.build_repository(repo, state_dir / "weights")
    largest = max(spec.bytes for spec in specs) + (4 << 20)
    device_memory = max(largest, int(0.75 * sum(spec.bytes for spec in specs) / s.cpu_devices)) + (2 << 20)
    functions = demo.functions(s.functions, with_minilm=any(spec.name == demo.MINILM for spec in specs))
    reference = demo.NativeReference(repo)
    for fn in functions:  # the references are computed before the clock starts
        for i in range(demo.INPUT_POOL):
            reference.expected(fn, fn.request(i))
    arrivals = schedule(load_trace(s.trace or default_trace_path()), len(functions), s.seed, s.minutes, s.rate_scale)
    secret = secrets.token_hex(32)
    os.environ.update({"TORPOR_NODE_SECRET": secret, "TORPOR_INVOKER_NODE_CONTAINERS": str(s.node_containers),
                       "TORPOR_INVOKER_IDLE_TIMEOUT": str(s.idle_timeout_s)})
    click.echo(f"{len(functions)} functions over {len(specs)} models, {len(arrivals)} requests in "
               f"{s.minutes} trace minutes at {s.speedup}x", err=True)
    with Stack(UpSettings(state_dir=str(state_dir)), s.cpu_devices, device_memory) as stack:
        gpu_pid = next(proc.pid for name, proc in stack.procs if name == "gpu-server")
        http = stack.session()
        for fn in functions:
            r = http.put(f"{stack.api_host}/api/v1/namespaces/_/actions/{fn.name}?overwrite=true", json=fn.record(),
                         timeout=30)
            r.raise_for_status()
        first_of_model = {fn.model: fn for fn in reversed(functions)}
        for fn in first_of_model.values():
            r = http.post(f"{stack.api_host}/api/v1/namespaces/_/actions/{fn.name}?blocking=true&result=true",
                          json=fn.request(0), timeout=120)
            if r.status_code != 200 or not reference.check(fn, fn.request(0), r.json()):
                raise click.ClickException(f"warm-up of {fn.name} failed: HTTP {r.status_code}: {r.text[:300]}")
        rss_start = memory(gpu_pid)["VmRSS"]
        samples: list[list[float]] = []
        began = time.monotonic()
        done = threading.Event()

        def sample() -> None:
            while not done.wait(RSS_SAMPLE_S):
                m = memory(gpu_pid)
                samples.append([round(time.monotonic() - began, 1), round(m["VmRSS"], 1), round(m["RssAnon"], 1),
                                round(m["RssShmem"], 1), m["Threads"]])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        client = SoakClient(stack.api_host, stack.settings.auth, s.settle_s)
        loads = [FunctionLoad(fn.name, fn.slo_ms, fn.request, lambda params, result, fn=fn: reference.check(fn, params, result))
                 for fn in functions]
        report = replay(client, loads, arrivals, s.speedup, s.concurrency, s.progress)
        done.set()
        sampler.join()
        rss_end = memory(gpu_pid)["VmRSS"]
        stats = GPUServerClient(stack.socket, token=tokens.admin_token(secret)).stats()
        pending = pending_activations(stack.redis.url)
    head = summary(report)
    return {
        "requests": head["requests"], "completed": head["completed"], "failed": head["failed"],
        "lost": len(client.lost), "wrong_outputs": head["wrong_outputs"], "refused": client.refused,
        "pending_activations": pending,
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1), "rss_samples": samples,
        "functions": len(functions), "models": len(specs), "trace_minutes": s.minutes, "speedup": s.speedup,
        "rate_scale": s.rate_scale, "duration_s": round(head["duration_s"], 1),
        "p50_ms": head["p50_ms"], "p99_ms": head["p99_ms"], "errors": head["errors"], "lost_reasons": client.lost[:20],
        "swap_ins": sum(d["swap_ins"] for d in stats["devices"]),
        "evictions": sum(d["evictions"] for d in stats["devices"]),
        "devices": [f"{d['device']}:{d['name']}" for d in stats["devices"]],
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "progress"},
        "command": " ".join(["torpor" if Path(sys.argv[0]).name == "torpor" else "python -m loadgen.soak",
                             *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


@click.command("soak")
@options(SoakSettings)
def command(**kwargs: Any) -> None:
    """Soak: many functions, the trace replayed through the whole stack, every output checked."""
    settings = from_kwargs(SoakSettings, kwargs)
    result = run_soak(settings)
    out = Path(settings.out_dir) / f"soak-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    keys = ("requests", "completed", "failed", "lost", "wrong_outputs", "refused", "pending_activations",
            "rss_start_mb", "rss_end_mb", "swap_ins", "duration_s")
    click.echo(json.dumps({k: result[k] for k in keys}))
    click.echo(f"wrote {out}", err=True)
    if result["lost"] or result["wrong_outputs"] or result["pending_activations"]:
        raise SystemExit(1)


if __name__ == "__main__":
    command()
