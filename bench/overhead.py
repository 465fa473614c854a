"""Platform overhead benchmark: end-to-end latency of blocking invocations through the REST API.

    python3 bench/overhead.py [--calls 300] [--warmup 30] [--out bench/results/platform-cpu.json]
    python3 bench/overhead.py --base /tmp/base-tree --pairs 3 --out bench/results/platform-cpu.json

One run starts the whole stack on loopback as ``torpor up`` does (``runtime.up.Stack``: a
private redis-server, a GPU server on one CPU device, the invoker and the controller), deploys
two actions and times ``--calls`` sequential blocking invocations of each, after ``--warmup``
untimed ones, on one keep-alive connection (``http.client``, so the client's own cost is small
and the same for every tree):

* ``noop``: ``main`` returns ``{"ok": true}``; ``?blocking=true&result=true``. Everything it
  costs is the platform's: controller, Redis, invoker, action runtime.
* ``noop_record``: the same action, ``?blocking=true``: the whole activation record comes back.
* ``model``: the demo's ``resnet-s`` function (``runtime.demo.IMAGE_ACTION``: a 1x3x64x64
  input, a model call through the GPU server, 1,000 floats back), ``result=true``.

Latency is measured by this process around each call (request sent → body read), in ms.
``stack_cpu_ms`` is the CPU time the stack's processes (everything this process started,
action runtimes included) used per timed call, ms: on a shared machine other processes' load
moves the latencies by milliseconds, the CPU time per call much less.

With ``--base DIR`` the script runs itself ``--pairs`` times on each of two trees, the tree in
``DIR`` (an export of the commit to compare against, e.g. ``git archive``) and ``--tree``
(default: this checkout),
interleaved (base, this, base, this, ...) so that the machine's drift hits both alike; each run
is a fresh child process with ``PYTHONPATH`` set to its tree, so the stack's processes import
that tree. The JSON then holds every run and, per series, the median over the runs of each
run's p10, p50, p90 and ``stack_cpu_ms``.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOOP_ACTION = "def main(args):\n    return {\"ok\": True}\n"
SERIES = ("noop", "noop_record", "model")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, nearest rank on the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(samples_ms: list[float]) -> dict:
    """p10/p50/p90/p99/mean/min of latencies in ms, rounded to µs."""
    return {"n": len(samples_ms), **{f"p{q}": round(percentile(samples_ms, q), 3) for q in (10, 50, 90, 99)},
            "mean": round(statistics.fmean(samples_ms), 3), "min": round(min(samples_ms), 3)}


def stack_cpu_s() -> float:
    """CPU seconds (user + system) used so far by every process descending from this one: the
    stack (Redis, GPU server, invoker, controller) and the action runtimes the invoker started.
    Other processes' load moves latency a lot on a shared machine, this much less."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class Api:
    """A keep-alive connection to the controller with Basic auth."""

    def __init__(self, port: int, auth: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
                        "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """One request; returns (status, body)."""
        self.conn.request(method, path, body=json.dumps(body or {}).encode(), headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def run_once(calls: int, warmup: int) -> dict:
    """Starts a stack in a temporary folder, deploys the actions and times each series."""
    import torch
    from safetensors.torch import save_model

    from runtime import demo
    from runtime.gpu_server import zoo
    from runtime.gpu_server.repository import ModelSpec, Repository
    from runtime.up import Stack, UpSettings

    fn = demo.functions(1, with_minilm=False)[0]  # the first demo model's function: resnet-s
    model = next(m for m in demo.MODELS if m.name == fn.model)
    with tempfile.TemporaryDirectory(prefix="torpor-platform-") as tmp:
        state = Path(tmp)
        torch.manual_seed(model.seed)
        weights = state / "weights.safetensors"
        save_model(zoo.build(model.architecture, model.config), str(weights))
        spec = Repository(state / "models").register(
            ModelSpec(name=model.name, inputs=model.inputs, architecture=model.architecture, config=model.config), weights)
        settings = UpSettings(state_dir=str(state))
        with Stack(settings, cpu_devices=1, device_memory=spec.bytes + (8 << 20)) as stack:
            api = Api(stack.port, settings.auth)
            for name, record in (("noop", {"exec": {"kind": "python:3", "code": NOOP_ACTION}}), ("model", fn.record())):
                status, body = api.call("PUT", f"/api/v1/namespaces/_/actions/{name}?overwrite=true", record)
                assert status == 200, body
            paths = {"noop": ("/api/v1/namespaces/_/actions/noop?blocking=true&result=true", {}),
                     "noop_record": ("/api/v1/namespaces/_/actions/noop?blocking=true", {}),
                     "model": ("/api/v1/namespaces/_/actions/model?blocking=true&result=true", fn.request(0))}
            out = {}
            for series in SERIES:
                path, params = paths[series]
                samples = []
                for i in range(warmup + calls):
                    if i == warmup:
                        cpu0 = stack_cpu_s()
                    t0 = time.perf_counter()
                    status, body = api.call("POST", path, params)
                    elapsed = (time.perf_counter() - t0) * 1000
                    if status != 200:
                        raise RuntimeError(f"{series}: HTTP {status}: {body[:300]!r}")
                    if i >= warmup:
                        samples.append(elapsed)
                result = json.loads(body)
                if series == "model":
                    assert len(result["output"]) == 1000, result.keys()
                out[series] = {**summary(samples), "stack_cpu_ms": round((stack_cpu_s() - cpu0) * 1000 / calls, 3)}
    return out


def compare(base: str, here: str, pairs: int, calls: int, warmup: int) -> dict:
    """Runs this script on ``base`` and on ``here``, interleaved, ``pairs`` times each."""
    runs = []
    for pair in range(pairs):
        for label, tree in (("base", base), ("this", here)):
            env = {**os.environ, "PYTHONPATH": tree}
            cmd = [sys.executable, __file__, "--calls", str(calls), "--warmup", str(warmup), "--json"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"run of {label} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append({"pair": pair, "tree": label, "loadavg": run["loadavg"], "series": run["series"]})
            print(f"pair {pair} {label}: " + ", ".join(f"{s} p50 {run['series'][s]['p50']:.2f} cpu {run['series'][s]['stack_cpu_ms']:.2f} p90 "
                                                     f"{run['series'][s]['p90']:.2f}" for s in SERIES), file=sys.stderr)
    medians = {label: {s: {q: round(statistics.median(r["series"][s][q] for r in runs if r["tree"] == label), 3)
                           for q in ("p10", "p50", "p90", "stack_cpu_ms")} for s in SERIES} for label in ("base", "this")}
    return {"runs": runs, "medians": medians}


def git_commit(tree: str) -> str | None:
    """The HEAD commit of ``tree``, or None outside a git checkout."""
    done = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per series")
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls per series before them")
    parser.add_argument("--base", help="tree to compare against (interleaved pairs of runs)")
    parser.add_argument("--base-label", default="", help="what --base is, e.g. its commit, for the JSON")
    parser.add_argument("--tree", help="tree measured against --base (default: this checkout; an export "
                                       "keeps edits made meanwhile out of the runs)")
    parser.add_argument("--tree-label", default="", help="what --tree is, for the JSON")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs with --base")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by --base)")
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parent.parent)
    result = {"bench": "platform", "command": "PYTHONPATH=$PWD python3 " + " ".join(map(shlex.quote, sys.argv)),
              "commit": git_commit(here), "machine": platform.node(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "calls": args.calls, "warmup": args.warmup,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.base:
        tree = args.tree or here
        result.update({"base": args.base_label or args.base, "this": args.tree_label or tree,
                       **compare(args.base, tree, args.pairs, args.calls, args.warmup)})
    else:
        import runtime
        result["tree"] = str(Path(runtime.__file__).resolve().parent.parent)
        result["series"] = run_once(args.calls, args.warmup)
        result["loadavg"] = os.getloadavg()
    text = json.dumps(result, indent=None if args.json else 2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
