"""Replays an arrival schedule against actions and measures latency against each SLO.

:func:`replay` is a plain function so that ``torpor up`` can drive it in-process; the
``torpor loadgen`` command wraps it around a running controller through
:func:`openwhisk_invoker`. A dispatcher thread issues each request at its scheduled time
(trace time divided by the speed-up factor) into a bounded thread pool; when all
``concurrency`` workers are busy the request waits in the pool's queue, and that wait counts
in its latency, which runs from the scheduled time, not from when the request was sent.
"""
from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import click
import requests
from tqdm import tqdm

from loadgen import stats
from loadgen.report import write_report
from loadgen.trace import default_trace_path, load_trace, schedule
from runtime import settings as rs

# (result or None, error text or None, latency in ms measured by the invoker)
InvokeResult = tuple[dict | None, str | None, float]
Invoke = Callable[[str, dict], InvokeResult]

from controller_plugin.config import GUEST_AUTH
# Object reprs in exception texts ("<...Connection object at 0x7f..>") would make every
# connection error a distinct entry in the error tally.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class FunctionLoad:
    """One function of the workload.

    Attributes:
        name: the action to invoke.
        slo_ms: latency SLO of its P98, in ms.
        make_params: the function's request index (0, 1, ... in arrival order, counted per
            function) -> JSON-serialisable parameters of that request.
        check: ``(params, result) -> bool``, whether a completed request's output is right;
            ``None`` skips the check. A check that raises counts as a wrong output.
    """

    name: str
    slo_ms: float
    make_params: Callable[[int], dict]
    check: Callable[[dict, dict], bool] | None = None


def openwhisk_invoker(api_host: str, auth: str, namespace: str = "_", timeout_s: float = 70.0) -> Invoke:
    """An :data:`Invoke` doing OpenWhisk blocking invocations that return only the result.

    Each call POSTs the params as JSON to
    ``{api_host}/api/v1/namespaces/{namespace}/actions/{action}?blocking=true&result=true``
    with HTTP Basic auth, on a ``requests.Session`` kept per thread. A 200 with a JSON object
    body is success; any other status (including 202, a blocking call that outlived the
    controller's wait) is an error ``"HTTP {status}: {body}"``; a connection failure or a
    timeout after ``timeout_s`` seconds is an error naming the exception. The latency (ms)
    runs from before the request is sent to after the whole body is read.

    Raises:
        ValueError: ``auth`` is not ``"uuid:key"``.
    """
    user, sep, key = auth.partition(":")
    if not sep or not user or not key:
        raise ValueError("auth must be 'uuid:key'")
    base = f"{api_host.rstrip('/')}/api/v1/namespaces/{quote(namespace, safe='')}/actions/"
    local = threading.local()

    def invoke(action: str, params: dict) -> InvokeResult:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.auth = (user, key)
        begin = time.perf_counter()
        try:
            response = session.post(base + quote(action, safe="/"), params={"blocking": "true", "result": "true"},
                                     json=params, timeout=timeout_s)
        except requests.RequestException as exc:
            return None, _ADDRESS.sub("", f"{type(exc).__name__}: {exc}"), (time.perf_counter() - begin) * 1e3
        latency_ms = (time.perf_counter() - begin) * 1e3
        if response.status_code != 200:
            return None, f"HTTP {response.status_code}: {response.text}", latency_ms
        try:
            result = response.json()
        except ValueError:
            return None, f"HTTP 200 with a body that is not JSON: {response.text}", latency_ms
        if not isinstance(result, dict):
            return None, f"HTTP 200 with a body that is not a JSON object: {response.text}", latency_ms
        return result, None, latency_ms

    return invoke


@dataclass
class _Outcome:
    t_s: float  # scheduled send time, real seconds since the replay started
    latency_ms: float  # from the scheduled time to the answer
    function_index: int
    error: str | None
    correct: bool | None  # None: failed, or no check


def replay(invoke: Invoke, functions: list[FunctionLoad], arrivals: list[tuple[float, int]],
           speedup: float = 1.0, concurrency: int = 64, progress: bool = True) -> dict[str, Any]:
    """Issues every arrival at trace time / ``speedup`` and returns the report.

    Args:
        invoke: ``invoke(action, params) -> (result, error, latency_ms)``, e.g.
            :func:`openwhisk_invoker`; it is called from up to ``concurrency`` threads at once.
            An exception it raises counts as a failed request.
        functions: the workload's functions; an arrival's function index points here.
        arrivals: ``[(t_s, function_index), ...]`` sorted by ``t_s`` (trace seconds), as
            :func:`loadgen.trace.schedule` returns.
        speedup: trace seconds per real second (> 0).
        concurrency: most requests outstanding at once (threads in the pool, >= 1).
        progress: show a tqdm progress bar on stderr.

    Returns:
        The report dict: counts (``functions``, ``requests``, ``completed``, ``failed``,
        ``wrong_outputs``), overall ``p50_ms``/``p95_ms``/``p98_ms``/``p99_ms`` of completed
        requests, ``slo_attainment`` (share of functions with requests whose P98, failed
        requests counted as infinite, is within their SLO), ``per_function`` (keyed by action
        name, or by ``"name#index"`` when functions share actions; see :func:`function_keys`),
        ``errors`` (top 10 error texts, cut to 200 chars, with counts), ``duration_s``,
        ``speedup``, ``concurrency``, and the series ``failures`` and ``latencies``:
        ``[[t_s, latency_ms, function_index], ...]`` with ``t_s`` the scheduled real time
        since the start, for failed and completed requests respectively. Latencies in ms;
        no value is ``None``.

    Raises:
        ValueError: bad ``speedup``/``concurrency``, no functions, or an arrival whose
            function index is out of range.
    """
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not functions:
        raise ValueError("no functions to replay")
    plan = _plan(arrivals, len(functions))
    outcomes: list[_Outcome | None] = [None] * len(plan)
    bar = tqdm(total=len(plan), disable=not progress, unit="req", desc="loadgen")
    bar_lock = threading.Lock()
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loadgen")
    start = time.perf_counter()

    def run_one(i: int) -> None:
        t_s, fi, k = plan[i]
        fn = functions[fi]
        begin = time.perf_counter()
        queued_ms = max(0.0, (begin - (start + t_s / speedup)) * 1e3)
        try:
            params = fn.make_params(k)
            result, error, latency_ms = invoke(fn.name, params)
        except Exception as exc:  # a broken invoker or make_params fails the request, not the run
            result, error = None, f"{type(exc).__name__}: {exc}"
            latency_ms = (time.perf_counter() - begin) * 1e3
        correct = None
        if error is None and fn.check is not None:
            try:
                correct = bool(fn.check(params, result))
            except Exception:
                correct = False
        outcomes[i] = _Outcome(t_s / speedup, queued_ms + latency_ms, fi, error, correct)
        with bar_lock:
            bar.update(1)

    def dispatch() -> None:
        for i, (t_s, _, _) in enumerate(plan):
            delay = start + t_s / speedup - time.perf_counter()
            if (delay > 0 and stop.wait(delay)) or stop.is_set():
                return
            pool.submit(run_one, i)

    dispatcher = threading.Thread(target=dispatch, name="loadgen-dispatcher", daemon=True)
    try:
        dispatcher.start()
        dispatcher.join()
        pool.shutdown(wait=True)
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    duration_s = time.perf_counter() - start
    return summarize(functions, [o for o in outcomes if o is not None], duration_s, speedup, concurrency)


def _plan(arrivals: list[tuple[float, int]], n_functions: int) -> list[tuple[float, int, int]]:
    """``(t_s, function_index, request index within that function)`` per arrival, by time."""
    seen = [0] * n_functions
    plan = []
    for t_s, fi in sorted(arrivals, key=lambda a: a[0]):
        if not 0 <= fi < n_functions:
            raise ValueError(f"arrival at {t_s} s names function {fi}, but there are {n_functions}")
        plan.append((float(t_s), int(fi), seen[fi]))
        seen[fi] += 1
    return plan


def function_keys(functions: list[FunctionLoad]) -> list[str]:
    """Report keys: the action names when they are distinct, else ``"name#index"`` for all."""
    names = [fn.name for fn in functions]
    if len(set(names)) == len(names):
        return names
    return [f"{name}#{i}" for i, name in enumerate(names)]


def summarize(functions: list[FunctionLoad], outcomes: list[_Outcome], duration_s: float, speedup: float,
              concurrency: int) -> dict[str, Any]:
    """The report dict of :func:`replay` from its per-request outcomes."""
    completed: list[list[float]] = [[] for _ in functions]
    failed = [0] * len(functions)
    wrong = [0] * len(functions)
    requests_of = [0] * len(functions)
    for o in outcomes:
        requests_of[o.function_index] += 1
        if o.error is None:
            completed[o.function_index].append(o.latency_ms)
            wrong[o.function_index] += o.correct is False
        else:
            failed[o.function_index] += 1

    per_function = {}
    met = []
    for i, (fn, key) in enumerate(zip(functions, function_keys(functions))):
        ok = stats.slo_met(completed[i], failed[i], fn.slo_ms)
        met.append(ok)
        per_function[key] = {
            "index": i, "action": fn.name, "requests": requests_of[i], "completed": len(completed[i]),
            "failed": failed[i], "wrong_outputs": wrong[i], **stats.percentiles(completed[i]),
            "slo_ms": fn.slo_ms, "slo_met": ok,
        }
    ok_latencies = [o.latency_ms for o in outcomes if o.error is None]
    return {
        "functions": len(functions),
        "requests": len(outcomes),
        "completed": len(ok_latencies),
        "failed": sum(failed),
        "wrong_outputs": sum(wrong),
        **stats.percentiles(ok_latencies),
        "slo_attainment": stats.slo_attainment(met),
        "per_function": per_function,
        "errors": stats.top_errors(o.error for o in outcomes if o.error is not None),
        "duration_s": duration_s,
        "speedup": speedup,
        "concurrency": concurrency,
        "failures": [[o.t_s, o.latency_ms, o.function_index] for o in outcomes if o.error is not None],
        "latencies": [[o.t_s, o.latency_ms, o.function_index] for o in outcomes if o.error is None],
    }


SERIES_KEYS = ("per_function", "failures", "latencies", "swap_ins")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-function table and per-request series."""
    return {k: v for k, v in report.items() if k not in SERIES_KEYS}


@dataclass
class LoadgenSettings:
    """Settings of ``torpor loadgen``."""

    api_host: str = rs.setting("http://127.0.0.1:3233", "TORPOR_API_HOST", "OpenWhisk API host of the controller")
    auth: str = rs.setting(GUEST_AUTH, "TORPOR_AUTH", "credentials 'uuid:key' (HTTP Basic auth)")
    namespace: str = rs.setting("_", "TORPOR_LOADGEN_NAMESPACE", "namespace of the actions ('_': the caller's)")
    actions: str = rs.setting("", "TORPOR_LOADGEN_ACTIONS",
                              "comma-separated deployed actions; trace functions map onto them round-robin")
    functions: int = rs.setting(20, "TORPOR_LOADGEN_FUNCTIONS", "trace functions to replay (beyond 203: resampled)")
    params: str = rs.setting("{}", "TORPOR_LOADGEN_PARAMS", "JSON object sent as every request's parameters")
    slo_ms: float = rs.setting(100.0, "TORPOR_LOADGEN_SLO_MS", "P98 latency SLO of every function", "ms")
    speedup: float = rs.setting(20.0, "TORPOR_LOADGEN_SPEEDUP", "trace seconds per real second")
    minutes: int | None = rs.setting(None, "TORPOR_LOADGEN_MINUTES", "replay only the first M trace minutes", "min")
    rate_scale: float = rs.setting(1.0, "TORPOR_LOADGEN_RATE_SCALE", "factor on every per-minute count")
    seed: int = rs.setting(0, "TORPOR_LOADGEN_SEED", "seed of function sampling and arrival times")
    concurrency: int = rs.setting(64, "TORPOR_LOADGEN_CONCURRENCY", "most requests outstanding at once")
    timeout_s: float = rs.setting(70.0, "TORPOR_LOADGEN_TIMEOUT_S", "HTTP timeout of one invocation", "s")
    trace: str = rs.setting("", "TORPOR_TRACE", "trace .npy (default: ../shared/traces/torpor_samples.npy "
                                                "beside the repo root)")
    out: str = rs.setting("loadgen/results/loadgen", "TORPOR_LOADGEN_OUT",
                          "output path without extension: writes OUT.json and OUT.png")
    progress: bool = rs.setting(True, "TORPOR_LOADGEN_PROGRESS", "show a progress bar on stderr")


@click.command("loadgen")
@rs.options(LoadgenSettings)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on the last line")
def command(as_json: bool, **kwargs: Any) -> None:
    """Replay the Torpor trace against a running controller and report latency and SLO attainment."""
    s = rs.from_kwargs(LoadgenSettings, kwargs)
    actions = [a.strip() for a in s.actions.split(",") if a.strip()]
    if not actions:
        raise click.UsageError("--actions is required: the deployed actions to invoke, comma-separated")
    try:
        params = json.loads(s.params)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from exc
    if not isinstance(params, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--params")
    try:
        trace = load_trace(s.trace or default_trace_path())
        arrivals = schedule(trace, s.functions, s.seed, s.minutes, s.rate_scale)
        invoke = openwhisk_invoker(s.api_host, s.auth, s.namespace, s.timeout_s)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    functions = [FunctionLoad(actions[i % len(actions)], s.slo_ms, lambda _k: dict(params))
                 for i in range(s.functions)]
    report = replay(invoke, functions, arrivals, s.speedup, s.concurrency, s.progress)
    report["settings"] = {k: v for k, v in dataclasses.asdict(s).items() if k != "auth"}
    json_path, png_path = output_paths(s.out)
    write_report(report, json_path, png_path)

    head = summary(report)
    click.echo(f"{head['requests']} requests to {head['functions']} functions in {head['duration_s']:.1f} s: "
               f"{head['completed']} completed, {head['failed']} failed, {head['wrong_outputs']} wrong outputs")
    click.echo(f"P50 {_ms(head['p50_ms'])}  P98 {_ms(head['p98_ms'])}  P99 {_ms(head['p99_ms'])}  "
               f"SLO attainment {_share(head['slo_attainment'])}")
    for text, count in head["errors"].items():
        click.echo(f"  {count} x {text}")
    click.echo(f"wrote {json_path} and {png_path}")
    if as_json:
        click.echo(json.dumps({**head, "json": str(json_path), "png": str(png_path)}))
    if head["requests"] and not head["completed"]:
        raise click.ClickException("no request completed")


def output_paths(out: str) -> tuple[Path, Path]:
    """``(OUT.json, OUT.png)``; an ``out`` already ending in ``.json`` or ``.png`` loses that suffix."""
    base = Path(out)
    if base.suffix in (".json", ".png"):
        base = base.with_suffix("")
    return base.parent / f"{base.name}.json", base.parent / f"{base.name}.png"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
