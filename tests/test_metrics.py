"""Metrics and health, scraped over real HTTP.

- A real ``torpor gpu-server`` process (CPU devices, tiny real models): counters and
  histograms of ``/metrics`` move by exactly what a few inferences, a prefetch, an eviction
  and refused requests must move them by, and the link gauges are there; its debug log has
  one JSON line per request.
- An in-process node with the real health server: ``/readyz`` turns 503 and names the device
  marked unhealthy or the unreadable model repository, and turns 200 again; ``/healthz`` and
  ``/readyz`` keep answering at once while a swap-in is held half-way.
- The controller's ``/metrics``: invocations by outcome, blocking latency, SLO gauges from the
  ``slo-ms`` annotation, activations in flight and node queues read from Redis.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import pytest
import redis
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

import models
from conftest import controller_app
from controller_plugin.config import GUEST_AUTH
from controller_plugin.metrics import slo_ms_of
from gpu_process import GPUServerProcess
from runtime.client import ModelError
from runtime.gpu_server.arena import ALIGNMENT
from runtime.gpu_server.device import discover
from runtime.gpu_server.health import HealthServer, Probe
from runtime.gpu_server.metrics import ServerMetrics
from runtime.gpu_server.node import Node
from runtime.gpu_server.repository import Repository
from runtime.gpu_server.store import ModelStore
from test_controller_api import FakeInvoker, add_node

GUEST = tuple(GUEST_AUTH.split(":", 1))


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``base/metrics``: (sample name, labels) → value."""
    response = requests.get(base + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# ------------------------------------------------------------------ the GPU server process

@pytest.fixture(scope="module")
def gpu_server():
    # one device with room for two tiny models: the third evicts one
    server = GPUServerProcess(("resnet", "gpt2", "vit"), devices=1, regions=2,
                              extra=("--log-format", "json", "--log-level", "debug"))
    yield server
    server.stop()


def test_gpu_server_counters_move_by_what_was_done(gpu_server):
    client = gpu_server.client()
    before = scrape(gpu_server.metrics_url)
    nbytes = {kind: client.register(kind)["bytes"] for kind in ("resnet", "gpt2", "vit")}
    arrays = models.inputs("resnet")
    with models.torch_threads(1):
        want = models.native(gpu_server.natives["resnet"], arrays)
    for _ in range(3):
        models.assert_same(client.infer("resnet", arrays), want)
    assert client.prefetch("gpt2") == 0
    again = client.prefetch_info("gpt2")
    assert again.pop("server_ms") >= 0 and again == {"ok": True, "device": 0, "swap_in": False, "path": "resident"}
    client.infer("vit", models.inputs("vit"))
    with pytest.raises(ModelError) as unknown:
        client.infer("no-such-model", arrays)
    assert unknown.value.status == 404
    with pytest.raises(ModelError) as bad:
        client.infer("resnet", [arrays[0].astype(np.float64)])
    assert bad.value.status == 400
    client.close()
    after = scrape(gpu_server.metrics_url)

    requests_total = "torpor_gpu_requests_total"
    assert delta(before, after, requests_total, op="infer", status="200") == 4
    assert delta(before, after, requests_total, op="infer", status="404") == 1
    assert delta(before, after, requests_total, op="infer", status="400") == 1
    assert delta(before, after, requests_total, op="prefetch", status="200") == 2
    assert delta(before, after, "torpor_gpu_prefetches_total", device="0", path="resident") == 1
    assert delta(before, after, requests_total, op="register", status="200") == 3

    assert delta(before, after, "torpor_gpu_swap_ins_total", device="0", path="pcie") == 3  # the prefetch's too
    assert delta(before, after, "torpor_gpu_swap_ins_total", device="0", path="nvlink") == 0
    assert delta(before, after, "torpor_gpu_swap_in_bytes_total", device="0", path="pcie") == sum(nbytes.values())
    assert delta(before, after, "torpor_gpu_prefetches_total", device="0", path="pcie") == 1
    assert delta(before, after, "torpor_gpu_evictions_total", device="0") == 1
    assert delta(before, after, "torpor_gpu_runs_total", device="0") == 4
    for name in ("torpor_gpu_request_duration_seconds_count", "torpor_gpu_execution_duration_seconds_count",
                 "torpor_gpu_request_wait_seconds_count"):
        assert delta(before, after, name, model="resnet", device="0", path="pcie") == 1
        assert delta(before, after, name, model="resnet", device="0", path="resident") == 2
        assert delta(before, after, name, model="vit", device="0", path="pcie") == 1
    server_s = value(after, "torpor_gpu_request_duration_seconds_sum", model="resnet")
    assert 0 < value(after, "torpor_gpu_execution_duration_seconds_sum", model="resnet") <= server_s

    assert value(after, "torpor_gpu_resident_models", device="0") == 2
    assert value(after, "torpor_gpu_resident_model_bytes", device="0", model="vit") == nbytes["vit"]
    assert value(after, "torpor_gpu_arena_bytes", device="0") == 2 * ALIGNMENT
    assert value(after, "torpor_gpu_arena_used_bytes", device="0") == 2 * ALIGNMENT
    assert value(after, "torpor_gpu_queued_requests", device="0") == 0
    assert value(after, "torpor_gpu_device_healthy", device="0") == 1
    assert value(after, "torpor_gpu_device_info", device="0", kind="cpu") == 1
    assert not any(n.startswith("torpor_gpu_memory_") for n, _ in after)  # NVML: CUDA devices only
    # the CPU device's own host link, idle once every swap-in has landed
    for name in ("torpor_gpu_link_transfers_in_flight", "torpor_gpu_link_bytes_in_flight"):
        assert after[(name, frozenset({("link", "cpu:0")}))] == 0


def test_gpu_server_debug_log_is_one_json_line_per_request(gpu_server):
    client = gpu_server.client()
    client.infer("gpt2", models.inputs("gpt2"))
    with pytest.raises(ModelError):
        client.infer("missing-model", models.inputs("gpt2"))
    client.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in gpu_server.log_path.read_text().splitlines() if line.startswith("{")]
        requests_logged = [x for x in lines if x.get("op") == "infer"]
        if any(x["model"] == "missing-model" for x in requests_logged):
            break
        time.sleep(0.05)
    served = [x for x in requests_logged if x["model"] == "gpt2" and x["status"] == 200]
    assert served and served[-1]["device"] == 0 and served[-1]["path"] in ("pcie", "resident")
    assert served[-1]["level"] == "debug" and served[-1]["process"] == "gpu-server" and served[-1]["ms"] > 0
    missing = [x for x in requests_logged if x["model"] == "missing-model"]
    assert missing[-1]["status"] == 404 and missing[-1]["device"] is None
    started = [x for x in lines if "metrics and health on" in x["message"]]
    assert started and started[0]["level"] == "info"


def test_gpu_server_http_answers_json_to_unknown_paths(gpu_server):
    assert requests.get(gpu_server.metrics_url + "/healthz", timeout=5).json() == {"status": "ok"}
    response = requests.get(gpu_server.metrics_url + "/nothing", timeout=5)
    assert response.status_code == 404 and "/readyz" in response.json()["error"]


# ------------------------------------------------------------------ health, in-process

@pytest.fixture
def node(tmp_path):
    repo = Repository(tmp_path / "models")
    native = models.register(repo, "resnet", "resnet")
    node = Node(ModelStore(repo, pin=False), discover(cpu_devices=2, device_memory=2 * ALIGNMENT, arena_bytes=0), 1024)
    node.native = native
    return node


@pytest.fixture
def health(node):
    server = HealthServer(node, ServerMetrics(node).registry, str(node.store.repository.root), "127.0.0.1", 0,
                          probe_timeout_s=1.0).start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def test_readyz_flips_when_a_device_fails_and_names_it(node, health):
    ready = requests.get(health + "/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True and body["failing"] == [] and body["model_repo"]["ready"] is True
    assert [(d["device"], d["ready"], d["kind"]) for d in body["devices"]] == [(0, True, "cpu"), (1, True, "cpu")]

    faulty = node.executors[1]
    faulty.healthy, faulty.fault = False, "AcceleratorError: injected by the test"
    down = requests.get(health + "/readyz", timeout=5)
    assert down.status_code == 503
    body = down.json()
    assert body["ready"] is False and body["devices"][0]["ready"] is True
    assert body["devices"][1]["ready"] is False and "injected by the test" in body["devices"][1]["error"]
    assert len(body["failing"]) == 1 and body["failing"][0].startswith("device 1 (cpu)")
    assert requests.get(health + "/healthz", timeout=5).status_code == 200
    metrics = scrape(health)
    assert value(metrics, "torpor_gpu_device_healthy", device="1") == 0
    assert value(metrics, "torpor_gpu_device_healthy", device="0") == 1

    faulty.healthy, faulty.fault = True, ""
    assert requests.get(health + "/readyz", timeout=5).status_code == 200


def test_readyz_fails_while_the_model_repository_cannot_be_read(node, health):
    root = node.store.repository.root
    moved = root.with_name("models-away")
    root.rename(moved)
    try:
        down = requests.get(health + "/readyz", timeout=5)
        assert down.status_code == 503
        body = down.json()
        assert body["model_repo"]["ready"] is False and "FileNotFoundError" in body["model_repo"]["error"]
        assert all(d["ready"] for d in body["devices"])
        assert body["failing"] == [f"model repository {root}: {body['model_repo']['error'].split(': ', 1)[1]}"]
    finally:
        moved.rename(root)
    assert requests.get(health + "/readyz", timeout=5).status_code == 200


def test_healthz_and_readyz_answer_while_a_swap_in_is_held(node, health):
    device = node.executors[0].device
    entered, release = threading.Event(), threading.Event()
    real_copying = device.copying

    @contextlib.contextmanager
    def held_copying():
        # the swap-in's copies wait here, with the executor's lock held, as behind a slow link
        entered.set()
        assert release.wait(30)
        with real_copying():
            yield

    device.copying = held_copying
    arrays = models.inputs("resnet")
    result: dict = {}

    def infer() -> None:
        outputs, info = node.infer("resnet", [torch.from_numpy(a) for a in arrays], 0, 30.0)
        result.update(outputs=[o.numpy() for o in outputs], info=info)

    worker = threading.Thread(target=infer)
    worker.start()
    try:
        assert entered.wait(10)
        for _ in range(10):
            began = time.monotonic()
            assert requests.get(health + "/healthz", timeout=2).status_code == 200
            assert requests.get(health + "/readyz", timeout=2).status_code == 200
            assert time.monotonic() - began < 1.0
        assert worker.is_alive() and not result  # the swap-in is still held
    finally:
        release.set()
        worker.join(30)
    assert result["info"]["swap_in"] is True and result["info"]["device"] == 0
    with models.torch_threads(1):
        want = models.native(node.native, arrays)
    np.testing.assert_allclose(result["outputs"][0], want[0], rtol=1e-5, atol=1e-6)


def test_probe_times_out_on_a_hung_check_and_never_stacks_threads():
    calls, unblock = [], threading.Event()

    def hung() -> None:
        calls.append(1)
        unblock.wait(10)

    probe = Probe(hung, "test-probe")
    first = probe.run(0.2)
    assert first["ok"] is False and "no answer within 0.2 s" in first["error"]
    second = probe.run(0.2)
    assert second["ok"] is False and len(calls) == 1  # waited on the same stuck check
    unblock.set()
    time.sleep(0.05)
    assert probe.run(1.0)["ok"] is True and len(calls) == 2
    failing = Probe(lambda: 1 / 0, "test-probe-2").run(1.0)
    assert failing["ok"] is False and failing["error"].startswith("ZeroDivisionError")


# ------------------------------------------------------------------ the controller

@pytest.fixture
def controller(redis_url):
    with controller_app(redis_url) as url:
        yield url


def create(base: str, name: str, slo_ms=None) -> None:
    annotations = [] if slo_ms is None else [{"key": "slo-ms", "value": slo_ms}]
    body = {"exec": {"kind": "python:3", "code": "def main(args):\n    return args\n"}, "annotations": annotations}
    response = requests.put(f"{base}/api/v1/namespaces/_/actions/{name}", json=body, auth=GUEST, timeout=10)
    assert response.status_code == 200, response.text


def invoke(base: str, name: str, blocking: bool, params: dict | None = None) -> int:
    response = requests.post(f"{base}/api/v1/namespaces/_/actions/{name}?blocking={str(blocking).lower()}",
                             json=params or {}, auth=GUEST, timeout=30)
    return response.status_code


def test_controller_metrics_count_invocations_latency_slo_and_queues(controller, redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    create(controller, "fast", slo_ms=5000)
    create(controller, "strict", slo_ms="0.001")
    create(controller, "plain")
    node = "metrics-node"
    add_node(r, node)

    assert [invoke(controller, "fast", blocking=False) for _ in range(2)] == [202, 202]
    queued = scrape(controller)
    assert value(queued, "torpor_invocations_total", namespace="guest", action="fast", outcome="accepted") == 2
    assert value(queued, "torpor_activations_in_flight", namespace="guest") == 2
    assert value(queued, "torpor_node_queued_activations", node=node) == 2
    assert value(queued, "torpor_node_alive", node=node) == 1

    invoker = FakeInvoker(redis_url, node)
    invoker.start()
    try:
        assert [invoke(controller, "fast", blocking=True) for _ in range(3)] == [200, 200, 200]
        assert invoke(controller, "fast", blocking=True, params={"fail": "boom"}) == 502
        assert invoke(controller, "strict", blocking=True) == 200
        assert invoke(controller, "plain", blocking=True) == 200
        deadline = time.monotonic() + 5
        while r.llen(f"torpor:node:{node}:queue") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        invoker.stop()
    r.delete(f"torpor:node:{node}:alive")
    assert invoke(controller, "fast", blocking=True) == 503
    assert invoke(controller, "no-such-action", blocking=True) == 404

    after = scrape(controller)
    count = "torpor_invocations_total"
    assert value(after, count, action="fast", outcome="success") == 3
    assert value(after, count, action="fast", outcome="application_error") == 1
    assert value(after, count, action="fast", outcome="no_invoker") == 1
    assert value(after, count, action="strict", outcome="success") == 1
    assert value(after, count, action="no-such-action") == 0  # unknown names never become series
    assert value(after, "torpor_invocation_duration_seconds_count", namespace="guest", action="fast") == 4
    assert value(after, "torpor_invocation_duration_seconds_bucket", action="fast", le="+Inf") == 4
    assert value(after, "torpor_activations_in_flight", namespace="guest") == 0
    assert value(after, "torpor_node_queued_activations", node=node) == 0
    assert value(after, "torpor_node_alive", node=node) == 0
    # SLO gauges: a failure counts as a violation
    assert value(after, "torpor_action_slo_attainment_ratio", action="fast") == 0.75
    assert value(after, "torpor_action_slo_met", action="fast") == 0
    assert value(after, "torpor_action_slo_seconds", action="fast") == 5.0
    assert value(after, "torpor_action_slo_attainment_ratio", action="strict") == 0.0
    assert value(after, "torpor_action_slo_seconds", action="plain") == 0.1  # the default 100 ms
    r.close()


@pytest.mark.parametrize("annotations, want", [
    ([{"key": "slo-ms", "value": 250}], 250.0), ([{"key": "slo-ms", "value": "80"}], 80.0),
    ([{"key": "slo-ms", "value": -5}], 100.0), ([{"key": "slo-ms", "value": "fast"}], 100.0),
    ([{"key": "slo-ms", "value": None}], 100.0), ([], 100.0),
])
def test_slo_annotation_forms(annotations, want):
    assert slo_ms_of(annotations) == want
