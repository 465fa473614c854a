"""``torpor status`` and the one log line per activation, against a real GPU server process
(two CPU devices, publishing to a real redis-server), a real invoker running a real action
runtime and the real controller: resident models, link load and SLO attainment per node and
per function after invocations through that stack; the per-minute SLO counters and their
window; the controller's JSON log lines (``torpor controller --log-format json``)."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
from click.testing import CliRunner

import models
from conftest import controller_app
from controller_plugin import attainment, status
from controller_plugin.config import GUEST_AUTH
from gpu_process import GPUServerProcess
from runtime.gpu_server.arena import ALIGNMENT
from runtime.gpu_server.metrics import link_load
from runtime.gpu_server.placement import DeviceState, ResidentModel
from runtime.invoker.config import InvokerSettings
from runtime.invoker.invoker import Invoker
from runtime.log_format import JsonFormatter
from runtime.redis_server import RedisServer, free_port
from test_controller_api import FakeInvoker, add_node
from test_invoker import message, put_action, record_of

NODE = "status-node"
TORPOR = str(Path(sys.executable).parent / "torpor")
GUEST = tuple(GUEST_AUTH.split(":", 1))
NOOP = "def main(args):\n    return {'ok': True}\n"


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    """A Redis of this module's own: the GPU server keeps publishing into it, so it must not be
    the shared one other tests flush and expect empty."""
    with RedisServer(tmp_path_factory.mktemp("cluster-redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def gpu_server(cluster_url):
    server = GPUServerProcess(("resnet", "gpt2"), devices=2, regions=2,
                              extra=("--redis-url", cluster_url, "--node-id", NODE, "--publish-interval-s", "0.1"))
    yield server
    server.stop()


def published(redis_url: str, device: int, model: str, timeout_s: float = 5.0) -> bool:
    """Waits until the GPU server's hash of ``device`` lists ``model`` as resident."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if model in json.loads(r.hget(f"torpor:node:{NODE}:device:{device}", "resident") or "[]"):
                return True
            time.sleep(0.05)
        return False
    finally:
        r.close()


def status_json(redis_url: str) -> dict:
    done = subprocess.run([TORPOR, "status", "--redis-url", redis_url, "--json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_shows_a_swapped_in_model_on_its_device(gpu_server, cluster_url):
    redis_url = cluster_url
    client = gpu_server.client()
    client.infer("resnet", models.inputs("resnet"), device=1)
    client.close()
    assert published(redis_url, 1, "resnet")

    snapshot = status_json(redis_url)
    [node] = [n for n in snapshot["nodes"] if n["node"] == NODE]
    assert node["alive"] is False and node["last_seen_age_s"] is None  # a GPU server without an invoker
    assert [d["device"] for d in node["devices"]] == [0, 1]
    zero, one = node["devices"]
    assert one["resident"] == ["resnet"] and zero["resident"] == []
    assert one["healthy"] is True and one["fault"] == "" and one["kind"] == "cpu"
    assert one["arena_bytes"] == 2 * ALIGNMENT and one["used_bytes"] == ALIGNMENT and zero["used_bytes"] == 0
    assert one["swap_ins"] >= 1 and one["queue"] == 0 and one["updated_age_s"] < 5

    text = CliRunner().invoke(status.command, ["--redis-url", redis_url])
    assert text.exit_code == 0, text.output
    header, *lines = text.output.splitlines()
    assert header.split()[:3] == ["NODE", "ALIVE", "LAST"]
    node_lines = [line for line in lines if line.startswith(NODE)]
    assert len(node_lines) == 1 and node_lines[0].split()[:3] == [NODE, "no", "never"]
    device_one = lines[lines.index(node_lines[0]) + 1]
    assert device_one.split()[0] == "1" and device_one.rstrip().endswith("resnet") and " ok " in device_one


def test_status_reports_a_failed_device_and_an_empty_cluster(redis_url):
    empty = CliRunner().invoke(status.command, ["--redis-url", redis_url])
    assert empty.exit_code == 0 and "(no nodes in Redis)" in empty.output
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset("torpor:node:sick:device:0", mapping={"resident": "[]", "healthy": 0, "kind": "cuda", "name": "NVIDIA H200",
                                                 "fault": "AcceleratorError: an illegal memory access"})
    r.close()
    out = CliRunner().invoke(status.command, ["--redis-url", redis_url])
    assert out.exit_code == 0
    assert "FAILED: AcceleratorError: an illegal memory access" in out.output
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    [node] = status.collect(r)["nodes"]
    r.close()
    assert node["devices"][0]["healthy"] is False and node["devices"][0]["arena_bytes"] is None


def test_status_watch_refreshes_until_interrupted(gpu_server, cluster_url):
    proc = subprocess.Popen([TORPOR, "status", "--redis-url", cluster_url, "--watch", "--json", "--interval-s", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
        assert second["time"] > first["time"]
        assert any(n["node"] == NODE for n in second["nodes"])
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_status_without_redis_is_a_clear_error():
    out = CliRunner().invoke(status.command, ["--redis-url", "redis://127.0.0.1:1/0"])
    assert out.exit_code == 1 and "cannot read the cluster state from redis://127.0.0.1:1/0" in out.output
    bad = CliRunner().invoke(status.command, ["--interval-s", "0"])
    assert bad.exit_code == 2 and "must be positive" in bad.output


def test_invoker_logs_one_line_per_activation_and_status_shows_the_node(gpu_server, cluster_url, caplog):
    redis_url = cluster_url
    r = redis.Redis.from_url(redis_url, socket_timeout=60)
    invoker = Invoker(InvokerSettings(redis_url=redis_url, node_id=NODE, gpu_socket=gpu_server.socket)).start()
    try:
        # the log line names what the model's prefetch answered by the end of the activation:
        # the action outlasts the prefetch of this tiny model by far
        put_action(r, "noop", "import time\n\ndef main(args):\n    time.sleep(1)\n    return {'ok': True}\n")
        msg = message("noop", models=["gpt2"])
        with caplog.at_level(logging.INFO, logger="runtime.invoker.invoker"):
            r.lpush(f"torpor:node:{NODE}:queue", json.dumps(msg))
            record = record_of(r, msg["activationId"])
        assert record["response"]["success"]
        lines = [rec for rec in caplog.records if rec.name == "runtime.invoker.invoker"
                 and getattr(rec, "fields", {}).get("event") == "activation"]
        assert len(lines) == 1
        fields = lines[0].fields
        [gpu] = fields["gpu"]
        assert (fields["activation_id"], fields["namespace"], fields["action"], fields["node"], fields["models"]) == \
            (msg["activationId"], "guest", "noop", NODE, ["gpt2"])
        assert fields["status"] == "success" and fields["status_code"] == 0
        assert fields["duration_ms"] == record["duration"] and fields["wait_ms"] >= 0 and fields["init_ms"] > 0
        # no slo_ms in the message: the default SLO; latency is from submission to the end
        assert fields["latency_ms"] == fields["wait_ms"] + fields["duration_ms"] and fields["slo_ms"] == 100.0
        assert fields["slo_met"] is (fields["latency_ms"] <= 100)
        # gpt2's first use in this module: its prefetch copied it from the host
        assert fields["path"] == ["pcie"] and fields["swap_ms"] >= 0
        text = lines[0].getMessage()
        assert text.startswith(f"activation {msg['activationId']} guest/noop node {NODE} gpu {gpu} path pcie: "
                               f"success in ")
        assert text.endswith(f"(wait {fields['wait_ms']} ms, swap {fields['swap_ms']} ms, init {fields['init_ms']} ms; "
                             f"SLO 100 ms {'met' if fields['slo_met'] else 'missed'})")
        as_json = json.loads(JsonFormatter("invoker").format(lines[0]))
        assert as_json["process"] == "invoker" and as_json["level"] == "info" and as_json["gpu"] == [gpu]
        assert as_json["activation_id"] == msg["activationId"] and as_json["message"] == text

        assert published(redis_url, gpu, "gpt2")
        view = redis.Redis.from_url(redis_url, decode_responses=True)
        [node] = [n for n in status.collect(view)["nodes"] if n["node"] == NODE]
        view.close()
        assert node["alive"] is True and node["last_seen_age_s"] < 3
        assert node["queued"] == 0 and node["running"] == 0
        assert "gpt2" in node["devices"][gpu]["resident"]
    finally:
        invoker.stop()
        r.close()


def test_json_log_format_is_selected_by_flag_and_validated(redis_url, tmp_path):
    bad = subprocess.run([TORPOR, "invoker", "--redis-url", redis_url, "--log-format", "xml"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "log format must be one of text, json, not 'xml'" in bad.stderr
    proc = subprocess.Popen([TORPOR, "invoker", "--redis-url", redis_url, "--node-id", "json-node",
                             "--gpu-socket", str(tmp_path / "none.sock"), "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = json.loads(proc.stderr.readline())
        assert line["process"] == "invoker" and line["level"] == "info" and line["logger"] == "runtime.invoker.invoker"
        assert line["message"] == "invoker of node json-node consuming torpor:node:json-node:queue"
    finally:
        proc.terminate()  # clean stops are test_invoker's business; the line was the point here
        proc.wait(20)


# ------------------------------------------------------------------ link load and SLO attainment

@pytest.fixture
def controller_url(cluster_url):
    """The real controller app (in-process, threaded HTTP) on the module's cluster Redis."""
    with controller_app(cluster_url) as url:
        yield url


def create(base: str, name: str, code: str, **annotations) -> None:
    body = {"exec": {"kind": "python:3", "code": code},
            "annotations": [{"key": k.replace("_", "-"), "value": v} for k, v in annotations.items()]}
    response = requests.put(f"{base}/api/v1/namespaces/_/actions/{name}", json=body, auth=GUEST, timeout=10)
    assert response.status_code == 200, response.text


def invoke(base: str, name: str, blocking: bool = True) -> requests.Response:
    return requests.post(f"{base}/api/v1/namespaces/_/actions/{name}?blocking={str(blocking).lower()}", json={},
                         auth=GUEST, timeout=60)


def test_status_shows_link_load_and_slo_attainment_of_a_real_stack(gpu_server, cluster_url, controller_url, caplog):
    view = redis.Redis.from_url(cluster_url, decode_responses=True)
    [before] = [n for n in status.collect(view)["nodes"] if n["node"] == NODE]
    invoker = Invoker(InvokerSettings(redis_url=cluster_url, node_id=NODE, gpu_socket=gpu_server.socket)).start()
    try:
        create(controller_url, "relaxed", NOOP, slo_ms=60000, model="resnet")
        create(controller_url, "failing", "def main(args):\n    return {'error': 'no'}\n")
        create(controller_url, "strict", NOOP, slo_ms=1)  # its container's start alone takes longer
        with caplog.at_level(logging.INFO, logger="controller_plugin.invocations"):
            codes = [invoke(controller_url, name).status_code for name in ("relaxed", "relaxed", "failing", "strict")]
        assert codes == [200, 200, 502, 200]
    finally:
        invoker.stop()
    assert published(cluster_url, 0, "resnet") or published(cluster_url, 1, "resnet")

    # the controller's line per invocation names the node it queued the activation on
    lines = [rec.fields for rec in caplog.records if rec.name == "controller_plugin.invocations"
             and getattr(rec, "fields", {}).get("event") == "activation"]
    assert [(f["action"], f["node"], f["outcome"], f["blocking"], f["slo_ms"]) for f in lines] == [
        ("relaxed", NODE, "success", True, 60000.0), ("relaxed", NODE, "success", True, 60000.0),
        ("failing", NODE, "application_error", True, 100.0), ("strict", NODE, "success", True, 1.0)]
    assert all(f["latency_ms"] > 0 and len(f["activation_id"]) == 32 for f in lines)

    snapshot = status_json(cluster_url)
    [node] = [n for n in snapshot["nodes"] if n["node"] == NODE]
    assert (node["slo_total"] - before["slo_total"], node["slo_met"] - before["slo_met"]) == (4, 2)
    assert node["slo_attainment"] == node["slo_met"] / node["slo_total"]
    actions = {a["action"]: a for a in snapshot["slo"]["actions"]}
    assert actions["guest/relaxed"] == {"action": "guest/relaxed", "slo_ms": 60000.0, "total": 2, "met": 2,
                                        "attainment": 1.0, "meeting": True}
    assert actions["guest/failing"] == {"action": "guest/failing", "slo_ms": 100.0, "total": 1, "met": 0,
                                        "attainment": 0.0, "meeting": False}
    assert (actions["guest/strict"]["slo_ms"], actions["guest/strict"]["met"]) == (1.0, 0)
    assert snapshot["slo"]["window_min"] == 5 and snapshot["slo"]["functions"] == len(actions)
    assert snapshot["slo"]["functions_meeting"] == sum(a["meeting"] for a in actions.values())
    # each CPU device has a host link of its own; every swap-in landed before its run ended
    assert [(d["link"], d["transfers_in_flight"], d["bytes_in_flight"], d["link_transfers_in_flight"],
             d["link_bytes_in_flight"]) for d in node["devices"]] == [("cpu:0", 0, 0, 0, 0), ("cpu:1", 0, 0, 0, 0)]

    out = CliRunner().invoke(status.command, ["--redis-url", cluster_url])
    assert out.exit_code == 0, out.output
    text = out.output.splitlines()
    assert all(column in text[0] for column in ("SLO", "LINK", "LINK LOAD"))
    [row] = [line for line in text if line.startswith(NODE)]
    share = f"{100 * node['slo_met'] / node['slo_total']:.1f}% ({node['slo_met']}/{node['slo_total']})"
    assert share in row and "cpu:0" in row and " idle " in row
    device_one = text[text.index(row) + 1]
    assert "cpu:1" in device_one and " idle " in device_one
    assert any(line.startswith("SLO attainment over the last 5 min:") for line in text)
    assert ["guest/relaxed", "60000", "2", "100.0%", "(2/2)", "yes"] in [line.split() for line in text]
    assert ["guest/failing", "100", "1", "0.0%", "(0/1)", "no"] in [line.split() for line in text]
    view.close()


def test_link_load_counts_swap_ins_in_flight_per_device_and_per_link():
    states = [
        DeviceState(0, "pcie:A", 1000, {"a": ResidentModel("a", 300, loading=True), "b": ResidentModel("b", 50)}),
        DeviceState(1, "pcie:A", 1000, {"c": ResidentModel("c", 200, loading=True)}),
        DeviceState(2, "pcie:B", 1000, {"d": ResidentModel("d", 70)}),
    ]
    assert link_load(states) == [
        {"device": 0, "link": "pcie:A", "transfers_in_flight": 1, "bytes_in_flight": 300,
         "link_transfers_in_flight": 2, "link_bytes_in_flight": 500},
        {"device": 1, "link": "pcie:A", "transfers_in_flight": 1, "bytes_in_flight": 200,
         "link_transfers_in_flight": 2, "link_bytes_in_flight": 500},
        {"device": 2, "link": "pcie:B", "transfers_in_flight": 0, "bytes_in_flight": 0,
         "link_transfers_in_flight": 0, "link_bytes_in_flight": 0},
    ]


def test_status_renders_a_busy_link_and_a_device_without_link_fields(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset("torpor:node:busy:device:0", mapping={"resident": "[]", "healthy": 1, "link": "pcie:0000:18:00.0",
                                                 "transfers_in_flight": 1, "bytes_in_flight": 3 << 20,
                                                 "link_transfers_in_flight": 2, "link_bytes_in_flight": 5 << 20})
    r.hset("torpor:node:old:device:0", mapping={"resident": "[]", "healthy": 1})  # a GPU server before link load
    snapshot = status.collect(r)
    r.close()
    table = status.rows(snapshot)
    busy, old = ({name: cell for name, cell in zip(table[0], row)} for row in table[1:])
    assert (busy["NODE"], busy["LINK"], busy["LINK LOAD"], busy["SLO"]) == ("busy", "pcie:0000:18:00.0", "2 (5.0 MiB)",
                                                                           "-")  # no activations: no SLO share
    assert (old["NODE"], old["LINK"], old["LINK LOAD"]) == ("old", "?", "?")
    assert "0 of 0 functions meet their SLO" in status.render(snapshot)


def finished(ns: str, name: str, end_ms: int, status_code: int = 0, latency_ms: int = 10) -> tuple[dict, dict]:
    """A message and its final record as the invoker has them."""
    msg = {"namespace": ns, "action": name, "submitted": end_ms - latency_ms, "slo_ms": 100}
    record = {"namespace": ns, "name": name, "start": end_ms - latency_ms // 2, "end": end_ms,
              "response": {"statusCode": status_code}}
    return msg, record


def test_attainment_counts_per_minute_and_sums_the_window(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    now = int(time.time() * 1000)
    recorder = attainment.Recorder(r)
    for (msg, record), node in [(finished("g", "f", now), "n1"), (finished("g", "f", now, status_code=1), "n1"),
                                (finished("g", "f", now, latency_ms=101), "n2"),
                                (finished("g", "f", now - 120_000), "n2"), (finished("g", "h", now - 600_000), "n1")]:
        raw = json.dumps(msg)
        r.lpush("inflight", raw)
        assert recorder.finish("inflight", raw, msg, record, node)
        # finishing it again (a retry after a lost reply) finds no message and counts nothing
        assert not recorder.finish("inflight", raw, msg, record, node)
    assert r.llen("inflight") == 0
    assert 3500 <= r.ttl(attainment.minute_key(now // 60000)) <= 3600

    def window(minutes: int) -> dict:
        return attainment.read(r, now, minutes)

    assert window(1) == {"actions": {"g/f": {"total": 3, "met": 1, "slo_ms": 100.0}},
                         "nodes": {"n1": {"total": 2, "met": 1}, "n2": {"total": 1, "met": 0}}}
    assert window(3)["actions"]["g/f"] == {"total": 4, "met": 2, "slo_ms": 100.0}
    assert window(60)["actions"]["g/h"] == {"total": 1, "met": 1, "slo_ms": 100.0}
    assert window(60)["nodes"]["n1"] == {"total": 3, "met": 2}
    with pytest.raises(ValueError, match="1 to 60 minutes"):
        attainment.read(r, now, 61)
    bad = CliRunner().invoke(status.command, ["--redis-url", redis_url, "--slo-window-min", "0"])
    assert bad.exit_code == 2 and "must be 1 to 60" in bad.output
    r.close()


@pytest.mark.parametrize("msg, record, want", [
    ({"submitted": 1000, "slo_ms": 50}, {"start": 1010, "end": 1050, "response": {"statusCode": 0}}, (50, 50.0, True)),
    ({"submitted": 1000, "slo_ms": 50}, {"start": 1010, "end": 1051, "response": {"statusCode": 0}}, (51, 50.0, False)),
    ({"submitted": 1000, "slo_ms": 50}, {"start": 1010, "end": 1020, "response": {"statusCode": 2}}, (20, 50.0, False)),
    ({"submitted": 1000}, {"start": 1000, "end": 1100, "response": {"statusCode": 0}}, (100, 100.0, True)),
    ({"slo_ms": "fast"}, {"start": 1000, "end": 1030, "response": {"statusCode": 0}}, (30, 100.0, True)),
    ({"submitted": 1000, "slo_ms": -1}, {"start": 1000, "end": 1200, "response": {"statusCode": 0}}, (200, 100.0, False)),
])
def test_attainment_judges_latency_from_submission_against_the_message_slo(msg, record, want):
    assert attainment.judge(msg, record) == want


def test_controller_logs_json_lines_one_per_invocation(redis_url, tmp_path):
    bad = subprocess.run([TORPOR, "controller", "--log-format", "xml"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "log format must be one of text, json" in bad.stderr
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([TORPOR, "controller", "--port", str(port), "--redis-url", redis_url,
                                 "--requeue-interval-ms", "0", "--log-format", "json"], stdout=out,
                                stderr=subprocess.STDOUT)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    invoker = FakeInvoker(redis_url, "log-node")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        add_node(r, "log-node")
        create(base, "echo", NOOP)
        accepted = invoke(base, "echo", blocking=False)
        assert accepted.status_code == 202
        invoker.start()
        answered = invoke(base, "echo")
        assert answered.status_code == 200
    finally:
        invoker.stop()
        r.close()
        proc.terminate()
        proc.wait(20)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]  # every line is JSON
    assert lines and all(x["process"] == "controller" and x["time"].endswith("Z") for x in lines)
    assert any(x["logger"] == "gunicorn.error" and "Booting worker" in x["message"] for x in lines)
    activations = [x for x in lines if x.get("event") == "activation"]
    assert [(x["activation_id"], x["action"], x["node"], x["blocking"], x["outcome"], x["latency_ms"])
            for x in activations[:1]] == [(accepted.json()["activationId"], "echo", "log-node", False, "accepted", None)]
    assert len(activations) == 2 and activations[1]["outcome"] == "success" and activations[1]["status_code"] == 0
    assert activations[1]["activation_id"] == answered.headers["X-OpenWhisk-Activation-Id"]
    assert activations[1]["latency_ms"] >= 0 and activations[1]["slo_ms"] == 100.0
    assert activations[1]["level"] == "info" and activations[1]["logger"] == "controller_plugin.invocations"
    [post] = [x for x in lines if x.get("event") == "http" and x["request_id"] == accepted.headers["X-Request-ID"]]
    assert (post["method"], post["path"], post["status"], post["logger"]) == (
        "POST", "/api/v1/namespaces/_/actions/echo", 202, "gunicorn.access")
    assert post["ms"] >= 0 and "POST /api/v1/namespaces/_/actions/echo?blocking=false" in post["message"]
