"""The GPU server on CPU devices: executors and node in-process (swap-in, eviction, models in
use, prefetch, concurrent cold starts, device choice, re-registration), the model repository's
validation, and the real server process over its Unix socket with runtime.client. Every
served output is compared bitwise with native execution of the same weights."""
from __future__ import annotations

import array
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest
import torch

import models
from gpu_process import stop_process
from runtime.client import DEFAULT_SHM_BYTES, GPUServerClient, Model, ModelError
from runtime.gpu_server import protocol
from runtime.gpu_server.arena import ALIGNMENT as REGION
from runtime.gpu_server.device import discover
from runtime.gpu_server.executor import NoRoom
from runtime.gpu_server.node import Node
from runtime.gpu_server.repository import ModelLoadError, Repository
from runtime.gpu_server.store import ModelStore

GROUP_BYTES = 1024  # several copy groups even for a tiny model


def make_node(repo: Repository, devices: int, regions: int) -> Node:
    """A node of ``devices`` CPU devices whose arenas hold ``regions`` tiny models each."""
    return Node(ModelStore(repo, pin=False), discover(cpu_devices=devices, device_memory=regions * REGION, arena_bytes=0),
                GROUP_BYTES)


def served(node: Node, name: str, kind: str, module, seed: int = 0, hint: int | None = None,
           timeout_s: float = 5.0) -> dict:
    """Runs ``name`` on the node, checks the outputs against ``module`` run natively, returns
    the call's device and whether it swapped the model in."""
    arrays = models.inputs(kind, seed)
    outputs, info = node.infer(name, [torch.from_numpy(a) for a in arrays], hint, timeout_s)
    models.assert_same([o.numpy() for o in outputs], models.native(module, arrays))
    assert info["path"] == ("pcie" if info["swap_in"] else "resident")
    return {"device": info["device"], "swap_in": info["swap_in"]}


def swap_ins(node: Node) -> int:
    return sum(e.stats.swap_ins for e in node.executors)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- executor and node


@pytest.mark.parametrize("kind", models.SMALL)
def test_swap_in_then_warm_run(repo, kind):
    module = models.register(repo, "m", kind, seed=3)
    node = make_node(repo, devices=1, regions=2)
    ex = node.executors[0]
    assert served(node, "m", kind, module, seed=1) == {"device": 0, "swap_in": True}
    assert ex.stats.swap_in_bytes == node.store.get("m").nbytes
    assert served(node, "m", kind, module, seed=2) == {"device": 0, "swap_in": False}
    assert (ex.stats.swap_ins, ex.stats.runs, ex.stats.evictions) == (1, 2, 0)
    snap = ex.snapshot()
    assert snap["used_bytes"] == REGION and snap["resident"]["m"]["in_use"] == 0


def test_eviction_under_a_budget_smaller_than_the_models(repo):
    kinds = {"a": "resnet", "b": "gpt2", "c": "vit"}
    natives = {n: models.register(repo, n, k) for n, k in kinds.items()}
    node = make_node(repo, devices=1, regions=2)
    ex = node.executors[0]
    for round_ in range(2):
        for name, kind in kinds.items():
            assert served(node, name, kind, natives[name], seed=round_)["swap_in"]
            assert len(ex.resident) <= 2 and ex.arena.used <= ex.arena.capacity
            assert ex.is_resident(name)
    # LRU: each call evicts the model used longest ago, which is the next one needed
    assert (ex.stats.swap_ins, ex.stats.evictions) == (6, 4)
    assert sorted(ex.resident) == ["b", "c"]


def test_a_model_in_use_is_never_evicted(repo):
    natives = {"a": models.register(repo, "a", "resnet"), "b": models.register(repo, "b", "vit")}
    node = make_node(repo, devices=1, regions=1)
    ex = node.executors[0]
    held, swapped = ex.acquire(node.store.get("a"), timeout_s=1.0)
    assert swapped and held.in_use == 1

    started = time.monotonic()
    with pytest.raises(NoRoom, match="in use"):
        served(node, "b", "vit", natives["b"], timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert ex.is_resident("a") and not ex.is_resident("b")

    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(served(node, "b", "vit", natives["b"], timeout_s=10.0)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and ex.is_resident("a")  # still waiting for the room
    arrays = models.inputs("resnet")
    models.assert_same([o.numpy() for o in ex.run(held, [torch.from_numpy(x) for x in arrays])[0]],
                       models.native(natives["a"], arrays))
    ex.release(held)
    waiter.join(5.0)
    assert not waiter.is_alive() and result == {"device": 0, "swap_in": True}
    assert sorted(ex.resident) == ["b"] and ex.stats.evictions == 1


def test_waiters_for_room_plan_only_when_idle_models_could_make_it(repo, monkeypatch):
    """Every release wakes every waiter; only those for whom the idle models' bytes could
    make room run the (locked) placement, so a herd of waiters costs one plan per swap-in."""
    names = [f"w{i}" for i in range(8)]
    for name in ["a", *names]:
        models.register(repo, name, "resnet")
    node = make_node(repo, devices=1, regions=1)
    ex = node.executors[0]
    held, _ = ex.acquire(node.store.get("a"), timeout_s=1.0)
    plans = []
    real_plan = type(ex.arena).plan
    monkeypatch.setattr(type(ex.arena), "plan", lambda self, *a, **k: plans.append(1) or real_plan(self, *a, **k))
    landed = []

    def use(name: str) -> None:
        res, swapped = ex.acquire(node.store.get(name), timeout_s=20.0)
        landed.append((name, swapped))
        time.sleep(0.01)
        ex.release(res)
    waiters = [threading.Thread(target=use, args=(n,)) for n in names]
    for w in waiters:
        w.start()
    time.sleep(0.3)
    assert not plans  # all waiting: the only model is in use
    ex.release(held)
    for w in waiters:
        w.join(30.0)
    assert sorted(landed) == [(n, True) for n in names]
    assert len(plans) == len(names), plans


def test_a_model_moved_to_another_offset_reuses_its_skeleton_and_stays_correct(repo):
    natives = {n: models.register(repo, n, "resnet", seed=i) for i, n in enumerate("abc")}
    node = make_node(repo, devices=1, regions=3)
    ex = node.executors[0]

    def weights_at(res) -> int:  # arena offset the module's first weight points at
        return next(res.module.parameters()).data_ptr() - ex.device.weights.data_ptr()
    served(node, "a", "resnet", natives["a"])
    first = ex.resident["a"]
    assert first.region.offset == weights_at(first) == 0
    ex.evict("a")
    served(node, "b", "resnet", natives["b"])  # b takes offset 0: a lands in the next gap
    served(node, "a", "resnet", natives["a"], seed=1)  # wrong outputs if a still read offset 0 (b's bytes)
    moved = ex.resident["a"]
    assert moved.region.offset == weights_at(moved) == REGION and moved.module is first.module  # re-pointed
    ex.evict("a")
    served(node, "c", "resnet", natives["c"])  # c takes a's last offset: a moves again
    served(node, "a", "resnet", natives["a"], seed=2)  # wrong outputs if a still read c's or b's bytes
    again = ex.resident["a"]
    assert again.region.offset == weights_at(again) == 2 * REGION and again.module is first.module


def test_a_model_larger_than_the_arena_gets_no_room_at_once(repo):
    models.register(repo, "wide", "gpt2-wide")  # 2 MiB of weights plus a little: two regions
    node = make_node(repo, devices=1, regions=1)
    started = time.monotonic()
    with pytest.raises(NoRoom, match="exceed"):
        node.infer("wide", [torch.from_numpy(a) for a in models.inputs("gpt2-wide")], None, 10.0)
    assert time.monotonic() - started < 1.0


def test_prefetch_makes_the_next_call_warm(repo):
    module = models.register(repo, "m", "sentence-embedding")
    node = make_node(repo, devices=2, regions=1)
    assert node.prefetch("m", None, 1.0)["path"] == "pcie"
    [device] = [ex.device.index for ex in node.executors if ex.is_resident("m")]
    assert node.prefetch("m", None, 1.0) == {"device": device, "swap_in": False, "path": "resident"}
    res = node.executors[device].resident["m"]
    assert res.in_use == 0
    # the copy was issued group by group; the first run waits for each layer's group, then settles it
    assert len(res.gates.swap.events) == -(-node.store.get("m").nbytes // GROUP_BYTES) > 1
    assert served(node, "m", "sentence-embedding", module) == {"device": device, "swap_in": False}
    assert res.gates.swap is None
    assert swap_ins(node) == 1


def test_concurrent_first_requests_swap_in_once(repo):
    module = models.register(repo, "m", "resnet")
    node = make_node(repo, devices=2, regions=2)
    barrier = threading.Barrier(16)
    infos, errors = [], []

    def call(seed: int) -> None:
        barrier.wait()
        try:
            infos.append(served(node, "m", "resnet", module, seed=seed))
        except Exception as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(infos) == 16
    assert swap_ins(node) == 1
    assert sum(i["swap_in"] for i in infos) == 1
    assert sum(e.stats.runs for e in node.executors) == 16


def test_a_cold_model_lands_on_the_empty_device(repo):
    kinds = {"a": "resnet", "b": "gpt2", "c": "vit", "d": "resnet", "cold": "sentence-embedding"}
    natives = {n: models.register(repo, n, k, seed=i) for i, (n, k) in enumerate(kinds.items())}
    node = make_node(repo, devices=3, regions=4)
    for name, hint in (("a", 0), ("b", 0), ("c", 0), ("d", 1)):
        assert served(node, name, kinds[name], natives[name], hint=hint)["device"] == hint
    assert [len(e.resident) for e in node.executors] == [3, 1, 0]
    assert served(node, "cold", kinds["cold"], natives["cold"]) == {"device": 2, "swap_in": True}
    assert [e.stats.evictions for e in node.executors] == [0, 0, 0]


def test_re_registering_changed_weights_serves_the_new_weights(repo):
    old = models.register(repo, "m", "gpt2", seed=1)
    node = make_node(repo, devices=1, regions=2)
    served(node, "m", "gpt2", old)
    new = models.register(repo, "m", "gpt2", seed=2)
    arrays = models.inputs("gpt2")
    assert not np.array_equal(models.native(old, arrays)[0], models.native(new, arrays)[0])
    node.forget("m")  # what the server's register op does
    assert served(node, "m", "gpt2", new) == {"device": 0, "swap_in": True}
    assert served(node, "m", "gpt2", new)["swap_in"] is False


# ---------------------------------------------------------------- repository validation


def stored_files(repo: Repository) -> list[Path]:
    """Every file under the repository (symlinks not followed), relative to its root."""
    return sorted(Path(d, f).relative_to(repo.root) for d, _, files in os.walk(repo.root) for f in files)


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_register_refuses_a_truncated_file_and_leaves_nothing(repo, tmp_path):
    weights = truncated(models.save(models.build("resnet"), tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match="does not load"):
        repo.register(models.spec("m", "resnet"), weights)
    assert repo.names() == [] and stored_files(repo) == []


def test_register_refuses_shapes_that_do_not_fit_the_architecture(repo, tmp_path):
    weights = models.save(models.build("vit", config={"hidden_size": 32, "intermediate_size": 64}), tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="does not load"):
        repo.register(models.spec("m", "vit"), weights)
    assert repo.names() == [] and stored_files(repo) == []


def test_register_refuses_inputs_the_model_cannot_run_and_keeps_the_old_version(repo, tmp_path):
    old = models.register(repo, "m", "resnet")
    spec = models.spec("m", "resnet")
    spec.inputs[0].shape = [1, 4, 32, 32]  # four channels into a three-channel stem
    with pytest.raises(ModelLoadError, match="declared inputs"):
        repo.register(spec, models.save(models.build("resnet", seed=5), tmp_path / "w.safetensors"))
    assert repo.names() == ["m"] and {f.parent for f in stored_files(repo)} == {repo.resolve("m").relative_to(repo.root)}
    node = make_node(repo, devices=1, regions=1)
    served(node, "m", "resnet", old)


# ---------------------------------------------------------------- the server process


SERVER_REGIONS = 4  # per device: two CPU devices of 8 MiB
MAX_INPUT_BYTES = 1 << 20
FRAME_TIMEOUT_S = 2.0


def start_server(root: Path, repo: Repository) -> subprocess.Popen:
    """``torpor gpu-server`` on two CPU devices serving ``repo`` on ``root/gpu.sock``, unauthenticated
    (``root`` must be short: a Unix socket path has at most 107 bytes)."""
    sock = root / "gpu.sock"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "torpor"), "gpu-server", "--cpu-devices", "2",
             "--device-memory", str(SERVER_REGIONS * REGION), "--model-repo", str(repo.root), "--socket", str(sock),
             "--max-input-bytes", str(MAX_INPUT_BYTES), "--torch-threads", "1", "--insecure-no-auth",
             "--frame-timeout-s", str(FRAME_TIMEOUT_S)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TORPOR_REDIS_URL": ""})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gpu-server exited: {(root / 'server.log').read_text()}")
        if sock.exists():
            probe = GPUServerClient(str(sock), timeout_s=5)
            try:
                probe.health()
                return proc
            except ModelError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("gpu-server did not start within 60 s")


class Served:
    """The server process of this module and the native modules of its models."""

    def __init__(self, root: Path):
        self.root = root
        self.repo = Repository(root / "models")
        self.natives = {kind: models.register(self.repo, kind, kind) for kind in models.SMALL + ("gpt2-wide",)}
        self.broken = self.repo.root / "broken"
        self.broken.mkdir()
        spec = models.spec("broken", "resnet")
        spec.write(self.broken)
        truncated(models.save(models.build("resnet"), self.broken / "model.safetensors"))
        self.socket = str(root / "gpu.sock")
        self.proc = start_server(root, self.repo)

    def ensure_running(self) -> None:
        """Restarts the server when a test stopped it (the shutdown test runs last)."""
        if self.proc.poll() is not None:
            self.proc = start_server(self.root, self.repo)

    def client(self) -> GPUServerClient:
        return GPUServerClient(self.socket, timeout_s=30)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served_module():
    root = Path(tempfile.mkdtemp(prefix="torpor-test-", dir="/tmp"))
    s = Served(root)
    yield s
    stop_process(s.proc)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server(served_module):
    served_module.ensure_running()
    return served_module


@pytest.fixture
def client(server):
    c = server.client()
    yield c
    c.close()


def raw_connection(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def reply_or_close(sock: socket.socket) -> dict | None:
    """The server's next reply, or None when it closed the connection instead."""
    try:
        return protocol.recv(sock, 1 << 30)[0]
    except ConnectionError:
        return None


@pytest.mark.parametrize("kind", models.SMALL)
def test_served_outputs_equal_native(server, client, kind):
    arrays = models.inputs(kind, seed=7)
    want = models.native(server.natives[kind], arrays)
    models.assert_same(client.infer(kind, arrays), want)
    got = Model(kind, client)(*[torch.from_numpy(a) for a in arrays])  # CPU tensors are accepted too
    models.assert_same(list(got) if isinstance(got, tuple) else [got], want)


def test_socket_mode_health_and_stats(server, client):
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o660
    health = client.health()
    assert health["healthy"] and [d["device"] for d in health["devices"]] == [0, 1]
    client.infer("vit", models.inputs("vit"))
    stats = client.stats()
    assert "vit" in stats["models"]
    assert [d["arena_bytes"] for d in stats["devices"]] == [SERVER_REGIONS * REGION] * 2
    assert any("vit" in d["resident"] for d in stats["devices"])
    assert all(d["kind"] == "cpu" and d["used_bytes"] <= d["arena_bytes"] for d in stats["devices"])


def test_prefetch_then_infer_is_not_a_swap_in(server, client):
    client.evict("gpt2")
    before = sum(d["swap_ins"] for d in client.stats()["devices"])
    device = client.prefetch("gpt2")
    assert device in (0, 1)
    arrays = models.inputs("gpt2", seed=3)
    models.assert_same(client.infer("gpt2", arrays), models.native(server.natives["gpt2"], arrays))
    devices = client.stats()["devices"]
    assert sum(d["swap_ins"] for d in devices) == before + 1 and "gpt2" in devices[device]["resident"]


@pytest.mark.parametrize("mutate, status, code, words", [
    (lambda a: [a[0].astype(np.float64)], 400, "bad_input", ["pixel_values", "float32", "float64"]),
    (lambda a: [a[0][:, :, :16, :16].copy()], 400, "bad_input", ["pixel_values", "shape 1x3x32x32", "1x3x16x16"]),
    (lambda a: [a[0], a[0]], 400, "bad_input", ["takes 1 inputs", "got 2"]),
    (lambda a: [], 400, "bad_input", ["takes 1 inputs", "got 0"]),
    (lambda a: [np.where(np.arange(a[0].size).reshape(a[0].shape) == 5, np.nan, a[0]).astype(np.float32)],
     400, "bad_input", ["pixel_values", "NaN"]),
    (lambda a: [np.zeros((1, 3, 512, 512), np.float32)], 413, "too_large", ["exceed", str(MAX_INPUT_BYTES)]),
], ids=["dtype", "shape", "too-many", "none", "nan", "too-large"])
def test_bad_inputs_are_refused_with_400(server, client, mutate, status, code, words):
    arrays = mutate(models.inputs("resnet"))
    with pytest.raises(ModelError) as err:
        client.infer("resnet", arrays)
    assert (err.value.status, err.value.code) == (status, code)
    for w in words:
        assert w in str(err.value)
    models.assert_same(client.infer("resnet", models.inputs("resnet")),  # the connection still serves
                       models.native(server.natives["resnet"], models.inputs("resnet")))


def test_unknown_model_is_a_404(client):
    with pytest.raises(ModelError) as err:
        client.infer("no-such-model", models.inputs("resnet"))
    assert (err.value.status, err.value.code) == (404, "unknown_model")
    with pytest.raises(ModelError) as err:
        client.prefetch("no-such-model")
    assert err.value.status == 404


@pytest.mark.parametrize("header, words", [
    ({"op": "fly"}, "unknown op"),
    ({"op": "infer", "shm": "s", "inputs": []}, "unknown shared-memory segment 's'"),
    ({"op": "infer", "model": "resnet"}, "'shm'"),
    ({"op": "infer", "model": "resnet", "shm": "torpor-no-such-segment", "inputs": []}, "send its file descriptor"),
    ({"op": "prefetch", "model": "resnet", "device": "zero"}, "'device'"),
    ({"op": "prefetch", "model": "resnet", "device": -1}, "device index from 0 to 1"),
    ({"op": "prefetch", "model": "resnet", "device": True}, "'device'"),
])
def test_malformed_requests_are_a_400_and_keep_the_connection(server, client, header, words):
    with pytest.raises(ModelError) as err:
        client.call(header)
    assert err.value.status == 400 and words in str(err.value)
    assert client.health()["healthy"]


def test_malformed_tensor_descriptions_are_a_400(server, client):
    client.infer("resnet", models.inputs("resnet"))  # creates this thread's segment, known to the server
    shm = client._local.segment
    good, _ = protocol.describe(models.inputs("resnet"))
    for entries, words in [
        ([{**good[0], "nbytes": 7}], "nbytes does not match"),
        ([{**good[0], "offset": shm.size}], "outside the shared memory"),
        ([{**good[0], "dtype": "no-such-dtype"}], "bad tensor description"),
        ([{**good[0], "nbytes": "many"}], "nbytes"),
        ([5], "bad tensor description"),
        ([{**good[0], "shape": "1332"}], "shape must be a list of integers"),
        ([{**good[0], "shape": [1.0, 3, 32, 32]}], "shape must be a list of integers"),
        ([{**good[0], "offset": 0.5}], "offset and nbytes integers"),
        ([{**good[0], "nbytes": True}], "offset and nbytes integers"),
    ]:
        with pytest.raises(ModelError) as err:
            client.call({"op": "infer", "model": "resnet", "shm": shm.id, "inputs": entries}, segment=shm)
        assert err.value.status == 400 and words in str(err.value), entries
    with pytest.raises(ModelError) as err:
        client.call({"op": "infer", "model": "resnet", "shm": shm.id, "inputs": good, "timeout_ms": "soon"}, segment=shm)
    assert err.value.status == 400 and "timeout_ms" in str(err.value)


def framed(header: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header


@pytest.mark.parametrize("frame", [
    framed(b"not json!"),
    framed(b"\xff\xfe\xfd\xfc\xfb"),  # not UTF-8
    framed(b"[1,2]"),  # JSON, not an object
    (protocol.MAX_HEADER_BYTES + 1).to_bytes(4, "big"),
    b"\xff\xff\xff\xff",
    framed(b'{"op":"health","payload":-1}'),
    framed(b'{"op":"health","payload":1000000000}'),  # over the input limit
    framed(b'{"op":"health","payload":"x"}'),
    framed(b'{"op":"health",'),
], ids=["not-json", "not-utf8", "array", "oversized", "huge", "negative-payload", "big-payload", "text-payload",
        "cut-json"])
def test_garbage_frames_get_a_400_or_a_close_and_others_are_still_served(server, client, frame):
    bystander = server.client()
    assert bystander.health()["healthy"]  # connected before the garbage
    with raw_connection(server.socket) as sock:
        sock.sendall(frame)
        reply = reply_or_close(sock)
        assert reply is None or (reply["ok"] is False and reply["status"] == 400 and reply["code"] == "bad_request")
        if reply is not None:
            assert reply_or_close(sock) is None  # and then it closes: the stream cannot be trusted
    arrays = models.inputs("vit", seed=4)
    want = models.native(server.natives["vit"], arrays)
    models.assert_same(bystander.infer("vit", arrays), want)
    models.assert_same(client.infer("vit", arrays), want)
    bystander.close()


def test_a_cut_frame_closes_only_that_connection(server, client):
    with raw_connection(server.socket) as sock:
        sock.sendall(b"\x00\x00\x01\x00" + b'{"op":')
        sock.shutdown(socket.SHUT_WR)
        assert reply_or_close(sock) is None
    assert client.health()["healthy"]


def test_a_broken_model_in_the_repository_fails_fast(client):
    started = time.monotonic()
    with pytest.raises(ModelError) as err:
        client.infer("broken", models.inputs("resnet"))
    assert (err.value.status, err.value.code) == (502, "model_load_failed")
    assert "broken" in str(err.value)
    first_done = time.monotonic()
    for _ in range(20):
        with pytest.raises(ModelError) as err:
            client.infer("broken", models.inputs("resnet"))
        assert err.value.status == 502
    assert time.monotonic() - first_done < 0.5
    assert time.monotonic() - started < 5.0
    assert "broken" not in client.stats()["models"]


def test_register_op_loads_new_weights_and_unregister_forgets(server, client):
    repo = server.repo
    old = models.register(repo, "swapped", "resnet", seed=11)
    assert client.register("swapped")["bytes"] > models.weight_bytes(old)
    arrays = models.inputs("resnet", seed=5)
    models.assert_same(client.infer("swapped", arrays), models.native(old, arrays))
    new = models.register(repo, "swapped", "resnet", seed=12)
    assert client.register("swapped")["model"] == "swapped"
    models.assert_same(client.infer("swapped", arrays), models.native(new, arrays))
    repo.unregister("swapped")
    client.unregister("swapped")
    assert "swapped" not in client.stats()["models"]
    assert all("swapped" not in d["resident"] for d in client.stats()["devices"])
    with pytest.raises(ModelError) as err:
        client.infer("swapped", arrays)
    assert err.value.status == 404


def test_outputs_larger_than_the_shared_memory_come_back_inline(server, client):
    arrays = models.inputs("gpt2-wide", seed=1)
    want = models.native(server.natives["gpt2-wide"], arrays)
    assert want[0].nbytes > DEFAULT_SHM_BYTES
    models.assert_same(client.infer("gpt2-wide", arrays), want)
    # the same call by hand: the reply carries the logits as its payload
    entries, end = protocol.describe(arrays)
    shm = protocol.Segment.create(end)
    try:
        protocol.write(shm.buf, entries, arrays)
        with raw_connection(server.socket) as sock:
            protocol.send(sock, {"op": "infer", "model": "gpt2-wide", "shm": shm.id, "inputs": entries}, fds=(shm.fd,))
            reply, payload = protocol.recv(sock, 1 << 30)
        assert reply["ok"] and reply["payload"] == len(payload) >= want[0].nbytes
        assert reply["outputs"][0]["offset"] == 0
        models.assert_same(protocol.read(payload, reply["outputs"], copy=True), want)
    finally:
        shm.close()


def test_outputs_are_placed_after_the_inputs_in_shared_memory(server):
    arrays = models.inputs("vit", seed=2)
    entries, end = protocol.describe(arrays)
    shm = protocol.Segment.create(end + 4096)
    try:
        protocol.write(shm.buf, entries, arrays)
        with raw_connection(server.socket) as sock:
            protocol.send(sock, {"op": "infer", "model": "vit", "shm": shm.id, "inputs": entries}, fds=(shm.fd,))
            reply, payload = protocol.recv(sock, 1 << 30)
        assert reply["ok"] and not payload and reply["outputs"][0]["offset"] >= end
        assert isinstance(reply["device"], int) and isinstance(reply["swap_in"], bool) and reply["server_ms"] >= 0
        models.assert_same(protocol.read(shm.buf, entries, copy=True), arrays)  # inputs untouched
        models.assert_same(protocol.read(shm.buf, reply["outputs"], copy=True),
                           models.native(server.natives["vit"], arrays))
    finally:
        shm.close()


def test_a_segment_is_sent_once_per_connection_and_again_after_a_refusal(server, client):
    arrays = models.inputs("vit", seed=3)
    want = models.native(server.natives["vit"], arrays)
    entries, end = protocol.describe(arrays)
    shm = protocol.Segment.create(end + 4096)
    try:
        protocol.write(shm.buf, entries, arrays)
        header = {"op": "infer", "model": "vit", "shm": shm.id, "inputs": entries}
        with raw_connection(server.socket) as sock:
            protocol.send(sock, header)  # no descriptor yet: the server cannot know the segment
            reply, _ = protocol.recv(sock, 1 << 30)
            assert reply["status"] == 400 and "send its file descriptor" in reply["error"]
            for fds in ((shm.fd,), ()):  # then once with it, and by its id afterwards
                protocol.send(sock, header, fds=fds)
                reply, _ = protocol.recv(sock, 1 << 30)
                assert reply["ok"], reply
                models.assert_same(protocol.read(shm.buf, reply["outputs"], copy=True), want)
        with raw_connection(server.socket) as sock:  # a new connection has seen no segment
            protocol.send(sock, header)
            assert protocol.recv(sock, 1 << 30)[0]["status"] == 400
    finally:
        shm.close()
    # a client sends its descriptor again after a refusal that came before the server took it
    fresh = server.client()
    segment = fresh.segment(end)
    too_large = [{"dtype": "float32", "shape": [1], "offset": 0, "nbytes": 1 << 40}]
    with pytest.raises(ModelError) as err:
        fresh.call({"op": "infer", "model": "vit", "shm": segment.id, "inputs": too_large}, segment=segment)
    assert err.value.status == 413
    models.assert_same(fresh.infer("vit", arrays), want)
    assert fresh._local.segment is segment
    fresh.close()


@pytest.mark.parametrize("make, words", [
    (lambda: os.memfd_create("unsealed"), "not sealed against shrinking"),
    (lambda: os.memfd_create("sealable", os.MFD_ALLOW_SEALING), "not sealed against shrinking"),
    (lambda: os.open(os.devnull, os.O_RDWR), "not a sealable shared-memory segment"),
])
def test_a_segment_that_could_shrink_is_refused_and_the_server_lives(server, client, make, words):
    arrays = models.inputs("vit", seed=4)
    entries, end = protocol.describe(arrays)
    fd = make()
    try:
        if os.fstat(fd).st_size == 0 and words.startswith("not sealed"):
            os.ftruncate(fd, end)
        with raw_connection(server.socket) as sock:
            protocol.send(sock, {"op": "infer", "model": "vit", "shm": "mine", "inputs": entries}, fds=(fd,))
            reply, _ = protocol.recv(sock, 1 << 30)
    finally:
        os.close(fd)
    assert reply["status"] == 400 and words in reply["error"], reply
    assert client.health()["healthy"]


def test_a_huge_sparse_segment_is_mapped_only_up_to_the_limit(server, client):
    arrays = models.inputs("vit")
    entries, end = protocol.describe(arrays)
    fd = os.memfd_create("huge", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 40)  # 1 TiB, no memory: only the address space of whoever maps it
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    with open(fd, "r+b", closefd=False) as f:
        f.write(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))  # one input, at offset 0
    limit = MAX_INPUT_BYTES + protocol.SEGMENT_SLACK_BYTES
    try:
        with raw_connection(server.socket) as sock:
            protocol.send(sock, {"op": "infer", "model": "vit", "shm": "huge", "inputs": entries}, fds=(fd,))
            reply, payload = protocol.recv(sock, 1 << 30)
            assert reply["ok"], reply
            got = protocol.read(payload, reply["outputs"], copy=True) if payload else [
                np.frombuffer(os.pread(fd, e["nbytes"], e["offset"]), dtype=e["dtype"]).reshape(e["shape"])
                for e in reply["outputs"]]
            models.assert_same(got, models.native(server.natives["vit"], arrays))
            mapped = [line.split()[0] for line in Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines()
                      if "memfd:huge" in line]
            sizes = [int(b, 16) - int(a, 16) for a, b in (m.split("-") for m in mapped)]
            assert sizes and max(sizes) <= limit
            beyond = [{**entries[0], "offset": limit}]  # described past the mapped part
            protocol.send(sock, {"op": "infer", "model": "vit", "shm": "huge", "inputs": beyond})
            reply, _ = protocol.recv(sock, 1 << 30)
            assert reply["status"] == 400 and "outside the shared memory" in reply["error"]
    finally:
        os.close(fd)
    assert client.health()["healthy"]


def test_an_error_reply_that_echoes_a_huge_request_keeps_its_status(server):
    header = json.dumps({"op": "é" * 400_000}, ensure_ascii=False).encode()
    assert len(header) < protocol.MAX_HEADER_BYTES
    with raw_connection(server.socket) as sock:
        sock.sendall(len(header).to_bytes(4, "big") + header)
        reply, _ = protocol.recv(sock, 0)
    assert (reply["status"], reply["code"]) == (400, "bad_request") and reply["error"].endswith("(cut)")


@pytest.mark.parametrize("header, words", [
    ('{"op": "health"}'.encode("utf-16"), "UTF-8"),
    (b'{"op": "health", "device": ' + b"9" * 5000 + b"}", "not valid JSON"),
], ids=["utf16", "long-int"])
def test_headers_that_are_not_plain_utf8_json_are_a_400(server, header, words):
    with raw_connection(server.socket) as sock:
        sock.sendall(len(header).to_bytes(4, "big") + header)
        reply, _ = protocol.recv(sock, 0)
    assert reply["status"] == 400 and words in reply["error"]


def test_a_claimed_payload_costs_memory_only_as_it_arrives(server, client):
    rss_before = server.rss_bytes()
    socks = [raw_connection(server.socket) for _ in range(4)]
    try:
        for sock in socks:  # each claims 200 MiB and sends one byte of it
            header = json.dumps({"op": "health", "payload": 200 << 20}).encode()
            sock.sendall(len(header).to_bytes(4, "big") + header + b"x")
        time.sleep(0.5)
        assert server.rss_bytes() - rss_before < 64 << 20
    finally:
        for sock in socks:
            sock.close()
    assert client.health()["healthy"]


def test_a_sealed_segment_cannot_be_shrunk_under_the_server(server, client):
    client.infer("vit", models.inputs("vit"))
    segment = client._local.segment
    with pytest.raises(PermissionError):
        os.ftruncate(segment.fd, 0)
    arrays = models.inputs("vit", seed=5)
    models.assert_same(client.infer("vit", arrays), models.native(server.natives["vit"], arrays))


def test_more_descriptors_than_a_message_may_carry_are_refused(server, client):
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(protocol.MAX_FDS + 1)]
    try:
        with raw_connection(server.socket) as sock:
            data = protocol._encode({"op": "health"}).encode()
            sock.sendmsg([len(data).to_bytes(4, "big") + data],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            reply, _ = protocol.recv(sock, 1 << 30)
    finally:
        for fd in fds:
            os.close(fd)
    assert reply["status"] == 400 and "at most" in reply["error"]
    assert client.health()["healthy"]


def test_a_half_sent_frame_is_dropped_after_the_frame_timeout(server, client, monkeypatch):
    from runtime.gpu_server import protocol as wire
    sock = raw_connection(server.socket)
    try:
        sock.sendall((1000).to_bytes(4, "big") + b'{"op": ')  # and never the rest
        sock.settimeout(FRAME_TIMEOUT_S + 10)
        started = time.monotonic()
        assert sock.recv(1) == b""  # the server closes the connection
        assert FRAME_TIMEOUT_S - 0.5 < time.monotonic() - started < FRAME_TIMEOUT_S + 5
    finally:
        sock.close()
    # a byte now and then does not keep the frame alive: the timeout is for the whole frame
    sock = raw_connection(server.socket)
    try:
        sock.settimeout(FRAME_TIMEOUT_S + 10)
        started = time.monotonic()
        frame = (1000).to_bytes(4, "big") + b'{"op": "health"'
        closed = False
        for byte in frame:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(FRAME_TIMEOUT_S / 4)
        if not closed:
            assert sock.recv(1) == b""
        assert time.monotonic() - started < FRAME_TIMEOUT_S * 3
    finally:
        sock.close()
    assert client.health()["healthy"]
    # a payload field that is not a count is refused, not read
    with raw_connection(server.socket) as sock:
        wire.send(sock, {"op": "health", "payload": True})
        assert "field 'payload'" in wire.recv(sock, 0)[0]["error"]


def test_swap_in_evict_cycles_keep_memory_flat(server, client):
    arrays = models.inputs("resnet", seed=9)
    want = models.native(server.natives["resnet"], arrays)
    for _ in range(2):  # no model resident anywhere: the baseline
        for name in client.stats()["models"]:
            client.evict(name)
    baseline = [d["used_bytes"] for d in client.stats()["devices"]]
    assert baseline == [0, 0]
    swaps_before = sum(d["swap_ins"] for d in client.stats()["devices"])

    def cycle(n: int) -> None:
        for _ in range(n):
            out = client.infer("resnet", arrays)
            assert client.evict("resnet")
        models.assert_same(out, want)

    cycle(50)
    rss_before = server.rss_bytes()
    cycle(1000)
    rss_after = server.rss_bytes()
    stats = client.stats()
    assert [d["used_bytes"] for d in stats["devices"]] == baseline
    assert sum(d["swap_ins"] for d in stats["devices"]) == swaps_before + 1050
    assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)


def test_shutdown_removes_the_socket_and_leaves_client_segments_to_the_client(server):
    """Runs last: it stops the module's server (a later test would start it again)."""
    client = server.client()
    arrays = models.inputs("vit", seed=6)
    models.assert_same(client.infer("vit", arrays), models.native(server.natives["vit"], arrays))
    segment = client._local.segment
    stop_process(server.proc)
    assert server.proc.returncode == 0
    assert not Path(server.socket).exists()
    # the server mapped the segment, but it stays the client's: still there after the
    # server's exit, gone when the client closes it
    segment.buf[0] = 1
    assert os.fstat(segment.fd).st_size == segment.size
    client.close()
    assert segment.fd == -1 and client._local.segment is None
    with pytest.raises(ModelError) as err:
        client.health()
    assert (err.value.status, err.value.code) == (503, "unavailable")


def peer_node(repo: Repository) -> Node:
    """Two CPU devices linked as NVLink peers (each its own host link)."""
    from runtime.gpu_server import topology as topo
    links = topo.Topology("cpu", tuple(topo.DeviceLinks(i, None, f"cpu:{i}", frozenset({1 - i})) for i in range(2)))
    return Node(ModelStore(repo, pin=False), discover(cpu_devices=2, device_memory=4 * REGION, arena_bytes=0),
                GROUP_BYTES, topology=links)


def test_a_model_busy_on_one_device_is_copied_from_it_to_the_other(repo):
    native = models.register(repo, "m", "resnet", seed=1)
    node = peer_node(repo)
    arrays = models.inputs("resnet")
    x = [torch.from_numpy(a) for a in arrays]
    assert node.infer("m", x, 0, 5)[1]["device"] == 0
    busy = node.executors[0]
    busy.resident["m"].in_use += 1  # a long run holds it
    busy.queued += 5
    try:
        outputs, info = node.infer("m", x, None, 5)
    finally:
        busy.resident["m"].in_use -= 1
        busy.queued -= 5
    assert (info["device"], info["path"]) == (1, "nvlink")
    models.assert_same([o.numpy() for o in outputs], models.native(native, arrays))


def test_a_new_version_is_never_copied_from_an_old_ones_bytes(repo, monkeypatch):
    from runtime.gpu_server import store as store_module
    models.register(repo, "m", "resnet", seed=1)
    node = peer_node(repo)
    arrays = models.inputs("resnet")
    x = [torch.from_numpy(a) for a in arrays]
    node.infer("m", x, 0, 5)
    old = node.executors[0].resident["m"]
    old.in_use += 1  # the old version stays busy on device 0 while a new one is registered
    node.executors[0].queued += 5
    monkeypatch.setattr(store_module, "VERSION_CHECK_S", 0.0)
    new = models.register(repo, "m", "resnet", seed=2)
    try:
        outputs, info = node.infer("m", x, None, 5)
    finally:
        old.in_use -= 1
        node.executors[0].queued -= 5
    assert info["path"] == "pcie"  # from the host: the peer holds another version's bytes
    models.assert_same([o.numpy() for o in outputs], models.native(new, arrays))
    for ex in node.executors:  # no device keeps a bound module of the old version
        assert all(bound.model is not old.model for bound in ex._bound.values())


def test_token_ids_outside_the_embedding_are_a_400_before_any_run(server, client):
    ids = models.inputs("gpt2")
    for bad in (models.TINY["gpt2"].vocab, -1):  # one past the table (a device-side assert on a GPU), negative
        ids[0][0, -1] = bad
        with pytest.raises(ModelError) as err:
            client.infer("gpt2", ids)
        assert err.value.status == 400 and "outside 0..63" in str(err.value)


def test_registration_finds_the_id_and_length_limits_of_token_inputs(repo, tmp_path):
    from runtime.gpu_server.repository import TensorSpec
    from runtime.gpu_server.server import RequestError, validate
    module = models.build("gpt2")
    spec = models.spec("g", "gpt2")
    spec.inputs = [TensorSpec("input_ids", "int64", [1, None])]
    spec = repo.register(spec, models.save(module, tmp_path / "g.safetensors"))
    (ids,) = repo.spec("g").inputs
    assert (ids.high, ids.max_len) == (64, 16)  # vocab_size and n_positions of the tiny GPT-2
    validate([ids], [np.zeros((1, 16), np.int64)], "g")
    with pytest.raises(RequestError, match="over the model's 16 positions"):
        validate([ids], [np.zeros((1, 17), np.int64)], "g")


def test_a_request_header_over_the_limit_is_a_400_from_the_client(server, client):
    with pytest.raises(ModelError) as err:
        client.call({"op": "health", "padding": "x" * (protocol.MAX_HEADER_BYTES + 1)})
    assert (err.value.status, err.value.code) == (400, "bad_request") and "exceeds the limit" in str(err.value)
    assert client.health()["healthy"]  # the connection was not touched


def test_a_swap_in_that_fails_to_bind_leaves_no_region_behind(repo, monkeypatch):
    natives = {"a": models.register(repo, "a", "resnet"), "b": models.register(repo, "b", "resnet", seed=1)}
    node = make_node(repo, devices=1, regions=1)
    ex = node.executors[0]
    model = node.store.get("a")
    monkeypatch.setattr(type(model), "bound", lambda self, weights: (_ for _ in ()).throw(MemoryError("host")))
    with pytest.raises(MemoryError):
        ex.acquire(model, timeout_s=1.0)
    assert ex.arena.used == 0 and not ex.resident
    monkeypatch.undo()
    served(node, "b", "resnet", natives["b"])  # the arena plans and serves as before
    served(node, "a", "resnet", natives["a"])


def test_models_of_one_architecture_share_a_cold_graph_profile(tmp_path):
    """The copy group size a cold graph measured (graphs.py: four captures and their timed
    replays) is reused by every model of the same architecture, config and bytes — on a
    node of functions fine-tuned from one base model, one measurement instead of one per
    function — and never by a model whose kernels or bytes differ."""
    from runtime.gpu_server.graphs import GraphCache

    repo = Repository(tmp_path / "repo")
    models.register(repo, "a", "resnet", seed=1)
    models.register(repo, "b", "resnet", seed=2)
    models.register(repo, "wider", "resnet", config={**models.TINY["resnet"].config, "hidden_sizes": [16, 32]})
    store = ModelStore(repo, pin=False)
    image = [torch.zeros(t.shape) for t in store.get("a").spec.inputs]

    def profile(name: str, offset: int = 0, inputs=image) -> tuple:
        model = store.get(name)
        return GraphCache.profile(model, GraphCache.key(model, offset, inputs))

    assert profile("a") == profile("b", offset=1 << 20)
    assert profile("a") != profile("wider")
    assert profile("a") != profile("a", inputs=[torch.zeros(2, *image[0].shape[1:])])

    # a torch.export program is its own graph, whatever architecture its model.json declares
    a = store.get("a")
    program = SimpleNamespace(name="prog", spec=dataclasses.replace(a.spec, name="prog", format="export"),
                              nbytes=a.nbytes)
    assert profile("a") != GraphCache.profile(program, GraphCache.key(program, 0, image))

    # dropping a model named like an architecture keeps what was learnt for the architecture
    cache = GraphCache.__new__(GraphCache)  # its constructor needs CUDA; drop() touches only these
    cache.pairs, cache.seen, cache.uncapturable = OrderedDict(), Counter(), set()
    learnt = {profile("a"): (8 << 20, {}), ("model", "resnet", 1, ()): (2 << 20, {})}
    cache.chosen = dict(learnt)
    cache.drop("resnet")
    assert cache.chosen == {profile("a"): learnt[profile("a")]}


@pytest.mark.parametrize("ms", [-1.0, float("nan"), float("inf"), 1e-6, 1e12])
def test_a_switch_interval_out_of_range_is_refused(ms):
    """Python's switch interval (--gil-switch-interval-ms): a negative, non-finite, sub-µs
    (rounded to Python's floor) or hours-long value is refused by name, never applied."""
    from runtime.gpu_server.server import set_switch_interval

    before = sys.getswitchinterval()
    with pytest.raises(click.BadParameter, match="0.001 to 1000 ms"):
        set_switch_interval(ms)
    assert sys.getswitchinterval() == before
