"""``torpor up``: the whole platform on this machine — a private Redis, the controller, and
one node (GPU server + invoker) on the GPUs it finds or on CPU devices. With ``--demo`` it
also registers the demo models, deploys a dozen functions, replays the Torpor trace through
the REST API, checks every output against native execution, prints the report and stops
everything; the last line printed is one JSON object."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import requests

from runtime.redis_server import RedisServer, free_port
from runtime.settings import from_kwargs, options, setting

from controller_plugin.config import GUEST_AUTH


@dataclass
class UpSettings:
    """Settings of ``torpor up``."""

    state_dir: str = setting(".state", "TORPOR_STATE_DIR", "directory for Redis data, models, sockets and logs")
    auth: str = setting(GUEST_AUTH, "TORPOR_AUTH", "UUID:KEY of the local development namespace")
    controller_port: int = setting(0, "TORPOR_CONTROLLER_PORT", "REST API port (0: a free one)")
    gpu_metrics_port: int = setting(0, "TORPOR_GPU_METRICS_PORT",
                                    "port of the GPU server's /metrics, /healthz, /readyz (0: a free one)")
    cpu_devices: int = setting(0, "TORPOR_CPU_DEVICES", "CPU devices to serve on (0: the GPUs found, else 2 CPU devices)")
    device_memory: int = setting(0, "TORPOR_DEVICE_MEMORY", "weight arena per device (0: demo sizes it below the models' total)", "bytes")
    functions: int = setting(12, "TORPOR_DEMO_FUNCTIONS", "functions the demo deploys")
    minutes: int = setting(10, "TORPOR_DEMO_MINUTES", "trace minutes the demo replays")
    speedup: float = setting(5.0, "TORPOR_DEMO_SPEEDUP", "trace time compression of the demo replay")
    seed: int = setting(0, "TORPOR_DEMO_SEED", "seed of the demo's trace sampling")


class Stack:
    """The processes of one local deployment, started in order and stopped in reverse.

    Args:
        settings: where state goes and how devices are set up.
        device_memory: weight arena bytes per CPU device (0: the GPU server's default).
        cpu_devices: CPU devices (0: the GPUs if any).
    """

    def __init__(self, settings: UpSettings, cpu_devices: int, device_memory: int):
        self.settings = settings
        self.state = Path(settings.state_dir).resolve()
        self.cpu_devices = cpu_devices
        self.device_memory = device_memory
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.redis: RedisServer | None = None
        self.port = settings.controller_port or free_port()
        self.api_host = f"http://127.0.0.1:{self.port}"
        self.gpu_metrics_port = settings.gpu_metrics_port or free_port()
        self.gpu_metrics_url = f"http://127.0.0.1:{self.gpu_metrics_port}"
        self.socket = str(self.state / "run" / "gpu.sock")
        self.model_repo = str(self.state / "models")
        # the GPU server refuses to run without one; the invoker signs the actions' tokens with it
        self.node_secret = os.environ.get("TORPOR_NODE_SECRET") or secrets.token_hex(32)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "TORPOR_REDIS_URL": self.redis.url, "TORPOR_GPU_SOCKET": self.socket, "TORPOR_MODEL_REPO": self.model_repo,
            "TORPOR_NODE_ID": "node0", "TORPOR_AUTH": self.settings.auth, "TORPOR_CONTROLLER_PORT": str(self.port),
            "TORPOR_API_HOST": self.api_host, "TORPOR_CPU_DEVICES": str(self.cpu_devices), "PYTHONUNBUFFERED": "1",
            "TORPOR_GPU_METRICS_PORT": str(self.gpu_metrics_port), "TORPOR_NODE_SECRET": self.node_secret,
            "TORPOR_INVOCATIONS_PER_MINUTE": "1000000", "TORPOR_CONCURRENT_LIMIT": "1000",
        })
        if self.cpu_devices:
            # CPU devices share the machine's cores with every other process of the stack
            env.setdefault("TORPOR_TORCH_THREADS", "1")
            env.setdefault("TORPOR_INVOKER_MAX_CONTAINERS", "2")
        if self.device_memory:
            env["TORPOR_DEVICE_MEMORY"] = str(self.device_memory)
            env["TORPOR_ARENA_BYTES"] = str(self.device_memory)
        return env

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.state / "logs" / f"{name}.log", "ab")
        torpor = str(Path(sys.executable).with_name("torpor"))
        proc = subprocess.Popen([torpor, *args], env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))

    def exited(self) -> tuple[str, int] | None:
        """(name, exit status) of a process of the stack that is no longer running, or None."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def _wait(self, what: str, ready, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = self.exited()
            if dead is not None:
                raise RuntimeError(f"{dead[0]} exited with {dead[1]}; see {self.state}/logs/{dead[0]}.log")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready within {timeout_s} s; see {self.state}/logs")

    def start(self) -> "Stack":
        """Starts Redis, the GPU server, the invoker and the controller; waits for each."""
        for sub in ("logs", "run", "models"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.state / "redis").start()
        self._spawn("gpu-server", "gpu-server")
        self._wait("GPU server", lambda: os.path.exists(self.socket))
        self._spawn("invoker", "invoker")
        self._spawn("controller", "controller")
        self._wait("controller", self._controller_up)
        self._wait("node", self._node_alive)
        return self

    def _controller_up(self) -> bool:
        try:
            return requests.get(f"{self.api_host}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _node_alive(self) -> bool:
        import redis
        return bool(redis.Redis.from_url(self.redis.url).exists("torpor:node:node0:alive"))

    def stop(self) -> None:
        """Stops every process this stack started (SIGTERM, then SIGKILL after 10 s)."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        if self.redis:
            self.redis.stop()

    def __enter__(self) -> "Stack":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def gpu_client(self, timeout_s: float = 120.0):
        """A ``runtime.client.GPUServerClient`` of this stack's GPU server with the admin token."""
        from runtime.client import GPUServerClient
        from runtime.gpu_server import tokens
        return GPUServerClient(self.socket, token=tokens.admin_token(self.node_secret), timeout_s=timeout_s)

    def session(self) -> requests.Session:
        """An HTTP session authenticated as the local development namespace."""
        s = requests.Session()
        s.auth = tuple(self.settings.auth.split(":", 1))
        return s


def gpu_count() -> int:
    """CUDA devices visible, counted through NVML so that this process never creates a CUDA context."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return 0


def run_demo(settings: UpSettings) -> dict:
    """Deploys the demo, replays the trace and returns the summary (see module docstring)."""
    from loadgen.replay import FunctionLoad, openwhisk_invoker, replay
    from loadgen.report import write_report
    from loadgen.trace import load_trace, schedule
    from runtime import demo
    from runtime.gpu_server.repository import Repository

    state = Path(settings.state_dir).resolve()
    repo = Repository(state / "models")
    click.echo("registering demo models ...", err=True)
    specs = demo.build_repository(repo, state / "weights")
    total = sum(s.bytes for s in specs)
    gpus = 0 if settings.cpu_devices else gpu_count()
    cpu_devices = 0 if gpus else (settings.cpu_devices or 2)
    n_devices = gpus or cpu_devices
    # every device must hold the largest model, all devices together less than all models
    largest = max(s.bytes for s in specs) + (4 << 20)
    device_memory = settings.device_memory or max(largest, int(0.75 * total / n_devices)) + (2 << 20)
    functions = demo.functions(settings.functions, with_minilm=any(s.name == demo.MINILM for s in specs))
    reference = demo.NativeReference(repo)
    with Stack(settings, cpu_devices, device_memory) as stack:
        http = stack.session()
        for fn in functions:
            r = http.put(f"{stack.api_host}/api/v1/namespaces/_/actions/{fn.name}?overwrite=true", json=fn.record(), timeout=30)
            r.raise_for_status()
        click.echo(f"deployed {len(functions)} functions over {len(specs)} models ({total / 2**20:.0f} MiB of weights); "
                   f"{n_devices} {'GPU' if gpus else 'CPU'} device(s) with {device_memory / 2**20:.0f} MiB arenas", err=True)
        for fn in functions:  # one warm container per function, as a platform's pre-warmed pool would have
            r = http.post(f"{stack.api_host}/api/v1/namespaces/_/actions/{fn.name}?blocking=true&result=true",
                          json=fn.request(0), timeout=120)
            if r.status_code != 200:
                raise click.ClickException(f"warm-up of {fn.name} failed: HTTP {r.status_code}: {r.text}")
        loads = [FunctionLoad(fn.name, fn.slo_ms, fn.request,
                              lambda params, result, fn=fn: reference.check(fn, params, result)) for fn in functions]
        for fn in functions:  # native references computed before the clock starts
            for i in range(demo.INPUT_POOL):
                reference.expected(fn, fn.request(i))
        arrivals = schedule(load_trace(), len(loads), settings.seed, settings.minutes, 1.0)
        report = replay(openwhisk_invoker(stack.api_host, settings.auth), loads, arrivals, settings.speedup, concurrency=64)
        stats = stack.gpu_client().stats()
    out = state / "results"
    out.mkdir(exist_ok=True)
    write_report(report, out / "demo.json", out / "demo.png")
    devices = [f"{d['device']}:{d['name']}" for d in stats["devices"]]
    return {
        "functions": report["functions"], "requests": report["requests"], "completed": report["completed"],
        "failed": report["failed"], "wrong_outputs": report["wrong_outputs"],
        "swap_ins": sum(d["swap_ins"] for d in stats["devices"]), "p50_ms": report["p50_ms"],
        "p98_ms": report["p98_ms"], "p99_ms": report["p99_ms"], "slo_attainment": report["slo_attainment"],
        "devices": devices, "errors": report["errors"], "report": str(out / "demo.json"),
    }


@click.command("up")
@click.option("--demo", is_flag=True, help="deploy the demo functions, replay the trace, report and stop")
@options(UpSettings)
def command(demo: bool, **kwargs) -> None:
    """Run Redis, the controller and one node here (the GPUs found, or CPU devices)."""
    settings = from_kwargs(UpSettings, kwargs)
    if demo:
        summary = run_demo(settings)
        for key in ("errors", "report"):
            click.echo(f"{key}: {json.dumps(summary.pop(key))}")
        click.echo(json.dumps(summary))
        return
    gpus = 0 if settings.cpu_devices else gpu_count()
    stack = Stack(settings, 0 if gpus else (settings.cpu_devices or 2), settings.device_memory)
    with stack:
        click.echo(f"API host: {stack.api_host}\nauth: {settings.auth}\nGPU socket: {stack.socket}\n"
                   f"node secret: {stack.node_secret} (TORPOR_NODE_SECRET, for torpor model register --gpu-socket)\n"
                   f"Redis: {stack.redis.url}\nmetrics: {stack.api_host}/metrics {stack.gpu_metrics_url}/metrics\n"
                   "Ctrl-C to stop")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while (dead := stack.exited()) is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            return
        name, code = dead
        raise click.ClickException(f"{name} exited with {code}; see {stack.state}/logs/{name}.log. "
                                   "Everything else was stopped.")
