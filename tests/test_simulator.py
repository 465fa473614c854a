"""The cluster simulator: determinism, sanity of the policies, the CLI."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from controller_plugin.simulator import ClusterSettings, command, simulate, sweep_command

SMALL = ClusterSettings(minutes=3)


def strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "wall_s"}


def test_a_seed_gives_one_result():
    a = simulate(SMALL, 60, "torpor")
    b = simulate(SMALL, 60, "torpor")
    assert strip(a) == strip(b)
    c = simulate(replace(SMALL, seed=1), 60, "torpor")
    assert c["requests"] != a["requests"] or c["p50_ms"] != a["p50_ms"]
    r1 = simulate(SMALL, 60, "random")
    assert strip(r1) == strip(simulate(SMALL, 60, "random"))


def test_native_with_few_functions_meets_every_slo():
    r = simulate(SMALL, 20, "native")
    assert r["slo_attainment"] == 1.0
    assert r["failed"] == 0 and r["swap_ins"] == 0 and r["unplaced_functions"] == 0
    assert r["completed"] == r["requests"] > 0


def test_torpor_serves_what_native_cannot_fit():
    # 8 GB GPUs: a native container takes its weights + 1.5 GB, so only a few functions fit
    tight = replace(SMALL, gpu_memory_gb=8.0)
    native = simulate(tight, 100, "native")
    torpor = simulate(tight, 100, "torpor")
    assert native["unplaced_functions"] > 50
    assert native["failed"] > 0 and native["slo_attainment"] < 0.5
    assert torpor["slo_attainment"] == 1.0 >= native["slo_attainment"]
    assert torpor["failed"] == 0
    # the arena (60% of 8 GB per GPU) cannot hold 100 models: Torpor swaps and evicts
    assert torpor["swap_ins"] > 100 and torpor["evictions"] > 0
    assert torpor["weights_capacity_gb"] == pytest.approx(4.8)


def test_every_request_is_accounted_for_under_every_policy():
    for policy in ("torpor", "lru", "random", "fifo", "native", "keepalive"):
        r = simulate(replace(SMALL, gpu_memory_gb=16.0), 80, policy)
        assert r["completed"] + r["failed"] == r["requests"], policy
        assert 0.0 <= r["slo_attainment"] <= 1.0
        if policy in ("native", "keepalive"):
            assert r["swap_ins"] == 0
        else:
            assert r["cold_starts"] == 0


def test_keepalive_pays_cold_starts_when_containers_expire():
    r = simulate(replace(SMALL, minutes=6), 40, "keepalive")
    assert r["cold_starts"] > 0
    assert r["p99_ms"] > 1000.0  # a 12 s container start shows in the tail


def test_a_shared_host_link_slows_swap_ins():
    base = replace(SMALL, gpu_memory_gb=4.0)
    own = simulate(base, 150, "lru")
    shared = simulate(replace(base, gpus_per_link=4), 150, "lru")
    assert own["swap_ins_pcie"] > 1000
    assert shared["mean_ms"] > own["mean_ms"]


def test_simulate_command_prints_json_last():
    result = CliRunner().invoke(command, ["--functions", "30", "--minutes", "2", "--policy", "torpor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    for key in ("slo_attainment", "p50_ms", "p98_ms", "p99_ms", "gpu_load_cov", "swap_ins", "swap_ins_pcie",
                "swap_ins_nvlink", "requests"):
        assert key in data
    assert data["functions"] == 30 and data["policy"] == "torpor"


def test_simulate_command_rejects_bad_input():
    bad_policy = CliRunner().invoke(command, ["--policy", "roundrobin", "--minutes", "1"])
    assert bad_policy.exit_code == 2 and "unknown policy" in bad_policy.output
    bad_gpus = CliRunner().invoke(command, ["--gpus", "0", "--minutes", "1"])
    assert bad_gpus.exit_code == 2 and "gpus" in bad_gpus.output
    bad_minutes = CliRunner().invoke(command, ["--minutes", "99"])
    assert bad_minutes.exit_code == 2 and "minutes" in bad_minutes.output


def test_profiles_from_a_bench_file_replace_the_model_set(tmp_path):
    path = tmp_path / "x-swap.json"
    path.write_text(json.dumps({"models": {"tiny": {"bytes": 10_000_000, "served_warm_ms": 50.0}}}))
    r = simulate(replace(SMALL, profiles=str(path)), 10, "torpor")
    assert r["p50_ms"] == pytest.approx(50.0, rel=0.15)  # every function runs the 50 ms model
    path.write_text("{}")
    result = CliRunner().invoke(command, ["--profiles", str(path), "--minutes", "1"])
    assert result.exit_code == 2 and "models" in result.output


def test_sweep_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(sweep_command, ["--functions", "10,20", "--policies", "torpor,native",
                                                "--minutes", "1", "--jobs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert {(r["functions"], r["policy"]) for r in data["runs"]} == {(10, "torpor"), (10, "native"),
                                                                     (20, "torpor"), (20, "native")}
    assert data["command"].startswith("torpor sweep ")
    table = (tmp_path / "sweep.md").read_text()
    assert "| functions | torpor | native |" in table
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(sweep_command, ["--functions", "10,x", "--out", str(out)])
    assert bad.exit_code == 2


def test_slo_aware_ordering_saves_functions_under_overload():
    # one 8 GB GPU swapping for 500 functions is past saturation: FIFO lets every queue grow
    # alike, SLO-debt ordering spends the GPU on the functions it can keep within their SLO
    busy = replace(ClusterSettings(minutes=4), gpus=1, gpu_memory_gb=8.0)
    fifo = simulate(busy, 500, "fifo")
    slo = simulate(busy, 500, "torpor")
    assert fifo["requests"] == slo["requests"]
    assert slo["slo_attainment"] > fifo["slo_attainment"] + 0.15
