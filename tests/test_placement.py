"""The scheduling policy: latency prediction, device choice, eviction order, SLO ordering, topology."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pynvml
import pytest

from controller_plugin.predictor import LinkModel, Predictor, choose_node, read_bench
from controller_plugin.slo import SLOTracker, default_slo_ms
from runtime.gpu_server.arena import Arena
from runtime.gpu_server.placement import (DeviceState, Policy, ResidentModel, choose_device, eviction_order,
                                          eviction_priority, window_cost)
from runtime.gpu_server.topology import cpu_topology, discover, group_links

MB = 1_000_000
GB = 1_000_000_000


def predictor(**models: tuple[int, float]) -> Predictor:
    p = Predictor()
    for name, (nbytes, exec_ms) in models.items():
        p.set_profile(name, nbytes, exec_ms)
    return p


def dev(index: int, *models: ResidentModel, capacity: int = 10 * GB, busy: bool = False, queue_ms: float = 0.0,
        peers: set[int] | None = None, link: str | None = None, healthy: bool = True) -> DeviceState:
    return DeviceState(index, link or f"pcie:{index}", capacity, {m.name: m for m in models}, queue_ms=queue_ms,
                       busy=busy, healthy=healthy, nvlink_peers=peers or set())


def rm(name: str, nbytes: int, last_used: float = 0.0, in_use: int = 0) -> ResidentModel:
    return ResidentModel(name, nbytes, last_used, in_use)


# --- predictor arithmetic ---------------------------------------------------------------

def test_transfer_time_follows_bandwidth_and_fair_sharing():
    links = LinkModel()
    assert links.transfer_ms(110 * MB, "pcie") == pytest.approx(2.0)  # 110 MB at 55 GB/s
    assert links.transfer_ms(110 * MB, "pcie", in_flight=1) == pytest.approx(4.0)  # half the link
    assert links.transfer_ms(110 * MB, "pcie", in_flight=3) == pytest.approx(8.0)
    assert links.transfer_ms(387 * MB, "nvlink") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        links.transfer_ms(1, "ethernet")


def test_slowdown_inflicted_on_transfers_already_on_the_link():
    links = LinkModel()
    # two transfers at least as long as the new 110 MB one: each loses 2 ms of link time
    assert links.inflicted_ms(110 * MB, "pcie", 2) == pytest.approx(4.0)
    # one with only 55 MB left loses 1 ms, one with 1 GB left loses the full 2 ms
    assert links.inflicted_ms(110 * MB, "pcie", [55 * MB, GB]) == pytest.approx(3.0)
    assert links.inflicted_ms(110 * MB, "pcie", 0) == 0.0


def test_predict_adds_queue_transfer_and_pipelined_execution():
    p = predictor(m=(110 * MB, 1.0))
    d = dev(0, queue_ms=5.0)
    pcie = p.predict("m", d)
    assert pcie.transfer_ms == pytest.approx(2.0)
    # pipelined: the run ends a tail after the last byte lands
    assert pcie.total_ms == pytest.approx(5.0 + 2.0 + 0.08 * 1.0)
    shared = p.predict("m", d, in_flight=1)
    assert shared.total_ms == pytest.approx(5.0 + 4.0 + 0.08)
    d.resident["m"] = rm("m", 110 * MB)
    assert p.predict("m", d).total_ms == pytest.approx(6.0)
    nv = p.predict("m", dev(1), path="nvlink")
    assert nv.total_ms == pytest.approx(max(110 / 387, 1.0) + 0.08)
    cold = p.predict("m", dev(1, queue_ms=3.0), path="cold", cold_start_ms=12000)
    assert cold.total_ms == pytest.approx(12001.0)


def test_execution_profile_is_learned_online():
    p = predictor(m=(MB, 10.0))
    p.observe("m", "NVIDIA H200", 20.0)
    assert p.exec_ms("m", "NVIDIA H200") == pytest.approx(12.0)  # EWMA, alpha 0.2, from the seed
    assert p.exec_ms("m", "cpu") == pytest.approx(10.0)  # other kinds keep the seed
    assert p.exec_ms("unknown") == p.default_exec_ms


def test_bench_results_seed_profiles(tmp_path):
    path = tmp_path / "h200-swap.json"
    path.write_text(json.dumps({"models": {"resnet50": {"bytes": 102 * MB, "served_warm_ms": 0.9, "cold_ms": 2}}}))
    p = Predictor()
    assert p.load_bench(path) == ["resnet50"]
    assert p.profile("resnet50").bytes == 102 * MB and p.exec_ms("resnet50") == 0.9
    path.write_text(json.dumps({"models": {"x": {"bytes": 1}}}))
    with pytest.raises(ValueError, match="served_warm_ms"):
        read_bench(path)


# --- device choice ----------------------------------------------------------------------

def test_resident_on_an_idle_device_runs_there():
    p = predictor(m=(500 * MB, 2.0))
    devices = [dev(0), dev(1, rm("m", 500 * MB)), dev(2)]
    d = choose_device("m", 500 * MB, devices, p)
    assert (d.device, d.path, d.evict) == (1, "resident", [])
    assert d.predicted_ms == pytest.approx(2.0)


def test_resident_only_on_a_busy_device_is_copied_over_nvlink_when_faster():
    p = predictor(m=(500 * MB, 2.0))
    devices = [dev(0, rm("m", 500 * MB), busy=True, queue_ms=30.0, peers={1, 2}), dev(1, peers={0, 2}),
               dev(2, peers={0, 1})]
    d = choose_device("m", 500 * MB, devices, p)
    assert d.path == "nvlink" and d.source == 0 and d.device in (1, 2)
    assert d.predicted_ms == pytest.approx(max(500 / 387, 2.0) + 0.08 * 2.0)


def test_resident_on_a_busy_device_waits_when_waiting_is_faster():
    p = predictor(m=(1340 * MB, 8.0))
    devices = [dev(0, rm("m", 1340 * MB), busy=True, queue_ms=0.5, peers={1}), dev(1, peers={0})]
    d = choose_device("m", 1340 * MB, devices, p)
    assert (d.device, d.path) == (0, "queue")
    assert d.predicted_ms == pytest.approx(8.5)
    # without NVLink a copy from the host (24 ms) is slower than a long-ish wait, too
    devices = [dev(0, rm("m", 1340 * MB), busy=True, queue_ms=10.0), dev(1)]
    assert choose_device("m", 1340 * MB, devices, p).path == "queue"
    # ... but not than a very long one
    devices[0].queue_ms = 100.0
    d = choose_device("m", 1340 * MB, devices, p)
    assert (d.device, d.path) == (1, "pcie")


def test_cold_model_lands_on_the_empty_device_and_evicts_nothing():
    p = predictor(new=(300 * MB, 2.0))
    cap = 1000 * MB
    devices = [dev(0, rm("a", 300 * MB), rm("b", 300 * MB), rm("c", 300 * MB), capacity=cap),
               dev(1, rm("d", 300 * MB), capacity=cap), dev(2, capacity=cap)]
    d = choose_device("new", 300 * MB, devices, p)
    assert (d.device, d.path, d.evict) == (2, "pcie", [])
    assert d.predicted_ms == pytest.approx(300 / 55 + 0.16)


def test_copy_avoids_a_link_already_carrying_transfers():
    p = predictor(m=(500 * MB, 2.0))
    devices = [dev(0, link="switch"), dev(1, link="switch"), dev(2, link="own")]
    d = choose_device("m", 500 * MB, devices, p, transfers_in_flight={"switch": 1})
    assert d.device == 2
    # when every link is loaded, the copy pays for the slowdown it inflicts
    d = choose_device("m", 500 * MB, devices[:2], p, transfers_in_flight={"switch": 1})
    assert d.inflicted_ms == pytest.approx(500 / 55)


def test_eviction_cost_steers_the_choice():
    p = predictor(new=(400 * MB, 1.0))
    cap = 1000 * MB
    # both devices must free 300 MB: device 0 only by dropping a heavy model (900 MB to fetch
    # back), device 1 by dropping two light ones (300 MB to fetch back)
    devices = [dev(0, rm("heavy", 900 * MB), capacity=cap),
               dev(1, rm("l1", 150 * MB, 1.0), rm("l2", 150 * MB, 2.0), rm("big", 600 * MB, 0.5), capacity=cap)]
    d = choose_device("new", 400 * MB, devices, p)
    assert (d.device, d.evict) == (1, ["l1", "l2"])
    assert d.eviction_ms == pytest.approx(300 / 55)


def test_all_busy_queues_on_the_device_predicted_soonest():
    p = predictor(m=(200 * MB, 2.0))
    devices = [dev(0, busy=True, queue_ms=9.0), dev(1, busy=True, queue_ms=3.0), dev(2, busy=True, queue_ms=5.0)]
    d = choose_device("m", 200 * MB, devices, p)
    assert (d.device, d.path, d.evict) == (1, "queue", [])
    assert d.predicted_ms == pytest.approx(3.0 + 200 / 55 + 0.16)


def test_unhealthy_devices_are_skipped():
    p = predictor(m=(200 * MB, 2.0))
    devices = [dev(0, rm("m", 200 * MB), healthy=False), dev(1)]
    assert choose_device("m", 200 * MB, devices, p).device == 1
    assert choose_device("m", 200 * MB, [dev(0, healthy=False)], p) is None
    assert choose_device("m", 20 * GB, [dev(0)], p) is None  # larger than any device


def test_native_runs_only_where_the_model_is_pinned():
    p = predictor(m=(200 * MB, 2.0))
    policy = Policy("native")
    assert choose_device("m", 200 * MB, [dev(0), dev(1)], p, policy=policy) is None
    devices = [dev(0), dev(1, rm("m", 200 * MB), busy=True, queue_ms=4.0)]
    d = choose_device("m", 200 * MB, devices, p, policy=policy)
    assert (d.device, d.path) == (1, "queue")


def test_keepalive_starts_containers_only_where_windows_expired():
    p = predictor(new=(500 * MB, 2.0))
    policy = Policy("keepalive", keepalive_ms={"old": 10_000.0, "recent": 10_000.0})
    devices = [dev(0, rm("old", 800 * MB, last_used=0.0), capacity=GB),
               dev(1, rm("recent", 800 * MB, last_used=95.0), capacity=GB)]
    d = choose_device("new", 500 * MB, devices, p, policy=policy, now=100.0)
    assert (d.device, d.path, d.evict) == (0, "cold", ["old"])
    assert d.predicted_ms == pytest.approx(policy.cold_start_ms + 2.0)
    d = choose_device("new", 500 * MB, devices, p, policy=policy, now=5.0)
    assert (d.device, d.path) == (None, "queue")


def test_random_policy_is_reproducible_and_picks_idle_devices():
    p = predictor(m=(100 * MB, 1.0))
    devices = [dev(i, busy=(i == 0)) for i in range(4)]
    picks = [choose_device("m", 100 * MB, devices, p, policy=Policy("random", rng=random.Random(7))).device
             for _ in range(3)]
    again = [choose_device("m", 100 * MB, devices, p, policy=Policy("random", rng=random.Random(7))).device
             for _ in range(3)]
    assert picks == again and 0 not in picks
    many = {choose_device("m", 100 * MB, devices, p, policy=Policy("random", rng=random.Random(s))).device
            for s in range(30)}
    assert many == {1, 2, 3}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        Policy("round-robin")


def test_node_choice_prefers_model_locality_then_load():
    p = predictor(m=(500 * MB, 2.0))
    nodes = {"a": [dev(0)], "b": [dev(0, rm("m", 500 * MB))]}
    node, d = choose_node("m", 500 * MB, nodes, p)
    assert (node, d.path) == ("b", "resident")
    nodes["b"][0].busy, nodes["b"][0].queue_ms = True, 50.0
    assert choose_node("m", 500 * MB, nodes, p)[0] == "a"
    fresh = {"a": [dev(0)], "b": [dev(0)]}
    fresh["a"][0].load = 10.0
    assert choose_node("m", 500 * MB, fresh, p)[0] == "b"


# --- eviction ---------------------------------------------------------------------------

def test_torpor_eviction_keeps_the_only_copy_of_a_heavy_model():
    policy = Policy("torpor")
    heavy = rm("heavy", 1340 * MB, last_used=1.0)  # oldest: plain LRU would drop it first
    light = rm("light", 100 * MB, last_used=2.0)
    dup = rm("dup", 300 * MB, last_used=3.0)
    d0 = dev(0, heavy, light, dup, capacity=2 * GB)
    d1 = dev(1, rm("dup", 300 * MB))
    assert eviction_priority(d0, [d0, d1], policy) == ["dup", "light", "heavy"]
    assert eviction_order(d0, 500 * MB, [d0, d1], policy) == ["dup"]  # 260 MB free + 300 MB
    assert eviction_order(d0, 600 * MB, [d0, d1], policy) == ["dup", "light"]
    assert eviction_order(d0, 100 * MB, [d0, d1], policy) == []
    # once its copy elsewhere is gone, dup (300 MB: heavy too) is an only copy like heavy,
    # and LRU decides between the two
    d1.resident.clear()
    assert eviction_priority(d0, [d0, d1], policy) == ["light", "heavy", "dup"]


def test_a_model_in_use_is_never_evicted():
    for name in ("torpor", "lru"):
        policy = Policy(name)
        d0 = dev(0, rm("busy", 900 * MB, last_used=0.0, in_use=1), rm("idle", 100 * MB, last_used=5.0),
                 capacity=GB)
        assert eviction_priority(d0, [d0], policy) == ["idle"]
        assert eviction_order(d0, 100 * MB, [d0], policy) == ["idle"]
        assert eviction_order(d0, 500 * MB, [d0], policy) is None


def test_lru_baseline_evicts_least_recently_used_first():
    policy = Policy("lru")
    d0 = dev(0, rm("heavy", 1340 * MB, last_used=1.0), rm("light", 100 * MB, last_used=2.0),
             rm("dup", 300 * MB, last_used=3.0), capacity=2 * GB)
    d1 = dev(1, rm("dup", 300 * MB))
    assert eviction_priority(d0, [d0, d1], policy) == ["heavy", "light", "dup"]
    assert eviction_order(d0, 500 * MB, [d0, d1], policy) == ["heavy"]


def test_window_cost_lets_an_arena_pick_a_contiguous_window():
    policy = Policy("torpor")
    arena = Arena(8 * 2 * 1024 * 1024)  # 8 regions of 2 MiB
    r = 2 * 1024 * 1024
    for i, name in enumerate(["heavy", "light", "x", "y"]):
        arena.place(name, i * 2 * r, 2 * r)
    models = {n: rm(n, 2 * r, last_used=t) for n, t in [("heavy", 1.0), ("light", 2.0), ("x", 3.0), ("y", 4.0)]}
    policy.heavy_bytes = 2 * r  # all four are heavy only copies: the priority is LRU
    d0 = dev(0, *models.values(), capacity=8 * r)
    priority = eviction_priority(d0, [d0], policy)
    assert priority == ["heavy", "light", "x", "y"]
    # four contiguous MiB-pairs needed: the window [heavy, light] beats [light, x] and [x, y]
    offset, victims = arena.plan(4 * r, lambda o: o in priority, window_cost(priority))
    assert (offset, victims) == (0, ["heavy", "light"])
    models["light"].in_use = 1
    priority = eviction_priority(d0, [d0], policy)
    offset, victims = arena.plan(4 * r, lambda o: o in priority, window_cost(priority))
    assert victims == ["x", "y"]
    assert window_cost(priority)(["light"]) == float("inf")


# --- SLO ordering -----------------------------------------------------------------------

@dataclass
class Req:
    function: str
    arrival: float


def test_default_slo_depends_on_model_size():
    assert default_slo_ms(240 * MB) == 100.0
    assert default_slo_ms(1340 * MB) == 200.0


def test_slo_debt_counts_violations_beyond_the_allowance_in_a_sliding_window():
    t = SLOTracker(window=100)
    t.register("f", 100.0)
    for i in range(100):
        t.record("f", 150.0 if i < 5 else 10.0)
    assert t.debt("f") == pytest.approx((5 - 2) / 0.02)
    assert t.percentile_ms("f") == 150.0
    for _ in range(5):  # the five violations slide out of the window
        t.record("f", 10.0)
    assert t.debt("f") == pytest.approx(-2 / 0.02)
    assert t.percentile_ms("f") == 10.0


def test_waiting_requests_go_by_deadline_unless_fifo():
    t = SLOTracker()
    t.register("bert", 200.0)  # a heavy model: 200 ms SLO
    t.register("resnet", 100.0)
    waiting = [Req("bert", 0.0), Req("resnet", 50.0), Req("resnet", 120.0)]
    # deadlines 200, 150 and 220 ms
    assert [r.arrival for r in t.order(waiting, now_ms=0.0)] == [50.0, 0.0, 120.0]
    assert [r.arrival for r in t.order(waiting, fifo=True)] == [0.0, 50.0, 120.0]
    assert waiting[0].arrival == 0.0  # input untouched


def test_functions_too_far_behind_fall_to_the_low_class():
    t = SLOTracker(window=100, update_interval_ms=0.0)
    for f, bad in (("hopeless", 60), ("saveable", 4), ("fine", 0), ("behind", 30)):
        t.register(f, 100.0)
        for i in range(100):
            t.record(f, 400.0 if i < bad else 10.0)
    assert t.debt("fine") < 0 < t.debt("saveable") < t.debt("behind") < t.debt("hopeless")
    waiting = [Req("hopeless", 1.0), Req("behind", 2.0), Req("fine", 3.0), Req("saveable", 4.0)]
    # light load: alpha 1, nobody is demoted, deadlines decide
    assert [r.function for r in t.order(waiting, now_ms=0.0)] == ["hopeless", "behind", "fine", "saveable"]
    t.alpha = 0.2  # only a fifth of the total recovery cost is worth spending
    ordered = [r.function for r in t.order(waiting, now_ms=10.0)]
    assert ordered == ["fine", "saveable", "behind", "hopeless"]  # demoted ones last, cheapest first
    assert t.demoted("hopeless") and t.demoted("behind") and not t.demoted("saveable")


def test_alpha_halves_when_attainment_falls_and_recovers_when_it_rises():
    t = SLOTracker(window=10, update_interval_ms=0.0, adapt_every=1)
    for f in ("a", "b"):
        t.register(f, 100.0)
        t.record(f, 10.0)
    t.update(0.0)
    assert t.alpha == pytest.approx(1.0)
    for _ in range(5):
        t.record("a", 500.0)  # a falls behind: attainment 1.0 -> 0.5
    t.update(1.0)
    assert t.alpha == pytest.approx(0.5)
    for _ in range(10):
        t.record("a", 10.0)  # and recovers: 0.5 -> 1.0
    t.update(2.0)
    assert t.alpha == pytest.approx(1.0)


# --- topology ---------------------------------------------------------------------------

def test_topology_groups_gpus_behind_one_switch_and_finds_nvlink_peers():
    ids = ["00000000:18:00.0", "00000000:19:00.0", "00000000:3A:00.0", "00000000:5D:00.0"]
    same_switch = {(0, 1)}
    topo = group_links(ids, lambda i, j: (i, j) in same_switch, lambda i, j: True)
    assert topo.link_of(0) == topo.link_of(1) == "pcie:00000000:18:00.0"
    assert len({topo.link_of(2), topo.link_of(3), topo.link_of(0)}) == 3
    assert topo.peers(2) == {0, 1, 3}
    chain = group_links(ids[:3], lambda i, j: j == i + 1, lambda i, j: False)
    assert len({chain.link_of(i) for i in range(3)}) == 1  # sharing is transitive
    assert chain.peers(0) == set()


def test_discover_reads_nvml_or_falls_back_to_cpu_devices():
    topo = discover(cpu_devices=3)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        # no NVIDIA driver here: every CPU device has its own link and no NVLink
        assert topo.source == "cpu"
        assert [d.link_id for d in topo.devices] == ["cpu:0", "cpu:1", "cpu:2"]
        assert all(not d.nvlink_peers for d in topo.devices)
        assert topo.as_dict()["devices"][1] == {"index": 1, "pci_bus_id": None, "link_id": "cpu:1",
                                                "nvlink_peers": []}
    else:
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        assert topo.source == "nvml" and len(topo.devices) == count
        assert all(d.link_id.startswith("pcie:") and d.index not in d.nvlink_peers for d in topo.devices)
    with pytest.raises(ValueError):
        cpu_topology(0)
