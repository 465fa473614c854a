"""The controller's node and device choice (``controller_plugin/pick_node.lua`` through
``routing.NodePicker``) against a real redis-server: its predictions agree with
``controller_plugin.predictor``, it books device slots atomically under concurrent
controllers, and bookings are released by the invoker, by the dead-node pass, or expire."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis

from controller_plugin import state
from controller_plugin.predictor import Predictor
from controller_plugin.routing import MODELS_KEY, AlreadyMoved, NodePicker, requeue_from_dead_nodes
from runtime.gpu_server.placement import DeviceState, ResidentModel
from runtime.invoker.config import InvokerSettings
from runtime.invoker.invoker import Invoker

GB = 1_000_000_000
# name -> (bytes, exec ms): a copy of "big" takes 24 ms at 55 GB/s, longer than its run;
# a copy of "small" 0.4 ms, shorter than its run (the pipelined swap hides it)
MODELS = {"big": (1_336_000_000, 8.0), "small": (21_400_000, 0.72), "mid": (241_000_000, 2.6)}


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def predictor() -> Predictor:
    p = Predictor()
    for name, (nbytes, exec_ms) in MODELS.items():
        p.set_profile(name, nbytes, exec_ms)
    return p


def add_node(r: redis.Redis, node_id: str, devices: list[list[str]], *, alive_ms: int = 60000, queue: int = 0,
             **fields) -> None:
    """Registers a live node whose GPU server published ``devices`` (resident model names each)."""
    r.sadd(state.NODES_KEY, node_id)
    r.hset(state.node_key(node_id), "last_seen", int(time.time() * 1000))
    r.set(state.alive_key(node_id), 1, px=alive_ms)
    for k, resident in enumerate(devices):
        r.hset(state.device_key(node_id, k), mapping={
            "resident": json.dumps(sorted(resident)), "healthy": 1, "queue": queue, "kind": "cuda",
            "name": "NVIDIA H200", **fields})


def message(models: list[str], **extra) -> dict:
    now = int(time.time() * 1000)
    return {"activationId": uuid.uuid4().hex, "namespace": "guest", "action": "a", "version": "0.0.1",
            "params": {}, "models": models, "gpu": None, "timeout_ms": 60000, "deadline": now + 60000,
            "submitted": now, "attempt": 1, "subject": "guest", "blocking": True, **extra}


def bookings(r: redis.Redis, node_id: str) -> list[str]:
    return r.zrange(f"{state.node_key(node_id)}:booked", 0, -1)


def queued(r: redis.Redis, node_id: str) -> list[dict]:
    return [json.loads(m) for m in r.lrange(state.queue_key(node_id), 0, -1)]


def device_counters(r: redis.Redis, node_id: str, k: int) -> tuple[int, float, int]:
    booked, booked_ms, copies = r.hmget(state.device_key(node_id, k), "booked", "booked_ms", "copies")
    return int(booked or 0), float(booked_ms or 0), int(copies or 0)


# --- the prediction ------------------------------------------------------------------------

def expected_ms(predictor: Predictor, models: list[str], resident: list[str], queue_ms: float, in_flight: int) -> float:
    device = DeviceState(0, "pcie:0", 100 * GB, {m: ResidentModel(m, MODELS[m][0]) for m in resident},
                         queue_ms=queue_ms)
    return queue_ms + sum(predictor.predict(m, device, in_flight=in_flight).total_ms - queue_ms for m in models)


@pytest.mark.parametrize("models, resident", [
    (["big"], ["big"]),            # resident: exec only
    (["big"], []),                 # host copy longer than the run: transfer + tail
    (["small"], ["mid"]),          # host copy hidden by the run: exec + tail
    (["big", "small"], ["small"]),  # one resident, one copied: their sum
])
def test_prediction_matches_the_predictor_on_an_idle_device(r, predictor, models, resident):
    add_node(r, "n", [resident])
    pick = NodePicker(r, predictor).pick(message(models))
    assert (pick.node, pick.device, pick.resident) == ("n", 0, len(set(models) & set(resident)))
    assert pick.predicted_ms == pytest.approx(expected_ms(predictor, models, resident, 0.0, 0), abs=1e-5)


def test_prediction_counts_the_work_booked_and_queued_ahead(r, predictor):
    picker = NodePicker(r, predictor)
    add_node(r, "n", [["mid"]])
    # a busy GPU: the wait is the service booked there; each copy booked there shares the link
    for models, copies_after in ((["big"], 1), (["small"], 2), (["mid", "big"], 3), (["mid"], 3)):
        _, booked_ms, copies = device_counters(r, "n", 0)
        pick = picker.pick(message(models))
        assert pick.predicted_ms == pytest.approx(expected_ms(predictor, models, ["mid"], booked_ms, copies), abs=1e-5)
        assert device_counters(r, "n", 0)[2] == copies_after
    assert device_counters(r, "n", 0)[0] == 4

    # the GPU server's published queue counts when it says more than the bookings do
    r.hset(state.device_key("n", 0), "queue", 100)
    pick = picker.pick(message(["mid"]))
    assert pick.predicted_ms == pytest.approx(100 * predictor.default_exec_ms + 2.6, abs=1e-5)


def test_locality_wins_unless_the_holder_is_busier_than_a_copy(r, predictor):
    picker = NodePicker(r, predictor)
    add_node(r, "a", [[], []])
    add_node(r, "b", [["small"], ["big"]])
    # big resident on b/1: 8 ms against a 24 ms copy anywhere else
    assert (p := picker.pick(message(["big"]))) and (p.node, p.device, p.resident) == ("b", 1, 1)
    assert (p := picker.pick(message(["big"]))) and (p.node, p.device) == ("b", 1)   # 8 + 8
    assert (p := picker.pick(message(["big"]))) and (p.node, p.device) == ("b", 1)   # 16 + 8
    # b/1 now has 24 ms booked: 32 ms there against a 24.3 + 0.64 ms copy onto idle a/0
    p = picker.pick(message(["big"]))
    assert (p.node, p.device, p.resident) == ("a", 0, 0)
    assert p.predicted_ms == pytest.approx(expected_ms(predictor, ["big"], [], 0.0, 0), abs=1e-5)


def test_ties_go_to_locality_then_load_then_node_id_then_device(r):
    # models of unknown size: a copy costs nothing, so every device predicts the same...
    predictor = Predictor()
    predictor.set_profile("free", 0, 0.0)
    picker = NodePicker(r, predictor, default_model_bytes=0)
    add_node(r, "b", [[], ["m"]])
    add_node(r, "a", [[], []])
    # ...and the device holding m wins by locality
    assert (p := picker.pick(message(["m"]))) and (p.node, p.device, p.resident) == ("b", 1, 1)
    # a model costing 0 ms books without adding a wait: the least loaded device wins, then
    # the smallest node id, then the smallest device index
    order = [(p.node, p.device) for p in (picker.pick(message(["free"])) for _ in range(4))]
    assert order == [("a", 0), ("a", 1), ("b", 0), ("a", 0)]


def test_locality_matches_whole_names_only(r, predictor):
    picker = NodePicker(r, predictor)
    # in JSON, 'x"big' reads "x\"big": "big" in quotes, after a backslash
    add_node(r, "a", [['x"big', "xbig", "big2"]])
    add_node(r, "b", [["big"]])
    assert picker.pick(message(["big"])).node == "b"  # a false match would tie and go to a
    pick = picker.pick(message(['x"big']))
    assert (pick.node, pick.resident) == ("a", 1)


def test_the_queued_message_carries_the_proposed_device_and_its_booking(r, predictor):
    picker = NodePicker(r, predictor)
    add_node(r, "n", [[], ["small"]])
    msg = message(["small"], params={"x": 0.1, "text": "héllo \"q\"", "big": 2 ** 53 + 1, "empty": {}, "list": []})
    msg["booking"] = "stale booking from another node"
    pick = picker.pick(msg)
    (got,) = queued(r, "n")
    assert got == {**msg, "gpu": 1, "booking": pick.booking}
    assert pick.booking in bookings(r, "n")
    # an activation naming no model needs no device: no proposal, no booking, message as it was
    assert picker.pick({"activationId": "plain", "models": []}).device is None
    assert queued(r, "n")[0] == {"activationId": "plain", "models": []}
    assert len(bookings(r, "n")) == 1


def test_nodes_without_published_devices_still_get_work(r, predictor):
    picker = NodePicker(r, predictor)
    add_node(r, "bare", [])
    pick = picker.pick(message(["small"]))
    assert (pick.node, pick.device, pick.booking) == ("bare", None, None)
    assert queued(r, "bare")[0]["gpu"] is None and "booking" not in queued(r, "bare")[0]
    # its queue counts default_exec_ms per message: a device node with less waiting wins
    add_node(r, "gpu", [[]], queue=0)
    assert picker.pick(message(["small"])).node == "gpu"


def test_dead_nodes_and_unhealthy_devices_get_no_work(r, predictor):
    picker = NodePicker(r, predictor)
    add_node(r, "short", [["big"]], alive_ms=800)
    add_node(r, "sick", [["big"]], healthy=0)
    assert picker.pick(message(["big"])).node == "short"
    while r.exists(state.alive_key("short")):  # its heartbeat stops: the key expires
        time.sleep(0.02)
    assert picker.pick(message(["big"])) is None
    assert r.llen(state.queue_key("short")) == 1 and r.llen(state.queue_key("sick")) == 0
    assert bookings(r, "sick") == [] and len(bookings(r, "short")) == 1
    add_node(r, "fine", [[]])
    assert picker.pick(message(["big"])).node == "fine"


# --- slots and bookings ----------------------------------------------------------------------

def test_concurrent_controllers_book_no_slot_twice(redis_url, r, predictor):
    for node_id in ("n1", "n2", "n3"):
        add_node(r, node_id, [["big"], ["small"]])
    r.hset(state.device_key("n3", 1), "slots", 1)  # its own capacity overrides the default of 2
    capacity = {(n, k): 2 for n in ("n1", "n2", "n3") for k in (0, 1)} | {("n3", 1): 1}
    picks, lock = [], threading.Lock()
    start = threading.Barrier(8)

    def controller(worker: int) -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        picker = NodePicker(client, predictor, default_slots=2)
        start.wait()
        for i in range(6):
            pick = picker.pick(message(["big" if (worker + i) % 2 else "small"]))
            with lock:
                picks.append(pick)
        client.close()

    threads = [threading.Thread(target=controller, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    taken = [p for p in picks if p is not None]
    assert len(picks) == 48 and len(taken) == sum(capacity.values()) == 11
    members = [m for n in ("n1", "n2", "n3") for m in bookings(r, n)]
    assert sorted(members) == sorted(p.booking for p in taken) and len(set(members)) == 11
    for (node_id, k), slots in capacity.items():
        mine = [m for m in bookings(r, node_id) if m.startswith(f"{k}|")]
        booked, booked_ms, _ = device_counters(r, node_id, k)
        assert booked == len(mine) == slots
        assert booked_ms == pytest.approx(sum(float(m.split("|")[2]) for m in mine), abs=1e-6)
        assert sorted(m["booking"] for m in queued(r, node_id) if m["gpu"] == k) == sorted(mine)


def test_concurrent_bookings_without_a_limit_are_counted_once_each(redis_url, r, predictor):
    add_node(r, "n1", [["big"], []])
    add_node(r, "n2", [["small"], []])
    done = []

    def controller() -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        picker = NodePicker(client, predictor)
        done.extend(picker.pick(message(["big", "small"][i % 2])) for i in range(25))
        client.close()

    threads = [threading.Thread(target=controller) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 150 and None not in done
    total = 0
    for node_id in ("n1", "n2"):
        for k in (0, 1):
            booked, booked_ms, copies = device_counters(r, node_id, k)
            mine = [m.split("|") for m in bookings(r, node_id) if m.startswith(f"{k}|")]
            assert booked == len(mine) and copies == sum(int(m[3]) for m in mine)
            assert booked_ms == pytest.approx(sum(float(m[2]) for m in mine), abs=1e-6)
            total += booked
    assert total == 150 == r.llen(state.queue_key("n1")) + r.llen(state.queue_key("n2"))


def test_a_release_frees_the_slot_once(r, predictor):
    picker = NodePicker(r, predictor, default_slots=1)
    add_node(r, "n", [["big"]])
    first = message(["big"])
    assert picker.pick(first).device == 0
    assert picker.pick(message(["big"])) is None  # the only slot is taken
    raw = r.lindex(state.queue_key("n"), 0)
    assert picker.release("n", raw) is True
    assert device_counters(r, "n", 0) == (0, 0.0, 0) and bookings(r, "n") == []
    assert picker.release("n", raw) is False  # a second release changes nothing
    assert picker.release("n", {"activationId": "x"}) is False and picker.release("n", b"not json") is False
    assert picker.release("n", {"booking": "0|forged:1|999.000|0"}) is False
    assert device_counters(r, "n", 0) == (0, 0.0, 0)
    assert picker.pick(message(["big"])).device == 0


def test_stale_bookings_expire(r, predictor):
    picker = NodePicker(r, predictor, default_slots=1)
    add_node(r, "n", [["big"]])
    now = int(time.time() * 1000)
    picker.pick(message(["big"], deadline=now + 1000, timeout_ms=500), now=now)
    assert r.zscore(f"{state.node_key('n')}:booked", bookings(r, "n")[0]) == now + 1500
    assert picker.pick(message(["big"]), now=now + 1499) is None
    later = picker.pick(message(["big"]), now=now + 1500)  # the first booking lapsed
    assert bookings(r, "n") == [later.booking] and device_counters(r, "n", 0)[0] == 1


def test_the_dead_node_pass_releases_bookings(r, predictor):
    picker = NodePicker(r, predictor)
    now = int(time.time() * 1000)
    add_node(r, "old", [["big"]])
    msg = message(["big"])
    state.put_pending(r, state.pending_record(msg["activationId"], {
        "namespace": "guest", "name": "a", "version": "0.0.1", "exec": {"kind": "python:3"},
        "limits": {"timeout": 60000}}, "guest", now))
    assert picker.dispatch(msg) == "old"
    r.delete(state.alive_key("old"))
    r.hset(state.node_key("old"), "last_seen", now - 60000)
    add_node(r, "new", [[]])
    assert requeue_from_dead_nodes(r, picker, now_ms=now, dead_after_ms=10000, max_attempts=3) == 1
    assert bookings(r, "old") == [] and device_counters(r, "old", 0) == (0, 0.0, 0)
    (moved,) = queued(r, "new")
    assert moved["attempt"] == 2 and moved["booking"] == bookings(r, "new")[0]
    assert moved["booking"].startswith(f"0|{msg['activationId']}:2|")


def test_the_invoker_releases_the_booking_when_the_activation_ends(redis_url, r, predictor):
    code = "def main(args):\n    return {'ok': True}\n"
    r.hset("torpor:actions:guest", "a", json.dumps({
        "namespace": "guest", "name": "a", "version": "0.0.1", "exec": {"kind": "python:3", "code": code},
        "parameters": [], "annotations": [], "limits": {"timeout": 60000, "memory": 256, "logs": 10,
                                                        "concurrency": 1}, "publish": False}))
    add_node(r, "inv", [["big"]])
    invoker = Invoker(InvokerSettings(redis_url=redis_url, node_id="inv", gpu_socket="")).start()
    try:
        msg = message(["big"])
        assert NodePicker(r, predictor).dispatch(msg) == "inv"
        assert r.blpop(state.done_key(msg["activationId"]), 30)
        deadline = time.monotonic() + 5
        while bookings(r, "inv") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bookings(r, "inv") == [] and device_counters(r, "inv", 0) == (0, 0.0, 0)
        assert state.get_activation(r, msg["activationId"])["response"]["result"] == {"ok": True}
    finally:
        invoker.stop()


# --- the script's inputs -----------------------------------------------------------------------

def test_model_sizes_come_from_profiles_then_the_registry_then_the_default(r):
    predictor = Predictor(default_exec_ms=7.0)
    predictor.set_profile("profiled", 5_000, 1.5)
    predictor.set_profile("observed-only", 0, 2.5)
    r.hset(MODELS_KEY, mapping={"observed-only": json.dumps({"name": "observed-only", "bytes": 9_000}),
                                "registered": json.dumps({"name": "registered", "bytes": 8_000}),
                                "broken": "not json"})
    picker = NodePicker(r, predictor, default_model_bytes=1_234)
    assert picker.model_inputs("profiled") == (5_000, 1.5)
    assert picker.model_inputs("observed-only") == (9_000, 2.5)
    assert picker.model_inputs("registered") == (8_000, 7.0)
    assert picker.model_inputs("broken") == (1_234, 7.0)
    assert picker.model_inputs("unknown") == (1_234, 7.0)


def test_the_registry_size_cache_is_bounded(r, monkeypatch):
    from controller_plugin import routing
    monkeypatch.setattr(routing, "REGISTRY_CACHE", 3)
    picker = NodePicker(r, Predictor(), default_model_bytes=1)
    r.hset(MODELS_KEY, "kept", json.dumps({"name": "kept", "bytes": 77}))
    assert picker.model_inputs("kept")[0] == 77
    for i in range(10):
        picker.model_inputs(f"unknown{i}")
    assert len(picker._registered) == 3 and "kept" not in picker._registered
    assert picker.model_inputs("kept")[0] == 77  # looked up again


def test_a_redispatch_moves_the_message_off_its_list_in_the_same_step(r, predictor):
    picker = NodePicker(r, predictor)
    inflight = state.inflight_key("old")
    raw = json.dumps(message(["m"]))
    r.lpush(inflight, raw)
    assert picker.dispatch(json.loads(raw), moved_from=(inflight, raw)) is None  # no live node: it stays
    assert r.lrange(inflight, 0, -1) == [raw]
    add_node(r, "new", [["m"]])
    assert picker.dispatch(json.loads(raw), moved_from=(inflight, raw)) == "new"
    assert r.llen(inflight) == 0 and r.llen(state.queue_key("new")) == 1
    moved = json.loads(r.lindex(state.queue_key("new"), 0))
    assert moved["gpu"] == 0 and moved["models"] == ["m"]  # models still scored after the extra argument


def test_a_message_already_moved_is_not_queued_again(r, predictor):
    picker = NodePicker(r, predictor)
    add_node(r, "new", [["m"]])
    raw = json.dumps(message(["m"]))
    with pytest.raises(AlreadyMoved):
        picker.dispatch(json.loads(raw), moved_from=(state.inflight_key("gone"), raw))
    assert r.llen(state.queue_key("new")) == 0 and bookings(r, "new") == []


def test_concurrent_dead_node_passes_move_each_message_once(r, predictor):
    add_node(r, "live", [["m"]])
    r.sadd(state.NODES_KEY, "dead")
    r.hset(state.node_key("dead"), "last_seen", 0)
    action = {"namespace": "guest", "name": "a", "version": "0.0.1", "annotations": [], "exec": {"kind": "python:3"},
              "limits": {"timeout": 60000}}
    ids = []
    for _ in range(40):
        msg = message(["m"])
        ids.append(msg["activationId"])
        state.put_pending(r, state.pending_record(msg["activationId"], action, "guest", msg["submitted"]))
        r.lpush(state.inflight_key("dead"), json.dumps(msg))
    pickers = [NodePicker(r, predictor) for _ in range(4)]
    moved = []
    threads = [threading.Thread(target=lambda p=p: moved.append(requeue_from_dead_nodes(
        r, p, now_ms=int(time.time() * 1000), dead_after_ms=1000, max_attempts=3))) for p in pickers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queued = [json.loads(m)["activationId"] for m in r.lrange(state.queue_key("live"), 0, -1)]
    assert sum(moved) == 40 and sorted(queued) == sorted(ids)
    assert r.llen(state.inflight_key("dead")) == 0


def test_a_malformed_or_already_moved_orphan_does_not_stall_the_dead_node_pass(r, predictor):
    add_node(r, "live", [["m"]])
    r.sadd(state.NODES_KEY, "dead")
    r.hset(state.node_key("dead"), "last_seen", 0)
    good = message(["m"])
    action = {"namespace": "guest", "name": "a", "version": "0.0.1", "annotations": [], "exec": {"kind": "python:3"},
              "limits": {"timeout": 60000}}
    state.put_pending(r, state.pending_record(good["activationId"], action, "guest", good["submitted"]))
    r.lpush(state.inflight_key("dead"), json.dumps(good))
    r.rpush(state.inflight_key("dead"), json.dumps(message(["m"], deadline="soon")))  # the oldest: taken first
    picker = NodePicker(r, predictor)
    assert requeue_from_dead_nodes(r, picker, now_ms=int(time.time() * 1000), dead_after_ms=1000, max_attempts=3) == 1
    assert r.llen(state.inflight_key("dead")) == 0
    assert json.loads(r.lindex(state.queue_key("live"), 0))["activationId"] == good["activationId"]
    with pytest.raises(AlreadyMoved):
        picker.dispatch(good, moved_from=(state.inflight_key("dead"), json.dumps(good)))
