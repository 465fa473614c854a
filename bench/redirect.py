"""Redirection overhead benchmark (issue 3): what a model call through the GPU server costs
beyond the server's own work.

    python3 bench/redirect.py [--device auto|cpu|cuda] [--calls 2000] [--warmup 200] [--out bench/results]

A real ``torpor gpu-server`` runs in a child process (CPU device, or every GPU with
``--device cuda``) with a node secret, so that the function-token check is on the path as in
production. It serves one registered model of a real architecture (the zoo's ``resnet`` at a
tiny width: input float32 1x3x224x224, output float32 1x1000). This process calls it through
``runtime.client.GPUServerClient`` with a function token, one call after the other on one
connection, and records per call:

* the round trip (ms): ``infer()`` entered → outputs returned as numpy arrays;
* the server time (ms): the reply's ``server_ms`` (placement and run in the node, host↔device
  copies of the tensors included);
* the overhead (ms): round trip − server time, per call.

Then (``--no-breakdown`` skips it) the same warm server is told to probe its request path
(SIGUSR1), this process probes its own, and the calls are made again on a new connection: the
protocol functions of both processes are wrapped with ``time.perf_counter`` probes — nothing
of it lives in the product code — and the median of each phase is reported (µs): client
serialisation and shared-memory copies, the two socket hand-overs between the processes, the
server's header parse, token check, input views, validation, metrics, output copy and reply,
and what no probe covers (``*.untimed``). Each probe adds a microsecond or two, so these calls
are a little slower than the first ones. ``--cprofile`` adds a third run on a new server with
cProfile's top functions of both sides (the server's without the model's run; times are
inflated by the profiler: read them for what is called, and how often).

On a shared machine other processes' load lands in the overhead's upper quantiles first: the
p10 moves least from run to run. ``per_call`` adds what load disturbs far less: CPU time and
minor page faults per call of the client and of the server (the server's include the model's
run).

Writes ``<out>/redirect-<tag>.json`` (default tag: the GPU's name, e.g. ``nvidia-h200``, or
``cpu``). Needs torch, numpy, safetensors, transformers (the architecture) and the GPU
server's own imports (click, prometheus-client, nvidia-ml-py), not Flask, Redis or jsonschema:
the server runs without its metrics HTTP side and without Redis.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 bench/redirect.py` from a checkout without PYTHONPATH
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODEL = "resnet-224"
ARCHITECTURE = "resnet"
# the zoo's Hugging Face ResNet at a tiny width: a real 224x224 classifier whose run takes a
# few ms on one CPU core, so that the calls, not the model, dominate the bench's time
CONFIG = {"num_channels": 3, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic",
          "num_labels": 1000}
INPUT_SHAPE = (1, 3, 224, 224)
OUTPUT_SHAPE = (1, 1000)
NAMESPACE, ACTION = "bench", "redirect"


class Probes:
    """perf_counter probes around functions: ``events[name]`` lists (start, end) pairs in the
    order of the calls (s, ``time.perf_counter``, which is CLOCK_MONOTONIC: comparable across
    the two processes)."""

    def __init__(self):
        self.events: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._first_bytes: float | None = None
        self._replaced: list[tuple[object, str, object]] = []

    def _replace(self, owner, attr: str, fn) -> None:
        self._replaced.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, fn)

    def restore(self) -> None:
        """Puts the probed functions back."""
        while self._replaced:
            owner, attr, fn = self._replaced.pop()
            setattr(owner, attr, fn)

    def wrap(self, owner, attr: str, name: str) -> None:
        """Replaces ``owner.attr`` with a timed call of itself; absent attributes are skipped
        (the product code may have moved on), so the breakdown names what it could time."""
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        events = self.events[name]

        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            events.append((started, time.perf_counter()))
            return out

        self._replace(owner, attr, timed)

    def wrap_recv(self, protocol, side: str) -> None:
        """Times ``protocol.recv`` and notes when its first bytes arrived (the end of the first
        ``_recv_exact``): before that the reader was only waiting for its peer."""
        recv_exact, recv = protocol._recv_exact, protocol.recv
        arrivals = self.events[f"{side}.recv_first_bytes"]
        events = self.events[f"{side}.recv"]

        def timed_exact(*args, **kwargs):
            out = recv_exact(*args, **kwargs)
            if self._first_bytes is None:
                self._first_bytes = time.perf_counter()
            return out

        def timed_recv(*args, **kwargs):
            self._first_bytes = None
            started = time.perf_counter()
            out = recv(*args, **kwargs)
            end = time.perf_counter()
            events.append((started, end))
            arrivals.append((self._first_bytes, end))
            return out

        self._replace(protocol, "_recv_exact", timed_exact)
        self._replace(protocol, "recv", timed_recv)


def instrument_server(probes: Probes) -> None:
    """Probes the server's request path (in the server process)."""
    from runtime.gpu_server import protocol, server
    from runtime.gpu_server.metrics import ServerMetrics
    from runtime.gpu_server.node import Node

    probes.wrap_recv(protocol, "server")
    probes.wrap(server.Service, "_authorize", "server.authorize")
    probes.wrap(server.Service, "_load", "server.load_lookup")
    probes.wrap(protocol, "read", "server.shm_read")
    probes.wrap(server, "validate", "server.validate")
    probes.wrap(Node, "infer", "server.node_infer")
    probes.wrap(ServerMetrics, "inference_done", "server.metrics_inference")
    probes.wrap(ServerMetrics, "request_done", "server.metrics_request")
    probes.wrap(protocol, "describe", "server.describe")
    probes.wrap(protocol, "write", "server.shm_write")
    probes.wrap(protocol, "send", "server.send")


def instrument_client(probes: Probes) -> None:
    """Probes the client's side of a call (in this process)."""
    from runtime.gpu_server import protocol

    probes.wrap_recv(protocol, "client")
    probes.wrap(protocol, "describe", "client.describe")
    probes.wrap(protocol, "write", "client.shm_write")
    probes.wrap(protocol, "send", "client.send")
    probes.wrap(protocol, "read", "client.shm_read")


def child(argv: list[str]) -> None:
    """The server process: ``redirect.py --child PROBES_FILE PROFILE_FILE -- gpu-server args``.

    SIGUSR1 probes the request path from then on (``PROBES_FILE.on`` appears once done); the
    probes are written to PROBES_FILE at SIGTERM. With a profile file, each connection after
    the first runs under cProfile (but not ``Node.infer``), written there at SIGTERM.
    """
    probes_file, profile_file, server_args = argv[0], argv[1], argv[3:]
    from runtime.gpu_server import server

    probes = Probes()

    def probe(*_):
        instrument_server(probes)
        Path(probes_file + ".on").touch()

    signal.signal(signal.SIGUSR1, probe)
    profiler = cProfile.Profile() if profile_file else None
    if profiler is not None:
        from runtime.gpu_server.node import Node

        handle, infer = server._Handler.handle, Node.infer
        connections, profiling = [], threading.local()

        def profiled(self):
            connections.append(self)
            if len(connections) == 1:  # the warm-up connection (the model's load, first runs)
                handle(self)
                return
            profiling.on = True
            profiler.enable()
            try:
                handle(self)
            finally:
                profiler.disable()

        def unprofiled(*args, **kwargs):  # the model's run is server time, not the protocol's
            if not getattr(profiling, "on", False):
                return infer(*args, **kwargs)
            profiler.disable()
            try:
                return infer(*args, **kwargs)
            finally:
                profiler.enable()

        server._Handler.handle = profiled
        Node.infer = unprofiled
    server.command.main(args=server_args, standalone_mode=False)
    Path(probes_file).write_text(json.dumps(probes.events))
    if profiler is not None:
        profiler.dump_stats(profile_file)


class ServerProcess:
    """A GPU server child process on ``device`` serving ``repo_root``; stops at exit."""

    def __init__(self, root: Path, repo_root: Path, device: str, secret: str, torch_threads: int, profile: bool = False):
        self.socket = str(root / "gpu.sock")
        self.log = root / "server.log"
        self.probes_file = str(root / "server-probes.json")
        for stale in (self.probes_file, self.probes_file + ".on"):
            Path(stale).unlink(missing_ok=True)
        self.profile_file = str(root / "server.prof") if profile else ""
        args = ["--socket", self.socket, "--model-repo", str(repo_root), "--torch-threads", str(torch_threads)]
        if device == "cpu":
            args += ["--cpu-devices", "1", "--device-memory", str(256 << 20)]
        else:
            args += ["--arena-bytes", str(1 << 30)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
        env.update(TORPOR_NODE_SECRET=secret, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--child", self.probes_file, self.profile_file, "--", *args],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the GPU server did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def probe(self) -> None:
        """Probes the server's request path from now on (see :func:`child`)."""
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.probes_file + ".on"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the GPU server did not start probing: {self.log.read_text()}")
            time.sleep(0.01)

    def probe_events(self) -> dict:
        """The server's probes (after :meth:`stop`)."""
        return json.loads(Path(self.probes_file).read_text())

    def stop(self) -> None:
        """SIGTERM, then waits for the probes and profile to be written."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def register_model(root: Path):
    """Registers the bench model in a fresh repository; returns (repository root, native module)."""
    from safetensors.torch import save_model

    from runtime.gpu_server import zoo
    from runtime.gpu_server.repository import ModelSpec, Repository, TensorSpec

    torch.manual_seed(0)
    module = zoo.build(ARCHITECTURE, CONFIG)
    weights = root / "weights.safetensors"
    save_model(module, str(weights))
    repo = Repository(root / "models")
    repo.register(ModelSpec(name=MODEL, architecture=ARCHITECTURE, config=CONFIG,
                            inputs=[TensorSpec("pixel_values", "float32", list(INPUT_SHAPE))]), weights)
    return repo.root, module


def usage(pid: int) -> dict:
    """CPU time (ms) and minor page faults so far of this process and of process ``pid``
    (Linux ``/proc``): counts that other processes' load disturbs far less than wall times."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"client_cpu_ms": (own.ru_utime + own.ru_stime) * 1e3, "client_minor_faults": own.ru_minflt,
            "server_cpu_ms": (int(fields[11]) + int(fields[12])) / ticks * 1e3, "server_minor_faults": int(fields[7])}


def percentiles(values: list[float]) -> dict:
    """Median, p10, p90, p99, mean and min of ``values`` (same unit). On a shared machine the
    low quantiles are the least disturbed by other processes' load."""
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p10": at(0.10), "p90": at(0.90), "p99": at(0.99),
            "mean": statistics.fmean(ordered), "min": ordered[0]}


def calls(client, x: np.ndarray, n: int) -> tuple[list[float], list[float]]:
    """``n`` sequential calls; returns (round trips, server times), ms."""
    replies = []
    call = client.call

    def keep_reply(header, payload=b"", segment=None):
        reply = call(header, payload, segment)
        replies.append(reply[0])
        return reply

    client.call = keep_reply
    round_trips = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            client.infer(MODEL, [x])
            round_trips.append((time.perf_counter() - started) * 1e3)
    finally:
        del client.call
    return round_trips, [r["server_ms"] for r in replies]


CLIENT_PHASES = ("client.describe", "client.shm_write", "client.send")
SERVER_PHASES = ("server.authorize", "server.load_lookup", "server.shm_read", "server.validate", "server.node_infer",
                 "server.metrics_inference", "server.describe", "server.shm_write", "server.metrics_request", "server.send")


def breakdown(client_events: dict, server_events: dict, infers: list[tuple[float, float]], n: int) -> dict:
    """Median µs of each phase over the last ``n`` calls, in the order a call goes through them.

    ``*.untimed`` is what no probe covers: the Python between the probed functions. Each call
    probes every phase once, so the k-th event of each list belongs to the k-th call.
    """
    c = {k: v[-n:] for k, v in client_events.items()}
    s = {k: v[-n:] for k, v in server_events.items()}
    infers = infers[-n:]

    def durations(pairs) -> list[float]:
        return [(b - a) * 1e6 for a, b in pairs]

    per: dict[str, list[float]] = {}
    for name in CLIENT_PHASES:
        per[name] = durations(c[name])
    # the request in flight: the client's send returned → the server read its first bytes
    per["socket.request_handover"] = durations([(cs[1], sf[0]) for cs, sf in zip(c["client.send"], s["server.recv_first_bytes"])])
    per["server.header_read_parse"] = durations(s["server.recv_first_bytes"])
    for name in SERVER_PHASES:
        if s.get(name):
            per[name] = durations(s[name])
    handled = durations([(a[0], b[1]) for a, b in zip(s["server.recv_first_bytes"], s["server.send"])])
    server = [k for k in per if k.startswith("server.")]
    per["server.untimed"] = [h - sum(per[k][i] for k in server) for i, h in enumerate(handled)]
    per["socket.reply_handover"] = durations([(ss[1], cf[0]) for ss, cf in zip(s["server.send"], c["client.recv_first_bytes"])])
    per["client.header_read_parse"] = durations(c["client.recv_first_bytes"])
    per["client.shm_read"] = durations(c["client.shm_read"])
    total = durations(infers)
    per["client.untimed"] = [t - sum(v[i] for v in per.values()) for i, t in enumerate(total)]
    per["round_trip"] = total
    per["round_trip_minus_node_infer"] = [t - d for t, d in zip(total, per["server.node_infer"])]
    return {k: statistics.median(v) for k, v in per.items()}


def top_functions(stats: pstats.Stats, limit: int = 20) -> list[str]:
    """cProfile's ``limit`` functions of most own time, as pstats prints them."""
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats("tottime").print_stats(limit)
    return [line for line in text.getvalue().splitlines() if line.strip()][-limit - 1:]


def measure(server: ServerProcess, token: str, x: np.ndarray, native: np.ndarray, args, result: dict) -> None:
    """The plain calls, then (unless ``--no-breakdown``) the probed ones, on one server; fills
    ``result``."""
    from runtime.client import GPUServerClient

    client = GPUServerClient(server.socket, token=token, timeout_s=60)
    served = client.infer(MODEL, [x])[0]
    assert served.shape == OUTPUT_SHAPE and served.dtype == np.float32, (served.shape, served.dtype)
    result["max_abs_diff_vs_native"] = float(np.abs(served - native).max())
    calls(client, x, args.warmup)
    before = usage(server.proc.pid)
    round_trips, server_ms = calls(client, x, args.calls)
    after = usage(server.proc.pid)
    client.close()
    overhead = [r - s for r, s in zip(round_trips, server_ms)]
    result.update(round_trip_ms=percentiles(round_trips), server_ms=percentiles(server_ms), overhead_ms=percentiles(overhead),
                  per_call={k: (after[k] - before[k]) / args.calls for k in after})
    print(f"{result['device_name']}: round trip median {result['round_trip_ms']['median']:.3f} ms "
          f"p90 {result['round_trip_ms']['p90']:.3f}, server {result['server_ms']['median']:.3f} ms, overhead median "
          f"{result['overhead_ms']['median']:.3f} ms p10 {result['overhead_ms']['p10']:.3f} "
          f"p90 {result['overhead_ms']['p90']:.3f} ms", flush=True)
    print("per call: " + ", ".join(f"{k} {v:.2f}" for k, v in result["per_call"].items()))
    if args.no_breakdown:
        return
    # the same warm server, probed from now on, and a new connection
    server.probe()
    client_probes = Probes()
    instrument_client(client_probes)
    client = GPUServerClient(server.socket, token=token, timeout_s=60)
    calls(client, x, min(args.warmup, 20))
    infers = []
    infer = client.infer

    def timed_infer(*a, **k):
        started = time.perf_counter()
        out = infer(*a, **k)
        infers.append((started, time.perf_counter()))
        return out

    client.infer = timed_infer
    calls(client, x, args.calls)
    client.close()
    client_probes.restore()
    server.stop()
    result["breakdown_us"] = phases = breakdown(client_probes.events, server.probe_events(), infers, args.calls)
    print("phase medians (µs, probed calls):")
    for name, us in phases.items():
        print(f"  {name:32s} {us:9.1f}")


def profile(server: ServerProcess, token: str, x: np.ndarray, args, result: dict) -> None:
    """cProfile of the calls on both sides (``--cprofile``), on a server started with a profile."""
    from runtime.client import GPUServerClient

    profiler = cProfile.Profile()
    client = GPUServerClient(server.socket, token=token, timeout_s=60)
    calls(client, x, args.warmup)
    client.close()
    client = GPUServerClient(server.socket, token=token, timeout_s=60)
    calls(client, x, 1)  # a new segment is attached once
    profiler.enable()
    calls(client, x, args.calls)
    profiler.disable()
    client.close()
    server.stop()
    result["cprofile_client"] = top_functions(pstats.Stats(profiler))
    result["cprofile_server"] = top_functions(pstats.Stats(server.profile_file))
    for side in ("client", "server"):
        print(f"cProfile, {side} (own time; the server's without Node.infer):")
        print("\n".join(result[f"cprofile_{side}"]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the server runs the model (auto: cuda when torch sees a GPU)")
    parser.add_argument("--calls", type=int, default=2000, help="measured calls")
    parser.add_argument("--warmup", type=int, default=200, help="calls before measuring (CUDA graphs are captured then)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="the server's torch threads (0: 1 on CPU, leaving the other cores to this client; torch's default on CUDA)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the probed calls")
    parser.add_argument("--cprofile", action="store_true", help="add cProfile's top functions of client and server")
    parser.add_argument("--tag", default="", help="result file name part (default: the GPU's name, or cpu)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    torch_threads = args.torch_threads or (1 if device == "cpu" else 0)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"

    from runtime.gpu_server import tokens

    result = {"command": "python3 bench/redirect.py " + " ".join(sys.argv[1:]), "device": device, "device_name": device_name,
              "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "numpy": np.__version__, "model": {"name": MODEL, "architecture": ARCHITECTURE, "config": CONFIG,
                                                 "input": ["float32", list(INPUT_SHAPE)], "output": ["float32", list(OUTPUT_SHAPE)]},
              "calls": args.calls, "warmup": args.warmup, "server_torch_threads": torch_threads, "token_checked": True}
    root = Path(tempfile.mkdtemp(prefix="torpor-redirect-", dir="/tmp"))  # a socket path has at most 107 bytes
    try:
        repo_root, module = register_model(root)
        secret = secrets.token_hex(16)
        token = tokens.function_token(secret, NAMESPACE, ACTION, [MODEL])
        x = np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32)
        with torch.inference_mode():
            native = module(torch.from_numpy(x)).numpy()
        server = ServerProcess(root, repo_root, device, secret, torch_threads)
        try:
            measure(server, token, x, native, args, result)
        finally:
            server.stop()
        if args.cprofile:
            server = ServerProcess(root, repo_root, device, secret, torch_threads, profile=True)
            try:
                profile(server, token, x, args, result)
            finally:
                server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"redirect-{args.tag or device_name.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
