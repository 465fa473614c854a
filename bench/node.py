"""Node-scale run: trace functions through the whole stack on this machine's GPUs, set beside
the simulator's prediction for the same configuration (issue 4's 2-GPU run, issue 8's 4-GPU run).

    python bench/node.py --functions 200 --minutes 3 --arena-gb 4 --out bench/results/h200x2-node.json

Run from the repository root with the project installed (``make install``; on the device
machine ``make install VENV=/opt/torch/.venv SYSTEM_SITE=1 TORCH_SPEC=``), so that the
stack's ``torpor`` command sits beside the Python that runs this file.

1. The simulator (``controller_plugin.simulator.Simulation``, the same class ``torpor
   simulate`` runs) draws each function's model from the profiles' model set (``--profiles``,
   a ``bench/swap.py`` result; ``--models`` narrows it); this run uses that very draw.
2. Every function gets its own model in the repository — its own name, bytes and swap-ins —
   built from the bench architecture (bench/models.py) with seeded random weights, its last
   weight tensor offset by ``0.01 × (index + 1)`` so that no two functions share weights and a
   mix-up between functions shows as a wrong output. Registration runs in parallel processes.
3. The native reference: each function's weights loaded from its repository file into the
   architecture, run eagerly on GPU 0 (or the CPU) on the inputs the action generates.
4. ``runtime.up.Stack`` starts Redis, the controller and one node (GPU server with a weight
   arena of ``--arena-gb`` per GPU, invoker) with a node secret; the functions are deployed
   through the REST API with their SLO annotation (100 ms; 200 ms for models ≥ 1 GB) and each
   is invoked ``--warm-containers`` times at once, so that a platform's pre-warmed container
   pool is there before the clock starts.
5. Calibration: ``--calibration`` sequential requests to one resident function; the median
   end-to-end latency minus the GPU server's mean time for them is the fixed per-request cost
   outside the GPU server, handed to the simulator as ``request_overhead_ms``.
6. The trace schedule of the simulator (``loadgen.trace.schedule``, same seed and minutes) is
   replayed in real time through the REST API (``loadgen.replay``); every output is compared
   with the native reference (``numpy.allclose``, rtol 1e-4, atol 1e-4: the served run may use
   other fp32 kernels than the eager reference, e.g. inside a CUDA graph).
7. The GPU server's ``/metrics`` before and after the replay give swap-ins by path, each
   GPU's execution time (its load; ``gpu_load_cov`` is their coefficient of variation), and
   the runs replayed from CUDA graphs against all runs, with the captures and their time.

The result is merged into ``--out`` (one entry per functions × policy in ``runs``).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import secrets
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from controller_plugin.simulator import ClusterSettings, Simulation, simulate
from controller_plugin.slo import default_slo_ms
from loadgen.replay import FunctionLoad, openwhisk_invoker, replay, summary
from loadgen.trace import default_trace_path, load_trace, schedule
from runtime import demo
from runtime.gpu_server import zoo
from runtime.gpu_server.repository import ModelSpec, Repository, TensorSpec
from runtime.settings import from_kwargs, options, setting

from models import CNNS, MODELS  # bench/models.py: python puts bench/ on sys.path

INPUTS = 2  # distinct inputs per function; request i uses input i % INPUTS
OUTPUT_VALUES = 1000  # the action returns the first this many values of the model's first output
RTOL, ATOL = 1e-4, 1e-4
WEIGHT_OFFSET = 0.01

ACTION = '''
import time

import numpy as np
from runtime.client import Model

def main(args):
    time.sleep(float(args.get("hold_ms", 0)) / 1000)  # warm-up only: keeps the container busy
    # stands in for a function's pre-processing: the input tensor comes from a seed
    rng = np.random.default_rng(int(args.get("input", 0)))
    shape, dtype = args["shape"], args["dtype"]
    x = rng.standard_normal(shape, dtype=np.float32) if dtype == "float32" else rng.integers(1, 1000, size=shape, dtype=np.int64)
    out = Model(args["model"])(x)
    first = out[0] if isinstance(out, tuple) else out
    return {"output": np.asarray(first).ravel()[:%d].tolist()}
''' % OUTPUT_VALUES


@dataclasses.dataclass
class NodeRunSettings:
    """Settings of one node run; every field is also a flag and an env var."""

    functions: int = setting(200, "TORPOR_NODE_RUN_FUNCTIONS", "trace functions, each with its own model")
    minutes: int = setting(3, "TORPOR_NODE_RUN_MINUTES", "trace minutes replayed in real time", "min")
    seed: int = setting(0, "TORPOR_NODE_RUN_SEED", "seed of the schedule and the model draw (as torpor simulate)")
    policy: str = setting("torpor", "TORPOR_NODE_RUN_POLICY", "GPU server policy: torpor, lru, random, fifo")
    profiles: str = setting("bench/results/nvidia-h200-swap.json", "TORPOR_NODE_RUN_PROFILES",
                            "bench/swap.py result: the model set and each model's served warm time (measured "
                            "without cuDNN TF32, as the GPU server runs by default)")
    models: str = setting(",".join(CNNS), "TORPOR_NODE_RUN_MODELS", "models of the profiles that functions draw from")
    arena_gb: float = setting(4.0, "TORPOR_NODE_RUN_ARENA_GB", "weight arena of each device", "GB")
    cpu_devices: int = setting(0, "TORPOR_NODE_RUN_CPU_DEVICES", "serve on this many CPU devices (0: the GPUs)")
    warm_containers: int = setting(2, "TORPOR_NODE_RUN_WARM_CONTAINERS", "containers started per function before the clock")
    settle_rounds: int = setting(3, "TORPOR_NODE_RUN_SETTLE_ROUNDS",
                                 "rounds of one request per function, one at a time, each followed by the graph "
                                 "captures it queued, between the warm-up and the clock; a round that queues no "
                                 "capture ends the settling (0: none)")
    settle_s: float = setting(240.0, "TORPOR_NODE_RUN_SETTLE_S", "longest the settling may take", "s")
    calibration: int = setting(50, "TORPOR_NODE_RUN_CALIBRATION", "sequential requests measuring the fixed overhead")
    concurrency: int = setting(512, "TORPOR_NODE_RUN_CONCURRENCY", "requests outstanding at once at most")
    workers: int = setting(0, "TORPOR_NODE_RUN_WORKERS", "registration processes (0: half the CPUs)")
    state_dir: str = setting(".state/node-run", "TORPOR_NODE_RUN_STATE_DIR", "Redis data, models, logs")
    trace: str = setting("", "TORPOR_TRACE", "trace .npy (default: ../shared/traces/torpor_samples.npy)")
    out: str = setting("bench/results/node-run.json", "TORPOR_NODE_RUN_OUT", "result file (runs are merged)")
    progress: bool = setting(True, "TORPOR_NODE_RUN_PROGRESS", "show a progress bar on stderr")


def model_table() -> dict[str, tuple[str, dict, list[TensorSpec]]]:
    """Model name → (architecture, config, inputs): the bench set and the demo's small models
    (the latter let the run work on CPU devices)."""
    table = dict(MODELS)
    table.update({m.name: (m.architecture, m.config, m.inputs) for m in demo.MODELS})
    return table


def function_model(index: int, base: str) -> str:
    return f"fn{index:04d}-{base}"


_BASES: dict[str, torch.nn.Module] = {}


def _base_module(base: str) -> torch.nn.Module:
    if base not in _BASES:
        arch, config, _ = model_table()[base]
        torch.manual_seed(0)
        _BASES[base] = zoo.build(arch, config)
    return _BASES[base]


def _last_weight(module: torch.nn.Module) -> torch.Tensor:
    return [t for t in module.state_dict().values() if t.is_floating_point()][-1]


def register_function(job: tuple[str, str, int, str]) -> int:
    """Registers function ``index``'s model (a registration process's job); returns its bytes.

    Raises:
        ModelLoadError: the repository refused it.
    """
    from safetensors.torch import save_model

    root, work, index, base = job
    torch.set_num_threads(1)
    arch, config, inputs = model_table()[base]
    module = _base_module(base)
    weight = _last_weight(module)
    original = weight.clone()
    path = Path(work) / f"{function_model(index, base)}.safetensors"
    with torch.no_grad():
        weight.add_(WEIGHT_OFFSET * (index + 1))
        save_model(module, str(path))
        weight.copy_(original)
    try:
        spec = Repository(root).register(
            ModelSpec(name=function_model(index, base), inputs=inputs, architecture=arch, config=config), path)
    finally:
        path.unlink()
    return spec.bytes


def action_input(spec: TensorSpec, k: int) -> np.ndarray:
    """The input the action generates for ``{"input": k}`` (same code path as ACTION)."""
    rng = np.random.default_rng(k)
    if spec.dtype == "float32":
        return rng.standard_normal(spec.shape, dtype=np.float32)
    return rng.integers(1, 1000, size=spec.shape, dtype=np.int64)


def native_references(repo: Repository, names: list[str], bases: list[str], device: torch.device) -> dict[str, list[np.ndarray]]:
    """Each function's outputs for inputs 0..INPUTS-1, from eager execution of its own
    weights (loaded from its repository file) on ``device``."""
    from safetensors.torch import load_model

    torch.backends.cuda.matmul.allow_tf32 = False  # as the GPU server (cudnn_tf32 off by default)
    torch.backends.cudnn.allow_tf32 = False
    modules: dict[str, torch.nn.Module] = {}
    out = {}
    with torch.inference_mode():
        for name, base in zip(names, bases):
            if base not in modules:
                modules[base] = _base_module(base).to(device)
            module = modules[base]
            spec = repo.spec(name)
            load_model(module, str(Path(spec.path) / spec.weights), strict=True, device=str(device))
            refs = []
            for k in range(INPUTS):
                x = [torch.from_numpy(action_input(s, k)).to(device) for s in spec.inputs]
                y = module(*x)
                y = y[0] if isinstance(y, tuple) else y
                refs.append(y.float().cpu().numpy().ravel()[:OUTPUT_VALUES])
            out[name] = refs
    for m in modules.values():
        m.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """The GPU server's /metrics samples: metric sample name → {sorted label items: value}."""
    response = requests.get(url + "/metrics", timeout=10)
    response.raise_for_status()
    text = response.text
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def settle_captures(url: str, rounds: int, functions: int, call: Callable[[int], bool], budget_s: float,
                    timeout_s: float = 30.0) -> dict[str, Any]:
    """Brings the node to the steady state the simulator assumes: up to ``rounds`` rounds of
    ``call(i)`` for every function ``i``, one at a time, each followed by waiting (at most
    ``timeout_s``) until no device has a capture it can take now (its model at its home;
    captures of models evicted meanwhile wait for a later round). Captures are taken off the
    request path while a device is idle, and only at the model's home, so after a concurrent
    warm-up many are still queued or not yet asked for; measured in their midst, a node run
    reports the capture transient (the first 2-GPU run: p98 674 ms over the window, 71 ms in
    its last 70 s). A round that captured nothing ends early, and the settling stops once it
    has taken ``budget_s``. Returns the rounds run, captures taken, failed calls, waits that
    ran out (``timeouts``), whether the budget ran out, and the seconds spent."""
    def ready() -> float:
        return sum(scrape(url).get("torpor_gpu_graph_captures_ready", {}).values())

    def captured() -> float:
        return sum(scrape(url).get("torpor_gpu_graph_captures_total", {}).values())

    began, first = time.monotonic(), captured()
    done = failed = timeouts = 0
    out_of_time = False
    for done in range(1, rounds + 1):
        before = captured()
        for i in range(functions):
            out_of_time = time.monotonic() - began > budget_s
            if out_of_time:
                break
            failed += not call(i)
            deadline = time.monotonic() + timeout_s
            while ready():
                if time.monotonic() > deadline:
                    timeouts += 1
                    break
                time.sleep(0.02)
        if out_of_time or captured() == before:
            break
    return {"rounds": done if rounds else 0, "captures": int(captured() - first), "failed": failed,
            "timeouts": timeouts, "out_of_time": out_of_time, "seconds": round(time.monotonic() - began, 1)}


def delta(after: dict, before: dict, name: str, by: str) -> dict[str, float]:
    """Sum of ``name``'s increase between two scrapes, grouped by label ``by``."""
    out: dict[str, float] = {}
    for labels, value in after.get(name, {}).items():
        key = dict(labels).get(by, "")
        out[key] = out.get(key, 0.0) + value - before.get(name, {}).get(labels, 0.0)
    return out


def run(s: NodeRunSettings) -> dict[str, Any]:
    """The node run described in the module docstring; returns its entry of ``runs``.

    Raises:
        click.ClickException: a warm-up call failed or returned a wrong output.
    """
    from runtime.up import Stack, UpSettings

    gpus = 0 if s.cpu_devices else torch.cuda.device_count()
    devices = gpus or s.cpu_devices
    if not devices:
        raise click.ClickException("no GPU found: pass --cpu-devices N to run on CPU devices")
    trace = s.trace or str(default_trace_path())
    cluster = ClusterSettings(nodes=1, gpus=devices, minutes=s.minutes, seed=s.seed, trace=trace, profiles=s.profiles,
                              models=s.models, gpu_memory_gb=s.arena_gb, arena_fraction=1.0)
    draw = Simulation(cluster, s.functions, s.policy).spec
    bases = [m.name for m in draw]
    names = [function_model(i, b) for i, b in enumerate(bases)]
    profile = {m.name: m for m in draw}

    state_dir = Path(s.state_dir).resolve()
    repo = Repository(state_dir / "models")
    work = state_dir / "weights"
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    todo = [(str(repo.root), str(work), i, b) for i, (n, b) in enumerate(zip(names, bases)) if n not in repo.names()]
    workers = s.workers or max(1, (os.cpu_count() or 2) // 2)
    # spawned, not forked: this process may hold a CUDA context
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(register_function, todo, chunksize=4))
    model_bytes = {n: repo.spec(n).bytes for n in names}
    click.echo(f"registered {len(todo)} models ({sum(model_bytes.values()) / 1e9:.1f} GB for {len(names)} functions) "
               f"in {time.monotonic() - began:.0f} s", err=True)
    device = torch.device("cuda:0" if gpus else "cpu")
    reference = native_references(repo, names, bases, device)
    inputs = {b: model_table()[b][2][0] for b in set(bases)}

    def params(i: int, k: int) -> dict:
        spec = inputs[bases[i]]
        return {"model": names[i], "input": k % INPUTS, "shape": spec.shape, "dtype": spec.dtype}

    def check(i: int, p: dict, result: dict) -> bool:
        got = result.get("output")
        ref = reference[names[i]][p["input"]]
        return isinstance(got, list) and len(got) == len(ref) and \
            bool(np.allclose(np.asarray(got, dtype=np.float32), ref, rtol=RTOL, atol=ATOL))

    arena_bytes = int(s.arena_gb * 1e9)
    os.environ.update({"TORPOR_NODE_SECRET": secrets.token_hex(32), "TORPOR_POLICY": s.policy,
                       "TORPOR_INVOKER_NODE_CONTAINERS": str(s.warm_containers * s.functions + 64),
                       "TORPOR_INVOKER_MAX_CONTAINERS": str(max(4, s.warm_containers + 2)),
                       "TORPOR_INVOKER_IDLE_TIMEOUT": "3600"})
    with Stack(UpSettings(state_dir=str(state_dir)), s.cpu_devices, arena_bytes) as stack:
        http = stack.session()
        api = f"{stack.api_host}/api/v1/namespaces/_/actions/"
        for i, name in enumerate(names):
            record = {"exec": {"kind": "python:3", "code": ACTION},
                      "annotations": [{"key": "model", "value": name},
                                      {"key": "slo-ms", "value": default_slo_ms(model_bytes[name])}],
                      "limits": {"timeout": 60000, "memory": 256, "concurrency": 1}}
            http.put(f"{api}fn{i:04d}?overwrite=true", json=record, timeout=30).raise_for_status()
        invoke = openwhisk_invoker(stack.api_host, stack.settings.auth, timeout_s=300.0)

        def warm(i: int, hold_ms: float = 0.0) -> str | None:
            p = params(i, 0)
            result, error, _ = invoke(f"fn{i:04d}", {**p, "hold_ms": hold_ms})
            if error or not check(i, p, result):
                return f"fn{i:04d}: {error or 'wrong output'}"
            return None

        began = time.monotonic()
        # first one request per function (its model loads into the host store), then
        # --warm-containers at once per function, each holding its container for a while so
        # that the others start containers of their own
        with ThreadPoolExecutor(16) as pool:
            failures = [f for f in pool.map(warm, range(len(names))) if f]
        if s.warm_containers > 1 and not failures:
            with ThreadPoolExecutor(64) as pool:
                failures = [f for f in pool.map(lambda i: warm(i, 1500.0), [i for i in range(len(names))
                                                                          for _ in range(s.warm_containers)]) if f]
        if failures:
            raise click.ClickException(f"{len(failures)} warm-up calls failed, first: {failures[0][:500]}")
        click.echo(f"warmed {len(names)} functions x {s.warm_containers} containers in {time.monotonic() - began:.0f} s",
                   err=True)

        settle = settle_captures(stack.gpu_metrics_url, s.settle_rounds, len(names), lambda i: warm(i) is None,
                                 s.settle_s)
        click.echo(f"settled in {settle['seconds']:.0f} s: {settle['rounds']} rounds, {settle['captures']} captures, "
                   f"{settle['failed']} failed requests, {settle['timeouts']} waits ran out"
                   f"{' (budget spent)' if settle['out_of_time'] else ''}", err=True)

        probe = min(range(len(names)), key=lambda i: model_bytes[names[i]])
        before = scrape(stack.gpu_metrics_url)
        e2e = [invoke(f"fn{probe:04d}", params(probe, 0))[2] for _ in range(s.calibration)]
        after = scrape(stack.gpu_metrics_url)
        served_s = sum(delta(after, before, "torpor_gpu_request_duration_seconds_sum", "model").values())
        served_n = sum(delta(after, before, "torpor_gpu_request_duration_seconds_count", "model").values())
        overhead_ms = max(0.0, statistics.median(e2e) - 1e3 * served_s / max(served_n, 1))
        click.echo(f"fixed overhead outside the GPU server: {overhead_ms:.2f} ms (median e2e {statistics.median(e2e):.2f} ms)",
                   err=True)

        arrivals = schedule(load_trace(trace), s.functions, s.seed, s.minutes)
        loads = [FunctionLoad(f"fn{i:04d}", default_slo_ms(model_bytes[n]), lambda k, i=i: params(i, k),
                              lambda p, r, i=i: check(i, p, r)) for i, n in enumerate(names)]
        before = scrape(stack.gpu_metrics_url)
        report = replay(invoke, loads, arrivals, 1.0, s.concurrency, s.progress)
        after = scrape(stack.gpu_metrics_url)
    by_path = delta(after, before, "torpor_gpu_request_duration_seconds_count", "path")
    # swap-ins by path count the invoker's prefetches too: most swap-ins start there, and the
    # request then finds its model resident (by_path["resident"])
    swap_ins = delta(after, before, "torpor_gpu_swap_ins_total", "path")
    served = {key: sum(delta(after, before, f"torpor_gpu_{key}", "model").values())
              for key in ("request_wait_seconds_sum", "execution_duration_seconds_sum", "request_duration_seconds_count")}
    busy = delta(after, before, "torpor_gpu_execution_duration_seconds_sum", "device")
    graphs = {key: sum(delta(after, before, f"torpor_gpu_{key}_total", "device").values())
              for key in ("runs", "graph_runs", "graph_captures", "graph_capture_seconds")}
    loads_s = np.array([busy.get(str(d), 0.0) for d in range(devices)])
    sim = simulate(dataclasses.replace(cluster, request_overhead_ms=overhead_ms), s.functions, s.policy)
    head = summary(report)
    return {
        "functions": s.functions, "policy": s.policy, "requests": head["requests"], "completed": head["completed"],
        "failed": head["failed"], "wrong_outputs": head["wrong_outputs"],
        "slo_attainment": head["slo_attainment"], "p50_ms": head["p50_ms"], "p98_ms": head["p98_ms"],
        "p99_ms": head["p99_ms"],
        "gpu_load_cov": round(float(loads_s.std() / loads_s.mean()), 4) if loads_s.mean() > 0 else 0.0,
        "swap_ins_pcie": int(round(swap_ins.get("pcie", 0))), "swap_ins_nvlink": int(round(swap_ins.get("nvlink", 0))),
        "resident_hits": int(round(by_path.get("resident", 0))),
        "server_wait_ms_mean": round(1e3 * served["request_wait_seconds_sum"] / max(served["request_duration_seconds_count"], 1), 3),
        "server_run_ms_mean": round(1e3 * served["execution_duration_seconds_sum"] / max(served["request_duration_seconds_count"], 1), 3),
        "runs": int(graphs["runs"]), "graph_runs": int(graphs["graph_runs"]),
        "graph_captures": int(graphs["graph_captures"]), "graph_capture_s": round(graphs["graph_capture_seconds"], 2),
        "request_overhead_ms": round(overhead_ms, 3), "settle": settle,
        "simulated_slo_attainment": sim["slo_attainment"], "simulated_p50_ms": sim["p50_ms"],
        "simulated_p98_ms": sim["p98_ms"], "simulated_p99_ms": sim["p99_ms"],
        "simulated_gpu_load_cov": sim["gpu_load_cov"], "simulated_swap_ins_pcie": sim["swap_ins_pcie"],
        "simulated_swap_ins_nvlink": sim["swap_ins_nvlink"],
        "p98_simulated_over_measured": round(sim["p98_ms"] / head["p98_ms"], 3) if head["p98_ms"] else None,
        "models": sorted(set(bases)), "weights_gb": round(sum(model_bytes.values()) / 1e9, 2),
        "arena_gb_per_device": s.arena_gb, "minutes": s.minutes, "seed": s.seed, "errors": head["errors"],
        "duration_s": round(head["duration_s"], 1),
    }


@click.command("node-run")
@options(NodeRunSettings)
def command(**kwargs: Any) -> None:
    """Trace functions through the whole stack on this node, beside the simulator's prediction."""
    s = from_kwargs(NodeRunSettings, kwargs)
    entry = run(s)
    out = Path(s.out)
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    gpus = torch.cuda.device_count() if not s.cpu_devices else 0
    doc.update({"gpu": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus or s.cpu_devices,
                "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    entry["command"] = " ".join(["python bench/node.py", *sys.argv[1:]])
    doc["runs"] = [r for r in doc["runs"] if (r["functions"], r["policy"]) != (entry["functions"], entry["policy"])] + [entry]
    doc["runs"].sort(key=lambda r: (r["policy"], r["functions"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    click.echo(json.dumps({k: v for k, v in entry.items() if k not in ("errors", "models")}))
    click.echo(f"wrote {out}", err=True)
    if entry["wrong_outputs"] or entry["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    command()
