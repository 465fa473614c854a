"""The invoker under faults (issue 6, docs/faults.md), against a private redis-server that the
tests restart and real ``torpor runtime`` processes: orphaned in-flight messages after a Redis
failure (case 10), a message whose activation is already final (case 10), an activation whose
GPU server died retried once on another node or failed as such (case 9), and the node-wide
container cap that keeps hundreds of functions from exhausting the node (case 12)."""
from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

import models
from controller_plugin import state
from faults_helpers import GPUServer, wait_until
from runtime.gpu_server.repository import Repository
from runtime.invoker.config import InvokerSettings
from runtime.invoker.containers import ActionSpec, ContainerPool, runtime_command, runtime_env
from runtime.invoker.invoker import Invoker
from runtime.redis_server import RedisServer

COUNTER = '''
import os, time
def main(args):
    with open(args["file"], "a") as f:
        f.write(os.environ["__OW_ACTIVATION_ID"] + "\\n")
    time.sleep(args.get("sleep", 0))
    return {"ok": True}
'''
CALL = '''
import os
import numpy as np
from runtime.client import Model

def main(args):
    out = Model("resnet")(np.full((1, 3, 32, 32), 0.5, dtype=np.float32))
    return {"socket": os.environ["TORPOR_GPU_SOCKET"], "output": out.ravel().tolist()}
'''


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def invokers(private_redis, tmp_path):
    started = []

    def start(node: str = "node-a", **overrides) -> Invoker:
        settings = InvokerSettings(**{"redis_url": private_redis.url, "node_id": node,
                                      "gpu_socket": str(tmp_path / f"{node}.sock"), **overrides})
        invoker = Invoker(settings).start()
        started.append(invoker)
        return invoker

    yield start
    for invoker in started:
        invoker.stop()


def put_action(r: redis.Redis, name: str, code: str, models_: list[str] = ()) -> None:
    record = {"namespace": "guest", "name": name, "version": "0.0.1", "exec": {"kind": "python:3", "code": code},
              "parameters": [], "annotations": [{"key": "model", "value": list(models_)}] if models_ else [],
              "limits": {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1}, "publish": False,
              "updated": int(time.time() * 1000)}
    r.hset("torpor:actions:guest", name, json.dumps(record))


def message(name: str, params: dict, models_: list[str] = (), attempt: int = 1) -> dict:
    now = int(time.time() * 1000)
    return {"activationId": uuid.uuid4().hex, "namespace": "guest", "action": name, "version": "0.0.1",
            "params": params, "models": list(models_), "gpu": None, "timeout_ms": None, "deadline": now + 60000,
            "submitted": now, "attempt": attempt, "subject": "guest", "blocking": True}


def record_of(r: redis.Redis, activation_id: str, timeout_s: float = 30) -> dict | None:
    done = wait_until(lambda: r.exists(f"torpor:activation:{activation_id}:done"), timeout_s)
    return json.loads(r.get(f"torpor:activation:{activation_id}")) if done else None


def runs(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_orphans_of_a_redis_restart_run_once_and_running_work_is_left_alone(private_redis, invokers, tmp_path):
    r = redis.Redis.from_url(private_redis.url)
    ran = tmp_path / "ran.txt"
    invokers()
    put_action(r, "counter", COUNTER)
    running = message("counter", {"file": str(ran), "sleep": 3})
    r.lpush(state.queue_key("node-a"), json.dumps(running))
    assert wait_until(lambda: running["activationId"] in runs(ran), 20)
    # a message moved to in flight whose mover never heard back (its answer lost with Redis)
    orphan = message("counter", {"file": str(ran)})
    r.lpush(state.inflight_key("node-a"), json.dumps(orphan))
    port = private_redis.port
    private_redis.stop()
    time.sleep(0.3)
    restarted = RedisServer(private_redis.data_dir, port=port).start()
    private_redis.proc = restarted.proc  # the fixture stops whichever runs
    r = redis.Redis.from_url(private_redis.url)
    # found after the consumer's failed read, well before the periodic scan
    assert record_of(r, orphan["activationId"], timeout_s=6)["response"]["success"]
    assert record_of(r, running["activationId"])["response"]["success"]
    assert sorted(runs(ran)) == sorted([running["activationId"], orphan["activationId"]])
    # the message leaves in flight just after its record is stored (the caller is woken first)
    assert wait_until(lambda: r.llen(state.inflight_key("node-a")) == 0 and r.llen(state.queue_key("node-a")) == 0, 5)


def test_a_message_whose_activation_is_final_is_dropped_not_run_again(private_redis, invokers, tmp_path):
    r = redis.Redis.from_url(private_redis.url)
    ran = tmp_path / "ran.txt"
    put_action(r, "counter", COUNTER)
    finished = message("counter", {"file": str(ran)})
    action = json.loads(r.hget("torpor:actions:guest", "counter"))
    pending = state.pending_record(finished["activationId"], action, "guest", finished["submitted"])
    state.put_pending(r, pending)
    final = state.final_record(pending, state.SUCCESS, {"first": "run"}, start_ms=pending["start"],
                               end_ms=pending["start"] + 5)
    state.finish_activation(r, final)  # stored, but its message went back (say, a crash before LREM)
    later = message("counter", {"file": str(ran)})
    for msg in (finished, later):
        r.lpush(state.queue_key("node-a"), json.dumps(msg))
    invokers()
    assert record_of(r, later["activationId"])["response"]["success"]
    assert wait_until(lambda: r.llen(state.inflight_key("node-a")) == 0, 5)
    assert runs(ran) == [later["activationId"]]
    assert json.loads(r.get(f"torpor:activation:{finished['activationId']}"))["response"]["result"] == {"first": "run"}


@pytest.fixture
def two_gpu_servers(private_redis):
    root = Path("/tmp") / f"torpor-two-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    repo = Repository(root / "models")
    native = models.register(repo, "resnet", "resnet")
    servers = {}
    for node in ("node-a", "node-b"):
        (root / node).mkdir()
        servers[node] = GPUServer(root / node, repo, devices=1,
                                  extra=("--redis-url", private_redis.url, "--node-id", node, "--insecure-no-auth"))
    for server in servers.values():
        server.start()
    yield servers, native
    for server in servers.values():
        server.stop()


def test_an_activation_whose_gpu_server_died_runs_once_more_on_another_node(private_redis, invokers,
                                                                            two_gpu_servers):
    servers, native = two_gpu_servers
    r = redis.Redis.from_url(private_redis.url, decode_responses=True)
    put_action(r, "call", CALL, ["resnet"])
    a = invokers("node-a", gpu_socket=servers["node-a"].socket)
    invokers("node-b", gpu_socket=servers["node-b"].socket)
    assert wait_until(lambda: r.hget("torpor:node:node-a", "gpu_server") == "up"
                      and r.hget("torpor:node:node-b", "gpu_server") == "up", 10)
    servers["node-a"].kill()
    # taken by node a before its heartbeat noticed: the failed model call is what tells it
    moved = message("call", {}, ["resnet"])
    r.lpush(state.queue_key("node-a"), json.dumps(moved))
    record = record_of(r, moved["activationId"])
    assert record["response"]["success"], record
    assert record["response"]["result"]["socket"] == servers["node-b"].socket
    with models.torch_threads(1):  # as the server runs it: bitwise-equal outputs
        want = models.native(native, [np.full((1, 3, 32, 32), 0.5, dtype=np.float32)])[0]
    assert record["response"]["result"]["output"] == want.ravel().tolist()
    assert r.hget("torpor:node:node-a", "gpu_server") == "down" and not r.exists("torpor:node:node-a:alive")
    # a second loss of the same activation is final, and says why
    retried = message("call", {}, ["resnet"], attempt=2)
    r.lpush(state.queue_key("node-a"), json.dumps(retried))
    record = record_of(r, retried["activationId"])
    assert record["response"]["statusCode"] == state.WHISK_ERROR
    assert "GPU server of node node-a became unavailable (503)" in record["response"]["result"]["error"]
    assert "model call failed: 503 unavailable" in record["response"]["result"]["error"]
    assert not a._gpu_reachable()


def test_a_stalled_gpu_server_is_not_taken_for_dead_but_a_hung_one_is(private_redis, invokers, two_gpu_servers,
                                                                       monkeypatch):
    """A GPU server whose liveness key lapses while its socket still accepts is stalled, not
    gone: the node keeps taking work for GPU_STALL_GRACE_S, then counts it as hung; a killed
    one is down as soon as its key lapses."""
    from runtime.invoker import invoker as invoker_module

    servers, _ = two_gpu_servers
    r = redis.Redis.from_url(private_redis.url, decode_responses=True)
    monkeypatch.setattr(invoker_module, "GPU_STALL_GRACE_S", 4.0)
    node_a = invokers("node-a", gpu_socket=servers["node-a"].socket)
    invokers("node-b", gpu_socket=servers["node-b"].socket)
    assert wait_until(lambda: r.hget("torpor:node:node-a", "gpu_server") == "up"
                      and r.hget("torpor:node:node-b", "gpu_server") == "up", 10)
    stalled = servers["node-a"].proc
    stalled.send_signal(signal.SIGSTOP)  # a GIL stall, taken to the extreme: no thread runs
    try:
        assert wait_until(lambda: not r.exists("torpor:node:node-a:gpu"), 5)
        lapsed = time.monotonic()
        # an activation that failed meanwhile finds the server silent but accepting: busy, so
        # the activation is not run again elsewhere and the node is not marked down
        assert node_a._gpu_lost(node_a._gpu_outages) is False
        # the key stays lapsed, yet the node keeps its alive key while the grace lasts
        while time.monotonic() - lapsed < 2.0:
            assert r.hget("torpor:node:node-a", "gpu_server") == "up" and r.exists("torpor:node:node-a:alive")
            time.sleep(0.2)
        assert wait_until(lambda: r.hget("torpor:node:node-a", "gpu_server") == "down", 6)
        assert time.monotonic() - lapsed >= 3.5
        assert not r.exists("torpor:node:node-a:alive")
    finally:
        stalled.send_signal(signal.SIGCONT)
    assert wait_until(lambda: r.hget("torpor:node:node-a", "gpu_server") == "up", 10)
    servers["node-b"].kill()
    killed = time.monotonic()
    assert wait_until(lambda: r.hget("torpor:node:node-b", "gpu_server") == "down", 5)
    assert time.monotonic() - killed < 3.0


def spec(name: str) -> ActionSpec:
    return ActionSpec(namespace="guest", name=name, version="0.0.1", digest=name,
                      init={"name": name, "main": "main", "code": "def main(args):\n    return args\n",
                            "binary": False, "env": {}}, timeout_ms=30000)


def test_the_node_wide_container_cap_replaces_the_least_recently_used_idle_container():
    pool = ContainerPool(runtime_command(), runtime_env("", "http://127.0.0.1:1"), max_total=2)
    try:
        first, _ = pool.acquire(spec("one"))
        pool.release(first)
        second, _ = pool.acquire(spec("two"))
        pool.release(second)
        third, _ = pool.acquire(spec("three"))  # over the cap: "one", the idle one used longest ago, goes
        assert first.proc.poll() is not None and second.alive()
        assert pool.size() == 2 and pool.size("guest", "one") == 0
        # with every container busy, a new action waits for one to come free
        again, _ = pool.acquire(spec("two"))
        assert again is second
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(spec("four"))))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and pool.size() == 2
        pool.release(third)
        waiter.join(30)
        assert got and got[0][0].alive() and third.proc.poll() is not None
        pool.release(again)
        pool.release(got[0][0])
    finally:
        pool.close()


def test_an_invoker_redispatches_with_the_controllers_profiles_and_slot_limit(private_redis, invokers, tmp_path):
    profiles = tmp_path / "h200-swap.json"
    profiles.write_text(json.dumps({"models": {"m": {"bytes": 5_000_000, "served_warm_ms": 3.5}}}))
    invoker = invokers("node-a", profiles=str(profiles), gpu_kind="NVIDIA H200", device_slots=3)
    picker = invoker._picker
    assert picker.default_slots == 3 and picker.kind == "NVIDIA H200"
    assert picker.model_inputs("m") == (5_000_000, 3.5)


@pytest.mark.parametrize("env, fragment", [
    ({"TORPOR_CONTROLLER_PROFILES": "/no/such/profiles.json"}, "TORPOR_CONTROLLER_PROFILES"),
    ({"TORPOR_DEVICE_SLOTS": "-1"}, "must be >= 0"),
])
def test_the_invoker_refuses_bad_picker_settings_at_start(private_redis, env, fragment):
    from click.testing import CliRunner
    from runtime.invoker.invoker import command
    result = CliRunner().invoke(command, ["--redis-url", private_redis.url], env=env)
    assert result.exit_code == 2 and fragment in result.output


def test_an_older_revision_runs_in_a_container_of_its_own_and_the_newer_ones_stay():
    import dataclasses
    pool = ContainerPool(runtime_command(), runtime_env("", "http://127.0.0.1:1"), max_per_action=2)
    try:
        new = dataclasses.replace(spec("rev"), digest="new", updated=2000)
        old = dataclasses.replace(spec("rev"), digest="old", updated=1000)
        warm, _ = pool.acquire(new)
        pool.release(warm)
        late, init_ms = pool.acquire(old)  # accepted before the update, run after it
        assert init_ms is not None and late is not warm
        pool.release(late)
        assert late.proc.poll() is not None or wait_until(lambda: late.proc.poll() is not None, 10)  # stopped
        assert warm.alive() and pool.size("guest", "rev") == 1
        again, init_ms = pool.acquire(new)
        assert again is warm and init_ms is None  # the newer revision's container was kept
        pool.release(again)
    finally:
        pool.close()
