"""The controller's REST API over real HTTP against a real redis-server.

A thread plays the invoker's part of the contract (docs/architecture.md): BLMOVE a message
from its node's queue to its in-flight list, write the final record with
``state.finish_activation`` and drop the message.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from werkzeug.serving import make_server

from controller_plugin import state
from controller_plugin.api import create_app
from controller_plugin.config import GUEST_AUTH, ControllerSettings
from controller_plugin.routing import NodePicker, requeue_from_dead_nodes
from runtime.redis_server import free_port

GUEST = tuple(GUEST_AUTH.split(":", 1))
OTHER = ("0f4e5a6b-1111-2222-3333-444455556666", "otherKey123")
CODE = "def main(args):\n    return args\n"


class Api:
    """A running controller: base URL, the Redis client, and request helpers."""

    def __init__(self, base: str, r: redis.Redis, settings: ControllerSettings):
        self.base, self.redis, self.settings = base, r, settings

    def url(self, path: str) -> str:
        return self.base + path

    def call(self, method: str, path: str, auth=GUEST, **kwargs) -> requests.Response:
        return requests.request(method, self.url(path), auth=auth, timeout=30, **kwargs)

    def create(self, name: str, auth=GUEST, **fields) -> requests.Response:
        body = {"exec": {"kind": "python:3", "code": CODE}, **fields}
        return self.call("PUT", f"/api/v1/namespaces/_/actions/{name}", auth=auth, json=body)


@pytest.fixture
def controller(redis_url):
    started = []

    def start(**overrides) -> Api:
        settings = ControllerSettings(**{"redis_url": redis_url, "requeue_interval_ms": 0,
                                         "auth": f"{GUEST_AUTH},{OTHER[0]}:{OTHER[1]}=other", **overrides})
        app = create_app(settings)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        started.append((server, thread, app, client))
        return Api(f"http://127.0.0.1:{server.server_port}", client, settings)

    yield start
    for server, thread, app, client in started:
        server.shutdown()
        thread.join(5)
        app.extensions["torpor"].stop()
        client.close()


def add_node(r: redis.Redis, node_id: str, alive_ms: int | None = 30000, resident: list[list[str]] | None = None,
             queued: int = 0, inflight: int = 0, last_seen: int | None = None) -> None:
    r.sadd(state.NODES_KEY, node_id)
    r.hset(state.node_key(node_id), "last_seen", last_seen if last_seen is not None else state_now())
    if alive_ms:
        r.set(state.alive_key(node_id), 1, px=alive_ms)
    for k, models in enumerate(resident or []):
        r.hset(state.device_key(node_id, k), mapping={"resident": json.dumps(models), "healthy": 1})
    for i in range(queued):
        r.lpush(state.queue_key(node_id), json.dumps({"activationId": f"filler{i}"}))
    for i in range(inflight):
        r.lpush(state.inflight_key(node_id), json.dumps({"activationId": f"busy{i}"}))


def state_now() -> int:
    return int(time.time() * 1000)


class FakeInvoker(threading.Thread):
    """Runs every activation queued on ``node_id``: echoes the parameters, or answers
    ``{"error": ...}`` as an application error when the parameters hold ``fail``."""

    def __init__(self, redis_url: str, node_id: str, delay_s: float = 0.0):
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.node_id, self.delay_s = node_id, delay_s
        self.stopped = threading.Event()
        self.messages: list[dict] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            raw = self.r.blmove(state.queue_key(self.node_id), state.inflight_key(self.node_id), 0.1, "RIGHT", "LEFT")
            if raw is None:
                continue
            message = json.loads(raw)
            self.messages.append(message)
            time.sleep(self.delay_s)
            start = state_now()
            params = message["params"]
            code, result = (state.APPLICATION_ERROR, {"error": params["fail"]}) if "fail" in params else (
                state.SUCCESS, {"echo": params})
            pending = state.get_activation(self.r, message["activationId"])
            record = state.final_record(pending, code, result, start_ms=start, end_ms=start + 7,
                                        logs=["2024-01-01T00:00:00Z stdout: hello"],
                                        wait_time_ms=start - message["submitted"], init_time_ms=3)
            state.finish_activation(self.r, record)
            self.r.lrem(state.inflight_key(self.node_id), 1, raw)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.r.close()


@pytest.fixture
def invoker(redis_url):
    started = []

    def start(node_id: str = "node-a", delay_s: float = 0.0) -> FakeInvoker:
        add_node(redis.Redis.from_url(redis_url), node_id)
        inv = FakeInvoker(redis_url, node_id, delay_s)
        inv.start()
        started.append(inv)
        return inv

    yield start
    for inv in started:
        inv.stop()


def assert_error(response: requests.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "code"}
    assert body["code"] and body["code"] == response.headers["X-Request-ID"]
    assert fragment in body["error"]
    return body


# --- service routes and authentication -----------------------------------------------------

def test_health_info_and_namespaces(controller):
    api = controller()
    assert requests.get(api.url("/healthz"), timeout=5).json() == {"status": "ok"}
    assert requests.get(api.url("/readyz"), timeout=5).json() == {"status": "ready"}
    info = requests.get(api.url("/api/v1"), timeout=5).json()
    assert info["api_version_path"] == "v1" and info["limits"]["concurrent_actions"] == 100
    assert api.call("GET", "/api/v1/namespaces").json() == ["guest"]
    assert api.call("GET", "/api/v1/namespaces", auth=OTHER).json() == ["other"]


def test_readyz_reports_unreachable_redis():
    settings = ControllerSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", requeue_interval_ms=0)
    app = create_app(settings)
    try:
        response = app.test_client().get("/readyz")
        assert response.status_code == 503 and "Redis" in response.get_json()["error"]
        listed = app.test_client().get("/api/v1/namespaces/_/actions",
                                       headers={"Authorization": "Basic " + base64.b64encode(GUEST_AUTH.encode()).decode()})
        assert listed.status_code == 503 and "unavailable" in listed.get_json()["error"]
    finally:
        app.extensions["torpor"].stop()


@pytest.mark.parametrize("auth_header, fragment", [
    (None, "requires authentication"),
    ("Basic " + base64.b64encode(f"{GUEST[0]}:wrong".encode()).decode(), "invalid"),
    ("Basic " + base64.b64encode(f"nobody:{GUEST[1]}".encode()).decode(), "invalid"),
    ("Basic !!!not-base64", "invalid"),
    ("Basic " + base64.b64encode(b"no-colon").decode(), "invalid"),
    ("Bearer " + GUEST[1], "invalid"),
])
def test_bad_credentials_get_401(controller, auth_header, fragment):
    api = controller()
    headers = {"Authorization": auth_header} if auth_header else {}
    response = requests.get(api.url("/api/v1/namespaces/_/actions"), headers=headers, timeout=5)
    assert_error(response, 401, fragment)
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert GUEST[1] not in response.text


def test_credentials_setting_is_validated():
    from controller_plugin.auth import Authenticator, CredentialError
    with pytest.raises(CredentialError) as info:
        Authenticator("uuid-without-key", "guest")
    assert "entry 1" in str(info.value)
    with pytest.raises(CredentialError):
        Authenticator("a:b=bad/namespace", "guest")
    assert Authenticator("a:b=team1, c:d", "guest").authenticate(
        "Basic " + base64.b64encode(b"c:d").decode()).namespace == "guest"


# --- actions -------------------------------------------------------------------------------

def test_action_create_get_update_list_delete(controller):
    api = controller()
    created = api.create("hello", parameters=[{"key": "greeting", "value": "hi"}],
                         annotations=[{"key": "model", "value": "resnet50"}])
    assert created.status_code == 200, created.text
    action = created.json()
    assert action["namespace"] == "guest" and action["name"] == "hello" and action["version"] == "0.0.1"
    assert action["exec"] == {"kind": "python:3", "code": CODE, "binary": False}
    assert action["limits"] == {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1}
    assert action["publish"] is False and action["updated"] > 0
    assert {"key": "exec", "value": "python:3"} in action["annotations"]
    stored = json.loads(api.redis.hget("torpor:actions:guest", "hello"))
    assert len(stored.pop("revision")) == 32 and stored == action  # the revision id stays internal

    got = api.call("GET", "/api/v1/namespaces/guest/actions/hello").json()
    assert got == action
    without_code = api.call("GET", "/api/v1/namespaces/_/actions/hello?code=false").json()
    assert "code" not in without_code["exec"] and without_code["exec"]["kind"] == "python:3"

    assert_error(api.create("hello"), 409, "already exists")

    # An update merges: fields it leaves out keep their values; limits merge field by field.
    updated = api.call("PUT", "/api/v1/namespaces/_/actions/hello?overwrite=true",
                       json={"limits": {"timeout": 1000}}).json()
    assert updated["version"] == "0.0.2" and updated["exec"]["code"] == CODE
    assert updated["limits"] == {"timeout": 1000, "memory": 256, "logs": 10, "concurrency": 1}
    assert updated["parameters"] == [{"key": "greeting", "value": "hi"}]
    replaced = api.call("PUT", "/api/v1/namespaces/_/actions/hello?overwrite=true",
                        json={"exec": {"kind": "python:default", "code": "def main(a): return {}", "main": "main"}}).json()
    assert replaced["version"] == "0.0.3" and replaced["exec"]["kind"] == "python:3"
    assert replaced["exec"]["main"] == "main"

    # A malformed update changes nothing.
    assert_error(api.call("PUT", "/api/v1/namespaces/_/actions/hello?overwrite=true",
                          json={"limits": {"memory": 4}}), 400, "limits.memory")
    assert api.call("GET", "/api/v1/namespaces/_/actions/hello").json() == replaced

    # overwrite=true on a new name creates it.
    assert api.call("PUT", "/api/v1/namespaces/_/actions/b-second?overwrite=true",
                    json={"exec": {"kind": "python:3", "code": CODE}}).json()["version"] == "0.0.1"
    for name in ("c.third", "d@fourth", "e&fifth"):
        assert api.create(name).status_code == 200

    listed = api.call("GET", "/api/v1/namespaces/_/actions").json()
    assert [a["name"] for a in listed] == ["b-second", "c.third", "d@fourth", "e&fifth", "hello"]
    assert all("code" not in a["exec"] for a in listed)
    assert {"key": "exec", "value": "python:3"} in listed[0]["annotations"]
    page = api.call("GET", "/api/v1/namespaces/_/actions?limit=2&skip=1").json()
    assert [a["name"] for a in page] == ["c.third", "d@fourth"]
    assert api.call("GET", "/api/v1/namespaces/_/actions?count=true").json() == {"actions": 5}
    assert_error(api.call("GET", "/api/v1/namespaces/_/actions?limit=201"), 400, "range of 0 to 200")
    assert_error(api.call("GET", "/api/v1/namespaces/_/actions?skip=-1"), 400, "greater than or equal to 0")
    assert_error(api.call("GET", "/api/v1/namespaces/_/actions?limit=x"), 400, "not an integer")

    deleted = api.call("DELETE", "/api/v1/namespaces/_/actions/hello")
    assert deleted.status_code == 200 and deleted.json()["name"] == "hello"
    assert_error(api.call("GET", "/api/v1/namespaces/_/actions/hello"), 404, "does not exist")
    assert_error(api.call("DELETE", "/api/v1/namespaces/_/actions/hello"), 404, "does not exist")
    assert api.redis.hget("torpor:actions:guest", "hello") is None


def test_blackbox_and_binary_actions(controller):
    api = controller()
    blackbox = api.call("PUT", "/api/v1/namespaces/_/actions/box", json={"exec": {"image": "me/img:1"}}).json()
    assert blackbox["exec"] == {"kind": "blackbox", "binary": False, "image": "me/img:1"}
    zipped = base64.b64encode(b"PK\x03\x04" + b"\0" * 40).decode()
    binary = api.call("PUT", "/api/v1/namespaces/_/actions/zipped",
                      json={"exec": {"kind": "python:3", "code": zipped}}).json()
    assert binary["exec"]["binary"] is True


@pytest.mark.parametrize("body, fragment", [
    ({}, "exec undefined"),
    ({"exec": "python"}, "'exec' must be an object"),
    ({"exec": {"code": CODE}}, "exec.kind is required"),
    ({"exec": {"kind": "nodejs:20", "code": CODE}}, "kind 'nodejs:20' is not one of"),
    ({"exec": {"kind": "sequence", "components": ["/_/a"]}}, "Sequence actions are not supported"),
    ({"exec": {"kind": "python:3"}}, "exec.code must be a non-empty string"),
    ({"exec": {"kind": "blackbox"}}, "exec.image is required"),
    ({"exec": {"kind": "python:3", "code": CODE, "binary": "yes"}}, "exec.binary must be a boolean"),
    ({"exec": {"kind": "python:3", "code": CODE}, "limits": {"timeout": 50}}, "limits.timeout must be a whole number from 100 to 300000 ms"),
    ({"exec": {"kind": "python:3", "code": CODE}, "limits": {"timeout": 300001}}, "limits.timeout"),
    ({"exec": {"kind": "python:3", "code": CODE}, "limits": {"memory": 100000}}, "limits.memory must be a whole number from 128 to 512 MB"),
    ({"exec": {"kind": "python:3", "code": CODE}, "limits": {"concurrency": 0}}, "limits.concurrency"),
    ({"exec": {"kind": "python:3", "code": CODE}, "limits": {"logs": 1.5}}, "limits.logs"),
    ({"exec": {"kind": "python:3", "code": CODE}, "limits": {"timeout": True}}, "limits.timeout"),
    ({"exec": {"kind": "python:3", "code": CODE}, "limits": [1]}, "'limits' must be an object"),
    ({"exec": {"kind": "python:3", "code": CODE}, "parameters": {"a": 1}}, "'parameters' must be an array"),
    ({"exec": {"kind": "python:3", "code": CODE}, "parameters": [{"value": 1}]}, "'parameters[0]' must be an object"),
    ({"exec": {"kind": "python:3", "code": CODE}, "annotations": [{"key": "model", "value": 5}]}, "'model' annotation"),
    ({"exec": {"kind": "python:3", "code": CODE}, "annotations": [{"key": "model", "value": "[\"a\", 1]"}]}, "'model' annotation"),
    ({"exec": {"kind": "python:3", "code": CODE}, "annotations": [{"key": "model", "value": "../m"}]}, "no '/'"),
    ({"exec": {"kind": "python:3", "code": CODE}, "annotations": [{"key": "model", "value": "m" * 201}]}, "over the limit"),
    ({"exec": {"kind": "python:3", "code": CODE},
      "annotations": [{"key": "model", "value": [f"m{i}" for i in range(17)]}]}, "more than the 16"),
    ({"exec": {"kind": "python:3", "code": CODE}, "version": "1.0"}, "MAJOR.MINOR.PATCH"),
    ({"exec": {"kind": "python:3", "code": CODE}, "publish": "no"}, "publish must be a boolean"),
])
def test_malformed_actions_get_400(controller, body, fragment):
    api = controller()
    assert_error(api.call("PUT", "/api/v1/namespaces/_/actions/bad", json=body), 400, fragment)
    assert api.redis.hget("torpor:actions:guest", "bad") is None


def test_out_of_range_numbers_and_lone_surrogates_in_an_action_are_a_400(controller):
    api = controller()
    for body, fragment in [
        (b'{"exec": {"kind": "python:3", "code": "x"}, "parameters": [{"key": "k", "value": 1e400}]}',
         "out of the range of a double"),
        (b'{"exec": {"kind": "python:3", "code": "x"}, "annotations": [{"key": "model", "value": "\\ud800"}]}',
         "lone surrogate"),
    ]:
        response = api.call("PUT", "/api/v1/namespaces/_/actions/odd", data=body,
                            headers={"Content-Type": "application/json"})
        assert_error(response, 400, fragment)
    assert api.redis.hget("torpor:actions:guest", "odd") is None


def test_a_models_annotation_is_deduplicated_into_the_message(controller, redis_url):
    api = controller()
    add_node(api.redis, "n1")
    body = {"exec": {"kind": "python:3", "code": CODE}, "annotations": [{"key": "model", "value": ["a", "b", "a"]}]}
    assert api.call("PUT", "/api/v1/namespaces/_/actions/twice", json=body).status_code == 200
    assert api.call("POST", "/api/v1/namespaces/_/actions/twice").status_code == 202
    (message,) = api.redis.lrange(state.queue_key("n1"), 0, -1)
    assert json.loads(message)["models"] == ["a", "b"]


def test_no_free_slot_on_live_nodes_is_a_503_of_its_own(controller):
    api = controller(device_slots=1)
    add_node(api.redis, "n1", resident=[["m"]])
    body = {"exec": {"kind": "python:3", "code": CODE}, "annotations": [{"key": "model", "value": "m"}]}
    assert api.call("PUT", "/api/v1/namespaces/_/actions/busy", json=body).status_code == 200
    assert api.call("POST", "/api/v1/namespaces/_/actions/busy").status_code == 202  # books the one slot
    body = assert_error(api.call("POST", "/api/v1/namespaces/_/actions/busy"), 503, "activation slots booked")
    assert api.redis.zcard("torpor:activations:guest") == 1  # the refused one left no record
    api.redis.delete(state.alive_key("n1"))
    assert_error(api.call("POST", "/api/v1/namespaces/_/actions/busy"), 503, "No invoker is available")


@pytest.mark.parametrize("path, status, fragment", [
    ("/api/v1/namespaces/_/actions/pkg/act", 400, "Packages are not supported"),
    ("/api/v1/namespaces/_/actions/-dash-first", 400, "illegal characters"),
    ("/api/v1/namespaces/_/actions/trailing%20", 400, "illegal characters"),
    ("/api/v1/namespaces/_/actions/" + "x" * 257, 400, "illegal characters"),
])
def test_bad_action_names(controller, path, status, fragment):
    api = controller()
    for method in ("GET", "PUT", "POST", "DELETE"):
        assert_error(api.call(method, path, json={"exec": {"kind": "python:3", "code": CODE}}), status, fragment)


def test_unknown_routes_and_methods_are_json(controller):
    api = controller()
    assert_error(api.call("GET", "/nothing/here"), 404, "does not exist")
    assert_error(api.call("GET", "/api/v1/namespaces/_/widgets"), 404, "does not exist")
    assert_error(api.call("GET", "/api/v1/namespaces/_/widgets", auth=None), 401)
    api.create("hello")
    patched = api.call("PATCH", "/api/v1/namespaces/_/actions/hello")
    assert_error(patched, 405, "method is not allowed")
    assert "PUT" in patched.headers["Allow"]
    for collection in ("packages", "triggers", "rules"):
        assert api.call("GET", f"/api/v1/namespaces/_/{collection}").json() == []


def test_namespaces_are_isolated(controller):
    api = controller()
    assert api.create("mine").status_code == 200
    assert_error(api.call("GET", "/api/v1/namespaces/_/actions/mine", auth=OTHER), 404)
    assert api.call("GET", "/api/v1/namespaces/_/actions", auth=OTHER).json() == []
    for method in ("GET", "PUT", "POST", "DELETE"):
        assert_error(api.call(method, "/api/v1/namespaces/guest/actions/mine", auth=OTHER), 403, "not authorized")
    assert_error(api.call("GET", "/api/v1/namespaces/guest/activations", auth=OTHER), 403)
    assert api.create("mine", auth=OTHER).status_code == 200
    assert api.call("GET", "/api/v1/namespaces/other/actions/mine", auth=OTHER).json()["namespace"] == "other"
    assert api.call("GET", "/api/v1/namespaces/_/actions/mine").json()["namespace"] == "guest"


# --- request bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("body, fragment", [
    (b"   \n", "only whitespace"),
    (b'{"a": 1}\x00', "NUL byte"),
    (b'{"a": [1, 2', "truncated"),
    (b'{"a": }', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, not an array"),
    (b'"text"', "not a string"),
    (b"null", "not null"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": NaN}', "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "too deeply"),
    (b'{"a": 1e400}', "out of the range of a double"),
    (b'{"a": -1e400}', "out of the range of a double"),
])
def test_malformed_invoke_bodies_get_400(controller, invoker, body, fragment):
    api = controller()
    api.create("hello")
    response = api.call("POST", "/api/v1/namespaces/_/actions/hello", data=body,
                        headers={"Content-Type": "application/json"})
    assert_error(response, 400, fragment)
    assert api.redis.zcard("torpor:activations:guest") == 0


def test_payload_over_the_limit_gets_413(controller, invoker):
    api = controller(max_payload_bytes=1000)
    api.create("hello")
    big = json.dumps({"x": "y" * 2000}).encode()
    response = api.call("POST", "/api/v1/namespaces/_/actions/hello", data=big,
                        headers={"Content-Type": "application/json"})
    assert_error(response, 413, "1000 bytes")
    chunked = api.call("POST", "/api/v1/namespaces/_/actions/hello", data=iter([big[:900], big[900:]]),
                       headers={"Content-Type": "application/json"})
    assert_error(chunked, 413, "1000 bytes")
    # Action bodies have their own, larger limit (code is bigger than parameters).
    assert api.create("bigger", exec={"kind": "python:3", "code": "#" * 5000}).status_code == 200


# --- node choice ---------------------------------------------------------------------------

def test_pick_prefers_live_nodes(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    picker = NodePicker(r)
    assert picker.dispatch({"activationId": "x", "models": []}) is None
    add_node(r, "dead", alive_ms=None)
    add_node(r, "short-lived", alive_ms=150)
    assert picker.dispatch({"activationId": "a1", "models": []}) == "short-lived"
    time.sleep(0.3)
    assert picker.dispatch({"activationId": "a2", "models": []}) is None
    assert r.llen(state.queue_key("dead")) == 0 and r.llen(state.queue_key("short-lived")) == 1
    add_node(r, "live")
    assert picker.dispatch({"activationId": "a3", "models": []}) == "live"
    assert json.loads(r.lindex(state.queue_key("live"), 0)) == {"activationId": "a3", "models": []}


# Scoring by predicted latency (locality, busy devices, bookings) is tested in tests/test_routing.py.


def test_the_controllers_predictor_is_seeded_from_its_profiles_setting(redis_url, tmp_path):
    from controller_plugin.api import Controller
    profiles = tmp_path / "h200-swap.json"
    profiles.write_text(json.dumps({"models": {"resnet50": {"bytes": 102_000_000, "served_warm_ms": 0.9}}}))
    controller = Controller(ControllerSettings(redis_url=redis_url, profiles=str(profiles), gpu_kind="NVIDIA H200",
                                               device_slots=2))
    picker = controller.picker
    controller.stop()
    assert picker.kind == "NVIDIA H200" and picker.default_slots == 2
    assert picker.predictor.exec_ms("resnet50", "NVIDIA H200") == 0.9
    assert picker.predictor.profile("resnet50", "NVIDIA H200").bytes == 102_000_000
    plain = Controller(ControllerSettings(redis_url=redis_url))
    unseeded = plain.picker
    plain.stop()
    assert unseeded.predictor.exec_ms("resnet50") == unseeded.predictor.default_exec_ms != 0.9


@pytest.mark.parametrize("env, fragment", [
    ({"TORPOR_CONTROLLER_PROFILES": "/no/such/file.json"}, "TORPOR_CONTROLLER_PROFILES"),
    ({"TORPOR_DEVICE_SLOTS": "-1"}, "must be >= 0"),
])
def test_the_controller_refuses_bad_profiles_and_slots_at_start(redis_url, env, fragment):
    from click.testing import CliRunner
    from controller_plugin.api import command
    result = CliRunner().invoke(command, ["--redis-url", redis_url], env=env)
    assert result.exit_code == 2 and fragment in result.output


def test_pick_is_atomic_under_concurrency(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    add_node(r, "n1")
    add_node(r, "n2")
    add_node(r, "n3")
    picker = NodePicker(r)
    chosen: list[str] = []
    lock = threading.Lock()

    def pick_many(worker: int) -> None:
        for i in range(20):
            node = picker.dispatch({"activationId": f"{worker}-{i}", "models": []})
            with lock:
                chosen.append(node)

    threads = [threading.Thread(target=pick_many, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lengths = [r.llen(state.queue_key(n)) for n in ("n1", "n2", "n3")]
    # Each pick sees the queues as the previous pick left them: perfectly balanced.
    assert lengths == [40, 40, 40]
    assert sorted(chosen) == sorted(["n1"] * 40 + ["n2"] * 40 + ["n3"] * 40)
    queued = {json.loads(m)["activationId"] for n in ("n1", "n2", "n3") for m in r.lrange(state.queue_key(n), 0, -1)}
    assert len(queued) == 120


# --- invoking ------------------------------------------------------------------------------

def test_invoke_without_live_node_gets_503(controller):
    api = controller()
    api.create("hello")
    add_node(api.redis, "gone", alive_ms=None)
    response = api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true", json={})
    assert_error(response, 503, "No invoker is available")
    assert api.redis.zcard("torpor:activations:guest") == 0
    assert api.redis.zcard(state.running_key("guest")) == 0
    assert api.redis.keys("torpor:activation:*") == []


def test_invoke_unknown_action_gets_404(controller, invoker):
    api = controller()
    invoker()
    assert_error(api.call("POST", "/api/v1/namespaces/_/actions/missing?blocking=true"), 404, "does not exist")


def test_nonblocking_invoke_queues_the_message(controller):
    api = controller()
    add_node(api.redis, "node-a")
    api.create("hello", parameters=[{"key": "greeting", "value": "hi"}, {"key": "n", "value": 1}],
               annotations=[{"key": "model", "value": ["resnet50", "bert"]}], limits={"timeout": 2000})
    before = state_now()
    response = api.call("POST", "/api/v1/namespaces/_/actions/hello", json={"n": 2, "extra": [1]})
    assert response.status_code == 202, response.text
    activation_id = response.json()["activationId"]
    assert response.json() == {"activationId": activation_id}
    assert response.headers["X-OpenWhisk-Activation-Id"] == activation_id
    assert len(activation_id) == 32 and int(activation_id, 16) >= 0

    message = json.loads(api.redis.rpop(state.queue_key("node-a")))
    assert message == {**message, "activationId": activation_id, "namespace": "guest", "action": "hello",
                       "version": "0.0.1", "params": {"greeting": "hi", "n": 2, "extra": [1]},
                       "models": ["resnet50", "bert"], "gpu": None, "timeout_ms": 2000, "attempt": 1,
                       "subject": "guest", "blocking": False}
    assert before <= message["submitted"] <= state_now()
    assert message["deadline"] == message["submitted"] + 2000 + api.settings.blocking_margin_ms

    pending = json.loads(api.redis.get(state.activation_key(activation_id)))
    assert pending["response"]["status"] == "pending" and pending["end"] == 0
    assert 0 < api.redis.ttl(state.activation_key(activation_id)) <= 7 * 24 * 3600
    assert api.redis.zscore("torpor:activations:guest", activation_id) == message["submitted"]
    # Pending activations do not exist yet for clients (they poll until they do).
    assert_error(api.call("GET", f"/api/v1/namespaces/_/activations/{activation_id}"), 404)
    assert api.call("GET", "/api/v1/namespaces/_/activations").json() == []


def test_model_annotation_forms(controller):
    api = controller()
    add_node(api.redis, "node-a")
    for name, value, models in (("one", "resnet50", ["resnet50"]), ("json", '["a", "b"]', ["a", "b"]),
                                ("none", None, [])):
        annotations = [{"key": "model", "value": value}] if value is not None else []
        api.create(name, annotations=annotations)
        assert api.call("POST", f"/api/v1/namespaces/_/actions/{name}").status_code == 202
        assert json.loads(api.redis.rpop(state.queue_key("node-a")))["models"] == models


def test_blocking_invoke_returns_the_record(controller, invoker):
    api = controller()
    inv = invoker()
    api.create("hello", parameters=[{"key": "greeting", "value": "hi"}])
    response = api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true", json={"name": "Ada"})
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["activationId"] == response.headers["X-OpenWhisk-Activation-Id"]
    assert record["response"] == {"status": "success", "statusCode": 0, "success": True,
                                  "result": {"echo": {"greeting": "hi", "name": "Ada"}}}
    assert record["namespace"] == "guest" and record["name"] == "hello" and record["version"] == "0.0.1"
    assert record["subject"] == "guest" and record["duration"] == 7 and record["end"] == record["start"] + 7
    assert record["logs"] == ["2024-01-01T00:00:00Z stdout: hello"]
    keys = {a["key"]: a["value"] for a in record["annotations"]}
    assert keys["path"] == "guest/hello" and keys["kind"] == "python:3" and keys["initTime"] == 3
    assert keys["limits"]["timeout"] == 60000 and keys["waitTime"] >= 0
    assert inv.messages[0]["blocking"] is True
    # The in-flight slot was given back.
    assert api.redis.zcard(state.running_key("guest")) == 0

    result = api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true&result=true", json={"a": 1})
    assert result.status_code == 200 and result.json() == {"echo": {"greeting": "hi", "a": 1}}

    failed = api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true", json={"fail": "boom"})
    assert failed.status_code == 502
    assert failed.json()["response"] == {"status": "application error", "statusCode": 1, "success": False,
                                         "result": {"error": "boom"}}
    failed_result = api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true&result=true",
                             json={"fail": "boom"})
    assert failed_result.status_code == 502 and failed_result.json() == {"error": "boom"}

    # An empty body is {}.
    empty = api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true&result=true")
    assert empty.status_code == 200 and empty.json() == {"echo": {"greeting": "hi"}}


def test_blocking_invoke_that_times_out_gets_202(controller, invoker):
    api = controller(blocking_margin_ms=100)
    invoker(delay_s=2.0)
    api.create("slow", limits={"timeout": 200})
    began = time.monotonic()
    response = api.call("POST", "/api/v1/namespaces/_/actions/slow?blocking=true", json={})
    waited = time.monotonic() - began
    assert response.status_code == 202 and set(response.json()) == {"activationId"}
    assert 0.25 <= waited < 1.8
    activation_id = response.json()["activationId"]
    assert_error(api.call("GET", f"/api/v1/namespaces/_/activations/{activation_id}"), 404)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = api.call("GET", f"/api/v1/namespaces/_/activations/{activation_id}")
        if got.status_code == 200:
            break
        time.sleep(0.1)
    assert got.status_code == 200 and got.json()["response"]["success"] is True


def test_blocking_wait_is_capped(controller, invoker):
    api = controller(max_blocking_wait_ms=300)
    invoker(delay_s=1.5)
    api.create("hello")
    began = time.monotonic()
    assert api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true").status_code == 202
    assert time.monotonic() - began < 1.4
    began = time.monotonic()
    assert api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true&timeout=100").status_code == 202
    assert time.monotonic() - began < 1.0
    assert_error(api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=true&timeout=301"), 400,
                 "up to 300")
    assert_error(api.call("POST", "/api/v1/namespaces/_/actions/hello?blocking=maybe"), 400, "true or false")


def test_final_parameters_cannot_be_overridden(controller, invoker):
    api = controller()
    invoker()
    api.create("locked", parameters=[{"key": "k", "value": 1}], annotations=[{"key": "final", "value": True}])
    assert_error(api.call("POST", "/api/v1/namespaces/_/actions/locked", json={"k": 2}), 400, "not allowed")
    assert api.call("POST", "/api/v1/namespaces/_/actions/locked?blocking=true&result=true",
                    json={"j": 2}).json() == {"echo": {"k": 1, "j": 2}}


# --- throttling ----------------------------------------------------------------------------

def test_per_minute_limit_gets_429(controller):
    api = controller(invocations_per_minute=3)
    add_node(api.redis, "node-a")
    api.create("hello")
    # Stay inside one clock minute, so the window cannot roll over during the test.
    if 60000 - state_now() % 60000 < 2000:
        time.sleep(2.1)
    for _ in range(3):
        assert api.call("POST", "/api/v1/namespaces/_/actions/hello").status_code == 202
    assert_error(api.call("POST", "/api/v1/namespaces/_/actions/hello"), 429,
                 "Too many requests in the last minute (count: 4, allowed: 3).")
    assert api.redis.zcard(state.running_key("guest")) == 3 and len(api.redis.keys(state.activation_key("*"))) == 3
    # Another namespace has its own budget.
    api.create("hello", auth=OTHER)
    assert api.call("POST", "/api/v1/namespaces/_/actions/hello", auth=OTHER).status_code == 202


def test_concurrent_limit_gets_429_until_a_slot_frees(controller):
    api = controller(concurrent_limit=2)
    add_node(api.redis, "node-a")
    api.create("hello")
    ids = [api.call("POST", "/api/v1/namespaces/_/actions/hello").json()["activationId"] for _ in range(2)]
    assert_error(api.call("POST", "/api/v1/namespaces/_/actions/hello"), 429,
                 "Too many concurrent requests in flight (count: 2, allowed: 2).")
    # a refused invocation holds no slot and leaves no record behind
    assert sorted(api.redis.zrange(state.running_key("guest"), 0, -1)) == sorted(ids)
    assert sorted(api.redis.keys(state.activation_key("*"))) == sorted(state.activation_key(i) for i in ids)
    pending = state.get_activation(api.redis, ids[0])
    start = state_now()
    state.finish_activation(api.redis, state.final_record(pending, 0, {}, start_ms=start, end_ms=start + 1))
    assert api.call("POST", "/api/v1/namespaces/_/actions/hello").status_code == 202


# --- activations ---------------------------------------------------------------------------

def test_activation_list_get_result_logs(controller, invoker):
    api = controller()
    invoker()
    api.create("alpha")
    api.create("beta")
    ids = []
    for name, params in (("alpha", {"i": 0}), ("beta", {"i": 1}), ("alpha", {"fail": "no"}), ("alpha", {"i": 3})):
        response = api.call("POST", f"/api/v1/namespaces/_/actions/{name}?blocking=true", json=params)
        ids.append(response.json()["activationId"])
        time.sleep(0.005)

    listed = api.call("GET", "/api/v1/namespaces/_/activations").json()
    assert [a["activationId"] for a in listed] == ids[::-1]
    assert "response" not in listed[0] and "logs" not in listed[0]
    assert [a["statusCode"] for a in listed] == [0, 1, 0, 0]
    assert listed[0]["name"] == "alpha" and listed[0]["duration"] == 7

    docs = api.call("GET", "/api/v1/namespaces/_/activations?docs=true&limit=1").json()
    assert len(docs) == 1 and docs[0]["response"]["result"] == {"echo": {"i": 3}}
    alpha = api.call("GET", "/api/v1/namespaces/_/activations?name=alpha&skip=1&limit=5").json()
    assert [a["activationId"] for a in alpha] == [ids[2], ids[0]]
    assert api.call("GET", "/api/v1/namespaces/_/activations?count=true&name=alpha").json() == {"activations": 3}
    since = int(api.redis.zscore("torpor:activations:guest", ids[1]))
    upto = int(api.redis.zscore("torpor:activations:guest", ids[2]))
    ranged = api.call("GET", f"/api/v1/namespaces/_/activations?since={since}&upto={upto}").json()
    assert [a["activationId"] for a in ranged] == [ids[2], ids[1]]
    assert_error(api.call("GET", "/api/v1/namespaces/_/activations?since=yesterday"), 400, "not an integer")
    assert_error(api.call("GET", "/api/v1/namespaces/_/activations?count=true&docs=true"), 400, "'docs'")

    record = api.call("GET", f"/api/v1/namespaces/_/activations/{ids[2]}").json()
    assert record["response"]["status"] == "application error"
    assert api.call("GET", f"/api/v1/namespaces/guest/activations/{ids[2]}/result").json() == {
        "status": "application error", "statusCode": 1, "success": False, "result": {"error": "no"}}
    assert api.call("GET", f"/api/v1/namespaces/_/activations/{ids[2]}/logs").json() == {
        "logs": ["2024-01-01T00:00:00Z stdout: hello"]}

    assert_error(api.call("GET", "/api/v1/namespaces/_/activations/not-an-id"), 400, "32 hexadecimal")
    assert_error(api.call("GET", f"/api/v1/namespaces/_/activations/{'0' * 32}"), 404)
    assert_error(api.call("GET", f"/api/v1/namespaces/_/activations/{ids[0]}", auth=OTHER), 404)
    assert_error(api.call("GET", f"/api/v1/namespaces/_/activations/{ids[0]}/result", auth=OTHER), 404)
    assert api.call("GET", "/api/v1/namespaces/_/activations", auth=OTHER).json() == []


def test_finish_activation_contract(redis_url):
    r = redis.Redis.from_url(redis_url)  # bytes client, as another process may use
    action = {"namespace": "guest", "name": "a", "version": "0.0.1", "exec": {"kind": "python:3"},
              "limits": {"timeout": 100}}
    pending = state.pending_record("ab" * 16, action, "guest", 1000)
    state.put_pending(r, pending)
    r.zadd(state.running_key("guest"), {"ab" * 16: 10**15})
    with pytest.raises(ValueError, match="not final"):
        state.finish_activation(r, pending)
    with pytest.raises(ValueError, match="0..3"):
        state.final_record(pending, 7, {}, start_ms=1000, end_ms=1001)
    with pytest.raises(ValueError, match="before start"):
        state.final_record(pending, 0, {}, start_ms=1000, end_ms=999)
    final = state.final_record(pending, state.DEVELOPER_ERROR, {"error": "bad"}, start_ms=1010, end_ms=1020,
                               wait_time_ms=10)
    state.finish_activation(r, final)
    assert json.loads(r.get(state.activation_key("ab" * 16))) == final
    assert final["response"] == {"status": "action developer error", "statusCode": 2, "success": False,
                                 "result": {"error": "bad"}}
    assert 0 < r.ttl(state.activation_key("ab" * 16)) <= state.ACTIVATION_TTL_S
    assert r.lrange(state.done_key("ab" * 16), 0, -1) == [b"ab" * 16]
    assert 0 < r.ttl(state.done_key("ab" * 16)) <= 300
    assert r.zcard(state.running_key("guest")) == 0
    assert state.wait_done(r, "ab" * 16, 50) == final
    assert state.wait_done(r, "ab" * 16, 50) is None
    assert [rec["activationId"] for rec in state.iter_activations(r, "guest")] == ["ab" * 16]
    # a blocking activation's marker carries the record: the waiter reads nothing else
    state.finish_activation(r, final, blocking=True)
    assert json.loads(r.lrange(state.done_key("ab" * 16), 0, -1)[0]) == final
    r.delete(state.activation_key("ab" * 16))
    assert state.wait_done(r, "ab" * 16, 50) == final


# --- dead nodes ----------------------------------------------------------------------------

def test_work_of_dead_nodes_is_requeued(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    picker = NodePicker(r)
    now = state_now()
    action = {"namespace": "guest", "name": "a", "version": "0.0.1", "exec": {"kind": "python:3"},
              "limits": {"timeout": 1000}}

    def orphan(activation_id: str, where: str, attempt: int = 1, deadline: int = now + 60000) -> None:
        state.put_pending(r, state.pending_record(activation_id, action, "guest", now))
        message = {"activationId": activation_id, "namespace": "guest", "action": "a", "params": {},
                   "models": [], "attempt": attempt, "deadline": deadline}
        r.lpush(state.inflight_key("dead") if where == "inflight" else state.queue_key("dead"), json.dumps(message))

    add_node(r, "dead", alive_ms=None, last_seen=now - 60000)
    add_node(r, "lagging", alive_ms=None, last_seen=now - 1000)  # alive key lapsed, seen recently
    r.lpush(state.queue_key("lagging"), json.dumps({"activationId": "c" * 32}))
    orphan("1" * 32, "inflight")
    orphan("2" * 32, "queue")
    orphan("3" * 32, "queue", attempt=3)
    orphan("4" * 32, "queue", deadline=now - 1)

    # No live node: nothing moves, nothing is lost.
    assert requeue_from_dead_nodes(r, picker, now_ms=now, dead_after_ms=10000, max_attempts=3) == 0
    assert r.llen(state.inflight_key("dead")) + r.llen(state.queue_key("dead")) == 4

    add_node(r, "live")
    assert requeue_from_dead_nodes(r, picker, now_ms=now, dead_after_ms=10000, max_attempts=3) == 2
    moved = [json.loads(m) for m in r.lrange(state.queue_key("live"), 0, -1)]
    assert sorted((m["activationId"], m["attempt"]) for m in moved) == [("1" * 32, 2), ("2" * 32, 2)]
    for lost in ("3" * 32, "4" * 32):
        record = state.get_activation(r, lost)
        assert record["response"]["status"] == "whisk internal error" and "dead" in record["response"]["result"]["error"]
        assert r.llen(state.done_key(lost)) == 1
    assert r.llen(state.queue_key("dead")) == 0 and r.llen(state.inflight_key("dead")) == 0
    assert r.llen(state.queue_key("lagging")) == 1


def test_controller_requeues_in_the_background(controller):
    api = controller(requeue_interval_ms=50, node_dead_after_ms=1000)
    api.create("hello")
    add_node(api.redis, "doomed")
    activation_id = api.call("POST", "/api/v1/namespaces/_/actions/hello").json()["activationId"]
    assert api.redis.llen(state.queue_key("doomed")) == 1
    api.redis.delete(state.alive_key("doomed"))
    api.redis.hset(state.node_key("doomed"), "last_seen", state_now() - 5000)
    add_node(api.redis, "heir")
    deadline = time.monotonic() + 5
    while api.redis.llen(state.queue_key("heir")) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    message = json.loads(api.redis.lindex(state.queue_key("heir"), 0))
    assert message["activationId"] == activation_id and message["attempt"] == 2


# --- torpor controller ---------------------------------------------------------------------

def test_torpor_controller_serves_with_gunicorn(redis_url, tmp_path):
    port = free_port()
    env = {**os.environ, "TORPOR_REDIS_URL": redis_url, "TORPOR_CONTROLLER_PORT": str(port)}
    torpor = Path(sys.executable).parent / "torpor"
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(torpor), "controller", "--threads", "4"], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    if requests.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            assert requests.get(base + "/api/v1/namespaces", auth=GUEST, timeout=5).json() == ["guest"]
            assert requests.get(base + "/api/v1/namespaces", auth=(GUEST[0], "x"), timeout=5).status_code == 401
            # an idle connection outlives gunicorn's default keep-alive (2 s): a client reusing
            # it must not meet a connection closed under its request
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            for pause in (0, 2.5):
                time.sleep(pause)
                conn.request("GET", "/readyz")
                response = conn.getresponse()
                assert response.status == 200 and response.read()
            conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    logged = log_path.read_text()
    assert "gthread" in logged and "/api/v1/namespaces" in logged
    assert GUEST[0] not in logged and GUEST[1] not in logged


def test_torpor_controller_rejects_malformed_credentials():
    torpor = Path(sys.executable).parent / "torpor"
    done = subprocess.run([str(torpor), "controller", "--auth", "secretpart-without-colon"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "entry 1" in done.stderr and "secretpart" not in done.stderr
