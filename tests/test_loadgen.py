"""Load generator: trace schedules, statistics, replay against a real HTTP server, plots."""
from __future__ import annotations

import base64
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from loadgen import stats
from loadgen.replay import GUEST_AUTH, FunctionLoad, openwhisk_invoker, output_paths, replay
from loadgen.report import detect_kind, write_report
from loadgen.trace import default_trace_path, load_trace, sampled_rows, schedule
from runtime.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trace() -> np.ndarray:
    return load_trace()


# ---------------------------------------------------------------- trace and schedule


def per_minute(arrivals, n_functions: int, minutes: int) -> np.ndarray:
    counts = np.zeros((n_functions, minutes), dtype=np.int64)
    for t_s, fi in arrivals:
        counts[fi, int(t_s // 60)] += 1
    return counts


def test_default_trace_path_is_beside_the_repo(monkeypatch):
    monkeypatch.delenv("TORPOR_TRACE", raising=False)
    repo_root = Path(__file__).resolve().parents[1]
    assert default_trace_path() == repo_root.parent / "shared" / "traces" / "torpor_samples.npy"
    monkeypatch.setenv("TORPOR_TRACE", "/elsewhere/t.npy")
    assert default_trace_path() == Path("/elsewhere/t.npy")


def test_trace_shape(trace):
    assert trace.shape == (203, 31) and trace.dtype == np.int64 and trace.sum() == 61589


def test_schedule_counts_equal_trace_rows_minute_by_minute(trace):
    arrivals = schedule(trace, 40, seed=7)
    rows = sampled_rows(203, 40, seed=7)
    assert len(set(rows.tolist())) == 40
    np.testing.assert_array_equal(per_minute(arrivals, 40, 31), trace[rows])
    times = [t for t, _ in arrivals]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 31 * 60


def test_schedule_first_minutes_only(trace):
    arrivals = schedule(trace, 10, seed=3, minutes=4)
    rows = sampled_rows(203, 10, seed=3)
    assert max(t for t, _ in arrivals) < 4 * 60
    np.testing.assert_array_equal(per_minute(arrivals, 10, 4), trace[rows, :4])


def test_schedule_is_seeded(trace):
    assert schedule(trace, 25, seed=11, minutes=5) == schedule(trace, 25, seed=11, minutes=5)
    assert schedule(trace, 25, seed=11, minutes=5) != schedule(trace, 25, seed=12, minutes=5)


def test_schedule_beyond_203_functions_resamples_rows(trace):
    arrivals = schedule(trace, 450, seed=1, minutes=3)
    rows = sampled_rows(203, 450, seed=1)
    assert len(rows) == 450 and set(rows.tolist()) == set(range(203))
    np.testing.assert_array_equal(per_minute(arrivals, 450, 3), trace[rows, :3])
    assert {fi for _, fi in arrivals} == {i for i in range(450) if trace[rows[i], :3].sum() > 0}


def test_rate_scale_doubles_exactly_and_thins_by_half(trace):
    rows = sampled_rows(203, 203, seed=5)
    doubled = per_minute(schedule(trace, 203, seed=5, rate_scale=2.0), 203, 31)
    np.testing.assert_array_equal(doubled, 2 * trace[rows])
    halved = per_minute(schedule(trace, 203, seed=5, rate_scale=0.5), 203, 31)
    assert (halved <= trace[rows]).all()
    assert abs(halved.sum() - trace.sum() / 2) < 0.02 * trace.sum()


@pytest.mark.parametrize("kwargs", [{"n_functions": 0}, {"minutes": 0}, {"minutes": 32}, {"rate_scale": -1.0}])
def test_schedule_rejects_bad_arguments(trace, kwargs):
    args = {"n_functions": 5, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        schedule(trace, **args)


def test_load_trace_refuses_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="TORPOR_TRACE"):
        load_trace(tmp_path / "missing.npy")
    np.save(tmp_path / "floats.npy", np.ones((3, 4)))
    with pytest.raises(ValueError, match="integer"):
        load_trace(tmp_path / "floats.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_trace(tmp_path / "objects.npy")


# ---------------------------------------------------------------- statistics


def test_percentiles_hand_computed():
    assert stats.percentile([10, 20, 30, 40], 50) == 25
    assert stats.percentile([1, 2, 3, 4, 5], 98) == pytest.approx(4.92)
    assert stats.percentile([], 50) is None
    assert stats.percentiles([7.0]) == {"p50_ms": 7.0, "p95_ms": 7.0, "p98_ms": 7.0, "p99_ms": 7.0}


def test_percentile_with_failures_hand_computed():
    assert stats.percentile_with_failures([10, 20, 30], 1, 50) == 25
    assert stats.percentile_with_failures([30, 10, 20], 1, 100 * 2 / 3) == pytest.approx(30)
    assert stats.percentile_with_failures([10, 20, 30], 1, 98) == math.inf
    assert stats.percentile_with_failures([], 2, 50) == math.inf
    assert stats.percentile_with_failures([], 0, 50) is None
    values = np.random.default_rng(0).exponential(30, 57)
    for q in (50, 95, 98, 99):
        assert stats.percentile_with_failures(values, 0, q) == pytest.approx(np.percentile(values, q))


def test_slo_met_and_attainment_hand_computed():
    # 100 values: P98 sits at rank 97.02, between the 98th and 99th smallest.
    assert stats.slo_met([10] * 98 + [200] * 2, 0, 100)  # 10 + 0.02 * 190 = 13.8
    assert not stats.slo_met([10] * 97 + [200] * 3, 0, 100)  # 200
    assert stats.slo_met([10] * 99, 1, 100)
    assert not stats.slo_met([10] * 98, 2, 100)  # 10 + 0.02 * (inf - 10)
    assert stats.slo_met([], 0, 100) is None
    assert stats.slo_attainment([True, False, None, True]) == pytest.approx(2 / 3)
    assert stats.slo_attainment([None]) is None


def test_top_errors_cuts_and_ranks():
    errors = ["a" * 300] * 3 + ["b"] * 5 + [f"e{i}" for i in range(20)]
    top = stats.top_errors(errors)
    assert len(top) == 10
    assert list(top.items())[:2] == [("b", 5), ("a" * 200, 3)]


# ---------------------------------------------------------------- a real OpenWhisk-like server

GUEST_USER, GUEST_KEY = GUEST_AUTH.split(":")


def make_app(received: list) -> Flask:
    """Answers blocking invokes with ``{"y": 2x}``: 502 for function 1's requests k % 7 == 3,
    ``y = -1`` (wrong) for function 0's request 5, and sleeps ``sleep_ms`` when asked."""
    app = Flask(__name__)

    @app.post("/api/v1/namespaces/<ns>/actions/<path:name>")
    def invoke(ns: str, name: str):
        received.append((time.perf_counter(), name))
        expected = "Basic " + base64.b64encode(GUEST_AUTH.encode()).decode()
        if request.headers.get("Authorization") != expected:
            return jsonify(error="The supplied authentication is invalid", code="x"), 401
        if request.args.get("blocking") != "true" or request.args.get("result") != "true" or ns != "_":
            return jsonify(error="expected a blocking result-only invoke in namespace _"), 400
        params = request.get_json()
        time.sleep(params.get("sleep_ms", 0) / 1e3)
        if params.get("f") == 1 and params["x"] % 7 == 3:
            return jsonify(error="boom"), 502
        if params.get("f") == 0 and params["x"] == 5:
            return jsonify(y=-1, action=name)
        return jsonify(y=2 * params["x"], action=name)

    return app


@pytest.fixture(scope="module")
def server():
    received: list = []
    srv = make_server("127.0.0.1", 0, make_app(received), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", received
    srv.shutdown()
    thread.join(5)


def doubles(params: dict, result: dict) -> bool:
    return result["y"] == 2 * params["x"]


def test_replay_counts_outcomes_exactly(server, tmp_path):
    api_host, _ = server
    slos = [10_000.0, 10_000.0, 10_000.0, 1e-6]
    functions = [FunctionLoad(f"act{i % 2}", slos[i], lambda k, i=i: {"x": k, "f": i}, doubles) for i in range(4)]
    arrivals = sorted((k * 3.0 + i * 0.5, i) for i in range(4) for k in range(15))  # 60 requests in 45 s of trace
    report = replay(openwhisk_invoker(api_host, GUEST_AUTH), functions, arrivals, speedup=300, concurrency=4,
                    progress=False)

    failed_in_f1 = len([k for k in range(15) if k % 7 == 3])
    assert (report["requests"], report["failed"], report["wrong_outputs"]) == (60, failed_in_f1, 1)
    assert report["completed"] == 60 - failed_in_f1
    assert list(report["per_function"]) == ["act0#0", "act1#1", "act0#2", "act1#3"]
    f0, f1, f2, f3 = report["per_function"].values()
    assert (f0["wrong_outputs"], f0["failed"], f0["slo_met"]) == (1, 0, True)
    assert (f1["failed"], f1["completed"], f1["slo_met"]) == (failed_in_f1, 15 - failed_in_f1, False)
    assert f2["slo_met"] is True and f3["slo_met"] is False
    assert report["slo_attainment"] == 0.5
    assert list(report["errors"]) == ['HTTP 502: {"error":"boom"}\n']
    assert report["errors"]['HTTP 502: {"error":"boom"}\n'] == failed_in_f1
    # every request appears once, at its compressed scheduled time
    series = sorted(report["latencies"] + report["failures"])
    assert [row[0] for row in series] == pytest.approx([t / 300 for t, _ in arrivals])
    assert sorted(row[2] for row in series) == sorted(fi for _, fi in arrivals)
    ok = [row[1] for row in report["latencies"]]
    assert report["p50_ms"] == pytest.approx(np.percentile(ok, 50))
    assert 0 < report["p50_ms"] <= report["p98_ms"] <= report["p99_ms"]

    write_report(report, tmp_path / "r" / "run.json", tmp_path / "r" / "run.png")
    assert json.loads((tmp_path / "r" / "run.json").read_text()) == report
    assert (tmp_path / "r" / "run.png").read_bytes()[:8] == PNG_MAGIC


def test_replay_issues_requests_at_scheduled_times(server):
    api_host, received = server
    received.clear()
    functions = [FunctionLoad("paced", 100, lambda k: {"x": k})]
    report = replay(openwhisk_invoker(api_host, GUEST_AUTH), functions, [(0.0, 0), (10.0, 0), (20.0, 0)],
                    speedup=50, concurrency=2, progress=False)
    assert report["completed"] == 3
    gaps = np.diff([t for t, _ in received])
    assert gaps == pytest.approx([0.2, 0.2], abs=0.08)


def test_replay_latency_counts_queueing_from_scheduled_time(server):
    api_host, _ = server
    functions = [FunctionLoad("slow", 100, lambda k: {"x": k, "sleep_ms": 60})]
    report = replay(openwhisk_invoker(api_host, GUEST_AUTH), functions, [(0.0, 0)] * 4, speedup=1, concurrency=1,
                    progress=False)
    latencies = sorted(row[1] for row in report["latencies"])
    assert latencies[0] >= 60 and latencies[-1] >= 4 * 60
    assert report["per_function"]["slow"]["slo_met"] is False


def test_openwhisk_invoker_errors_keep_status_and_body(server):
    api_host, _ = server
    result, error, latency_ms = openwhisk_invoker(api_host, "nobody:wrong")("act", {"x": 1})
    assert result is None and error.startswith("HTTP 401:") and "authentication is invalid" in error
    assert latency_ms > 0
    result, error, _ = openwhisk_invoker(api_host, GUEST_AUTH)("act", {"x": 4})
    assert (result, error) == ({"y": 8, "action": "act"}, None)
    with pytest.raises(ValueError):
        openwhisk_invoker(api_host, "no-colon")


def test_openwhisk_invoker_connection_refused():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, error, _ = openwhisk_invoker(f"http://127.0.0.1:{port}", GUEST_AUTH, timeout_s=2)("act", {})
    assert result is None and error.startswith("ConnectionError") and " at 0x" not in error


def test_replay_counts_a_raising_invoker_as_failed():
    def broken(action, params):
        raise RuntimeError("socket gone")

    report = replay(broken, [FunctionLoad("a", 100, lambda k: {})], [(0.0, 0), (1.0, 0)], speedup=100,
                    progress=False)
    assert (report["failed"], report["completed"], report["slo_attainment"]) == (2, 0, 0.0)
    assert report["errors"] == {"RuntimeError: socket gone": 2}
    with pytest.raises(ValueError):
        replay(broken, [FunctionLoad("a", 100, lambda k: {})], [(0.0, 1)], progress=False)


# ---------------------------------------------------------------- command lines


def test_loadgen_command_against_the_server(server, trace, tmp_path):
    api_host, _ = server
    out = tmp_path / "results" / "cli"
    result = CliRunner().invoke(main, [
        "loadgen", "--api-host", api_host, "--actions", "double,other", "--functions", "3", "--minutes", "1",
        "--speedup", "600", "--seed", "4", "--params", '{"x": 4}', "--no-progress", "--out", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    head = json.loads(result.output.strip().splitlines()[-1])
    expected = len(schedule(trace, 3, 4, minutes=1))
    assert (head["requests"], head["completed"], head["failed"]) == (expected, expected, 0)
    saved = json.loads(Path(head["json"]).read_text())
    assert list(saved["per_function"]) == ["double#0", "other#1", "double#2"]
    # attainment is the share of functions whose P98 met the SLO (how many do is the
    # machine's business: a loaded CI runner may miss 100 ms)
    per_function = saved["per_function"].values()
    assert all(f["slo_met"] == (f["p98_ms"] <= f["slo_ms"]) for f in per_function)
    assert head["slo_attainment"] == sum(f["slo_met"] for f in per_function) / 3
    assert Path(head["png"]).read_bytes()[:8] == PNG_MAGIC
    assert output_paths(str(out) + ".json") == (out.with_suffix(".json"), out.with_suffix(".png"))


def test_loadgen_command_rejects_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["loadgen", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--actions is required" in result.output
    result = runner.invoke(main, ["loadgen", "--actions", "a", "--params", "[1]", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "JSON object" in result.output
    result = runner.invoke(main, ["loadgen", "--actions", "a", "--minutes", "99", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "minutes must be in 1..31" in result.output


def loadgen_report(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    latencies = [[float(t), float(rng.exponential(20)), int(t) % 3] for t in np.sort(rng.uniform(0, 30, 200))]
    per_function = {f"f{i}": {"p98_ms": float(50 + i), "slo_ms": 100.0, "slo_met": i != 2} for i in range(3)}
    return {"functions": 3, "requests": 203, "completed": 200, "failed": 3, "wrong_outputs": 0,
            "slo_attainment": 2 / 3, "per_function": per_function, "latencies": latencies,
            "failures": [[1.0, 70000.0, 2]] * 3, "swap_ins": [0.5, 1.5, 12.0]}


def test_report_command_writes_one_png_per_plot(tmp_path):
    files = {
        "torpor.json": loadgen_report(0),
        "native.json": loadgen_report(1),
        "sweep.json": {"runs": [{"functions": n, "policy": p, "slo_attainment": a, "p98_ms": 40.0 * a}
                                for p in ("torpor", "lru") for n, a in ((40, 1.0), (80, 0.9), (160, 0.5))]},
        "swap.json": {"gpu": "NVIDIA H200", "models": {
            "resnet50": {"bytes": 102_000_000, "bound_ms": 1.9, "served_warm_ms": 3.0, "cold_pcie_ms": 5.1},
            "vit_l16": {"bytes": 1_200_000_000, "bound_ms": 22.0, "served_warm_ms": 9.0, "cold_pcie_ms": 31.0}}},
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    out = tmp_path / "plots"
    result = CliRunner().invoke(main, ["report", *paths, "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = ["torpor_latency_cdf.png", "torpor_timeline.png", "native_latency_cdf.png", "native_timeline.png",
                "sweep_slo_attainment.png", "swap_swap.png", "latency_cdf.png"]
    assert result.output.split() == [str(out / name) for name in expected]
    for name in expected:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_report_command_rejects_unknown_and_malformed_files(tmp_path):
    (tmp_path / "other.json").write_text('{"hello": 1}')
    result = CliRunner().invoke(main, ["report", str(tmp_path / "other.json"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "not a loadgen report" in result.output
    (tmp_path / "broken.json").write_text('{"runs": [{"policy": "x"}]}')
    result = CliRunner().invoke(main, ["report", str(tmp_path / "broken.json"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "malformed simulator result" in result.output
    (tmp_path / "text.json").write_text("not json")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "text.json"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "text.json" in result.output


def test_detect_kind():
    assert detect_kind(loadgen_report(0)) == "loadgen"
    assert detect_kind({"runs": []}) == "simulator"
    assert detect_kind({"gpu": "x", "models": {}}) == "bench"
    with pytest.raises(ValueError):
        detect_kind([1, 2])
