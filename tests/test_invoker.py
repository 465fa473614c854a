"""The invoker against a real redis-server and real ``torpor runtime`` processes: activation
messages go onto the node's queue, final records come back through the done list."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import redis
import requests

from runtime.gpu_server import protocol
from runtime.invoker.config import InvokerSettings
from runtime.invoker.containers import SENTINEL, LogStream
from runtime.invoker.invoker import Invoker
from runtime.redis_server import free_port

NODE = "test-node"
QUEUE, INFLIGHT = f"torpor:node:{NODE}:queue", f"torpor:node:{NODE}:inflight"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (stdout|stderr): ")

ECHO = """
import os, sys
AT_IMPORT = os.environ.get("SECRET")
def main(args):
    print("hello stdout")
    print("hello stderr", file=sys.stderr)
    names = ("__OW_ACTIVATION_ID", "__OW_API_HOST", "TORPOR_GPU_SOCKET", "TORPOR_REDIS_URL")
    env = {k: os.environ.get(k) for k in names}
    return {"echo": args, "pid": os.getpid(), "secret": AT_IMPORT, "env": env, "cwd": os.getcwd()}
"""
SLEEPY = """
import os, time
def main(args):
    time.sleep(args.get("sleep", 0))
    return {"pid": os.getpid()}
"""


@pytest.fixture
def r(redis_url):
    # redis-py's default 5 s socket timeout would cut BLPOP short
    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    yield client
    client.close()


@pytest.fixture
def make_invoker(redis_url, tmp_path):
    started = []

    def make(**overrides) -> Invoker:
        settings = InvokerSettings(**{"redis_url": redis_url, "node_id": NODE,
                                      "gpu_socket": str(tmp_path / "gpu.sock"), **overrides})
        invoker = Invoker(settings).start()
        started.append(invoker)
        return invoker

    yield make
    for invoker in started:
        invoker.stop()


def put_action(r, name, code, *, ns="guest", version="0.0.1", binary=False, main="main", limits=None,
               parameters=None) -> dict:
    record = {"namespace": ns, "name": name, "version": version,
              "exec": {"kind": "python:3", "code": code, "binary": binary, "main": main},
              "parameters": parameters or [], "annotations": [],
              "limits": {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1, **(limits or {})},
              "publish": False, "updated": int(time.time() * 1000)}
    r.hset(f"torpor:actions:{ns}", name, json.dumps(record))
    return record


def message(name, params=None, *, ns="guest", version="0.0.1", revision=None, timeout_ms=None, models=()) -> dict:
    now = int(time.time() * 1000)
    return {"activationId": uuid.uuid4().hex, "namespace": ns, "action": name, "version": version, "revision": revision,
            "params": params if params is not None else {}, "models": list(models), "gpu": None,
            "timeout_ms": timeout_ms, "deadline": now + 60000, "submitted": now, "attempt": 1,
            "subject": ns, "blocking": True}


def submit(r, name, params=None, **kw) -> str:
    msg = message(name, params, **kw)
    r.lpush(QUEUE, json.dumps(msg))
    return msg["activationId"]


def record_of(r, activation_id, timeout_s=30) -> dict:
    assert r.blpop(f"torpor:activation:{activation_id}:done", timeout_s), f"no record for {activation_id}"
    return json.loads(r.get(f"torpor:activation:{activation_id}"))


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    """Polls ``condition`` until it holds or ``timeout_s`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


def gone(pid: int, timeout_s: float = 3.0) -> bool:
    """True once process ``pid`` has exited (a zombie left to an init that does not reap counts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def annotations(record) -> dict:
    return {a["key"]: a["value"] for a in record["annotations"]}


def test_log_stream_splits_at_sentinels_and_survives_a_late_one():
    read_end, write_end = os.pipe()
    stream = LogStream("stdout", os.fdopen(read_end, "rb"), limit_bytes=1000)
    writer = os.fdopen(write_end, "wb", buffering=0)
    writer.write(f"one\ntwo{SENTINEL}\n".encode())
    assert [t for _, t in stream.take(time.monotonic() + 2).lines] == ["one", "two"]
    # the sentinel of the next activation is late: its lines are taken without it...
    writer.write(b"three\n")
    time.sleep(0.1)
    assert [t for _, t in stream.take(time.monotonic() + 0.05).lines] == ["three"]
    # ...and what arrives before that sentinel does not leak into the activation after it
    writer.write(f"late\n{SENTINEL}\nfour\n{SENTINEL}\n".encode())
    assert [t for _, t in stream.take(time.monotonic() + 2).lines] == ["four"]
    writer.write(("x" * 600 + "\n").encode() * 2 + f"{SENTINEL}\n".encode())
    segment = stream.take(time.monotonic() + 2)
    assert len(segment.lines) == 1 and segment.truncated
    writer.close()
    stream.join(2)


def test_a_result_is_stored_as_the_runtime_wrote_it():
    from controller_plugin import state
    from runtime.invoker.invoker import interpret

    outcome = interpret(200, b'{"x": [0.1, 2], "s": "\\u00e9"}')
    assert outcome.result == {"x": [0.1, 2], "s": "\u00e9"} and outcome.result_json == '{"x": [0.1, 2], "s": "\\u00e9"}'
    record = {"activationId": "a" * 32, "namespace": "guest", "name": "a", "start": 1, "end": 2, "logs": ["x"],
              "annotations": [{"key": "path", "value": "guest/a"}], "response": state.response_for(0, outcome.result)}
    assert json.loads(state.record_json(record, outcome.result_json)) == record
    # what json.loads reads but JSON text may not hold is encoded again, as are errors
    assert interpret(200, b"\xef\xbb\xbf{\"a\": 1}").result_json is None
    assert interpret(200, '{"a": 1}'.encode("utf-16")).result_json is None
    for encoding in ("utf-16-le", "utf-32-be"):  # no byte order mark: its NULs decode as UTF-8
        assert interpret(200, '{"a": 1}'.encode(encoding)).result_json is None
    assert interpret(200, b'{"error": "no"}').result_json is None


def test_code_action_success_record_and_logs(r, make_invoker, redis_url, monkeypatch):
    monkeypatch.setenv("TORPOR_REDIS_URL", redis_url)
    invoker = make_invoker()
    put_action(r, "echo", ECHO, parameters=[{"key": "greeting", "value": "hi"},
                                            {"key": "SECRET", "value": "s3", "init": True}])
    aid = submit(r, "echo", {"name": "❄ ☃"})
    rec = record_of(r, aid)
    result = rec["response"].pop("result")
    assert rec["response"] == {"status": "success", "statusCode": 0, "success": True}
    assert result["echo"] == {"greeting": "hi", "name": "❄ ☃"} and result["secret"] == "s3"
    assert result["env"] == {"__OW_ACTIVATION_ID": aid, "__OW_API_HOST": invoker.settings.api_host,
                             "TORPOR_GPU_SOCKET": invoker.gpu_socket, "TORPOR_REDIS_URL": None}
    assert (rec["activationId"], rec["namespace"], rec["name"], rec["version"], rec["subject"]) == \
        (aid, "guest", "echo", "0.0.1", "guest")
    assert rec["end"] >= rec["start"] and rec["duration"] == rec["end"] - rec["start"]
    assert sorted(line.split(" ", 1)[1] for line in rec["logs"]) == ["stderr: hello stderr", "stdout: hello stdout"]
    assert all(LOG_LINE.match(line) for line in rec["logs"])
    assert not any(SENTINEL in line for line in rec["logs"])
    notes = annotations(rec)
    assert notes["path"] == "guest/echo" and notes["kind"] == "python:3"
    assert notes["limits"]["timeout"] == 60000 and notes["waitTime"] >= 0 and notes["initTime"] > 0
    assert r.ttl(f"torpor:activation:{aid}") > 6 * 24 * 3600
    assert wait_until(lambda: r.llen(INFLIGHT) == 0)
    [container] = invoker.pool.containers()
    assert Path(result["cwd"]).parent == Path(container.workdir)


def test_warm_container_is_reused_without_init(r, make_invoker):
    make_invoker()
    put_action(r, "echo", ECHO)
    first = record_of(r, submit(r, "echo", {"n": 1}))
    second = record_of(r, submit(r, "echo", {"n": 2}))
    assert "initTime" in annotations(first) and "initTime" not in annotations(second)
    assert second["response"]["result"]["pid"] == first["response"]["result"]["pid"]
    assert second["response"]["result"]["echo"] == {"n": 2}
    # each activation gets only its own lines
    assert len(second["logs"]) == 2


def test_zip_action(r, make_invoker):
    make_invoker()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__main__.py", "from helper import double\n"
                                   "def main(args):\n    return {'double': double(args['x'])}\n")
        zf.writestr("helper.py", "def double(x):\n    return 2 * x\n")
    put_action(r, "zipped", base64.b64encode(buf.getvalue()).decode(), binary=True)
    rec = record_of(r, submit(r, "zipped", {"x": 21}))
    assert rec["response"]["success"] and rec["response"]["result"] == {"double": 42}


def test_init_failure_is_a_developer_error_and_drops_the_container(r, make_invoker):
    invoker = make_invoker()
    put_action(r, "broken", "def main(args):\n    return {\n")
    rec = record_of(r, submit(r, "broken"))
    assert rec["response"]["status"] == "action developer error" and rec["response"]["statusCode"] == 2
    assert rec["response"]["result"]["error"]
    assert "initTime" in annotations(rec)
    assert not any(SENTINEL in line for line in rec["logs"])
    assert invoker.pool.size() == 0


def test_exception_is_a_developer_error_with_traceback_in_logs(r, make_invoker):
    make_invoker()
    put_action(r, "raiser", "def main(args):\n    raise ValueError('boom')\n")
    rec = record_of(r, submit(r, "raiser"))
    assert rec["response"] == {"status": "action developer error", "statusCode": 2, "success": False,
                               "result": {"error": "boom"}}
    assert any("ValueError: boom" in line and " stderr: " in line for line in rec["logs"])


def test_error_field_is_an_application_error(r, make_invoker):
    make_invoker()
    put_action(r, "refuser", "def main(args):\n    return {'error': 'no such user'}\n")
    rec = record_of(r, submit(r, "refuser"))
    assert rec["response"] == {"status": "application error", "statusCode": 1, "success": False,
                               "result": {"error": "no such user"}}


def test_timeout_kills_the_container_and_the_next_activation_gets_a_fresh_one(r, make_invoker):
    invoker = make_invoker()
    put_action(r, "sleepy", "import sys\n" + SLEEPY.replace("time.sleep", "print('before', flush=True); time.sleep"),
               limits={"timeout": 1000})
    rec = record_of(r, submit(r, "sleepy", {"sleep": 30}))
    assert rec["response"]["statusCode"] == 2
    assert rec["response"]["result"] == {"error": "The action exceeded its time limits of 1000 milliseconds."}
    assert annotations(rec)["timeout"] is True
    assert any(line.endswith("stdout: before") for line in rec["logs"])
    assert invoker.pool.size() == 0
    again = record_of(r, submit(r, "sleepy", {"sleep": 0}))
    assert again["response"]["success"] and "initTime" in annotations(again)


def test_two_concurrent_activations_start_a_second_container(r, make_invoker):
    invoker = make_invoker()
    put_action(r, "sleepy", SLEEPY)
    ids = [submit(r, "sleepy", {"sleep": 1}) for _ in range(2)]
    recs = [record_of(r, aid) for aid in ids]
    assert all(rec["response"]["success"] and "initTime" in annotations(rec) for rec in recs)
    assert recs[0]["response"]["result"]["pid"] != recs[1]["response"]["result"]["pid"]
    assert invoker.pool.size("guest", "sleepy") == 2


def test_container_cap_makes_activations_wait_for_a_free_container(r, make_invoker):
    invoker = make_invoker(max_containers_per_action=1)
    put_action(r, "sleepy", SLEEPY)
    ids = [submit(r, "sleepy", {"sleep": 0.5}) for _ in range(2)]
    first, second = sorted((record_of(r, aid) for aid in ids), key=lambda rec: rec["end"])
    assert first["response"]["result"]["pid"] == second["response"]["result"]["pid"]
    assert "initTime" in annotations(first) and "initTime" not in annotations(second)
    assert second["end"] - first["end"] >= 450
    assert invoker.pool.size() == 1


def test_an_activation_runs_the_revision_it_was_accepted_with(r, make_invoker):
    """OpenWhisk runs the revision it accepted: an update or a delete after the controller
    accepted an activation does not change what it runs (the controller keeps replaced
    revisions, by a revision id of their own: versions can repeat)."""
    from controller_plugin import state
    make_invoker()

    def create(code: str) -> str:
        record = {"namespace": "guest", "name": "versioned", "version": "0.0.1",
                  "exec": {"kind": "python:3", "code": code, "binary": False, "main": "main"}, "parameters": [],
                  "annotations": [], "limits": {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1},
                  "publish": False, "updated": int(time.time() * 1000)}
        assert state.create_action(r, record)
        return record["revision"]

    def update(code: str, version: str | None = None) -> str:
        return state.replace_action(r, "guest", "versioned", lambda current: {
            **current, "version": version or current["version"], "exec": {**current["exec"], "code": code}})["revision"]

    def run(revision: str) -> dict:
        return record_of(r, submit(r, "versioned", revision=revision))["response"]

    first = create("def main(args):\n    return {'v': 1}\n")
    assert run(first)["result"] == {"v": 1}
    second = update("def main(args):\n    return {'v': 2}\n", version="0.0.2")
    third = update("def main(args):\n    return {'v': 3}\n", version="0.0.2")  # the same version again
    assert (run(first)["result"], run(second)["result"], run(third)["result"]) == ({"v": 1}, {"v": 2}, {"v": 3})
    state.delete_action(r, "guest", "versioned")
    assert run(third)["result"] == {"v": 3}  # deleted after it was accepted
    recreated = create("def main(args):\n    return {'v': 'new'}\n")  # 0.0.1 again, another revision
    assert run(first)["result"] == {"v": 1} and run(recreated)["result"] == {"v": "new"}
    r.delete(state.revision_key("guest", "versioned", first))  # as when its time to be kept ran out
    gone = run(first)
    assert gone["statusCode"] == 3 and "no longer kept" in gone["result"]["error"]


def test_a_parsed_revision_is_not_read_again_and_a_new_one_is(r, redis_url, make_invoker):
    """The invoker keeps parsed action records by revision: an activation of a revision
    parsed before, current or kept, reads only the small revision fields from Redis, not the
    record and its code; an update (new revision, the same code) is read and run."""
    from controller_plugin import state
    make_invoker()
    code = "def main(args):\n    return {'v': 1}\n" + "# padding\n" * 100_000  # a 1 MB record
    record = {"namespace": "guest", "name": "big", "version": "0.0.1",
              "exec": {"kind": "python:3", "code": code, "binary": False, "main": "main"}, "parameters": [],
              "annotations": [], "limits": {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1},
              "publish": False, "updated": int(time.time() * 1000)}
    assert state.create_action(r, record)
    first = record["revision"]

    def commands_of(revision: str, timeout_ms: int | None = None) -> tuple[dict, list[str]]:
        """The activation's response and the commands Redis ran meanwhile (MONITOR)."""
        seen, marker = [], uuid.uuid4().hex
        with redis.Redis.from_url(redis_url).monitor() as monitor:
            response = record_of(r, submit(r, "big", revision=revision, timeout_ms=timeout_ms))["response"]
            r.echo(marker)
            while marker not in (command := monitor.next_command()["command"]):
                seen.append(command)
        return response, seen

    def reads_record(commands: list[str]) -> bool:
        return any(c.startswith(("HGET torpor:actions:guest big", "GET torpor:action:guest/big:rev:"))
                   for c in commands)

    response, commands = commands_of(first)
    assert response["result"] == {"v": 1} and reads_record(commands)  # the first activation reads it
    response, commands = commands_of(first)
    assert response["result"] == {"v": 1} and not reads_record(commands)
    assert max(map(len, commands)) < 10_000  # no command carried the code
    second = state.replace_action(r, "guest", "big", lambda current: current)["revision"]  # the same code
    response, commands = commands_of(second)
    assert response["result"] == {"v": 1} and reads_record(commands)
    response, commands = commands_of(first)  # kept now, and parsed while it was current
    assert response["result"] == {"v": 1} and not reads_record(commands)
    for reads in (True, False):  # the kept copy, under another time limit: read once
        response, commands = commands_of(first, timeout_ms=30_000)
        assert response["result"] == {"v": 1} and reads_record(commands) is reads
    state.delete_action(r, "guest", "big")
    response, commands = commands_of(second)  # deleted after it was accepted: still kept
    assert response["result"] == {"v": 1} and not reads_record(commands)
    r.delete(state.revision_key("guest", "big", second))  # as when its time to be kept ran out
    response, _ = commands_of(second)
    assert response["statusCode"] == 3 and "no longer exists" in response["result"]["error"]


def test_a_record_rewritten_in_place_runs_as_rewritten(r, make_invoker):
    """A record written without a revision (not through ``controller_plugin.state``) is read
    on each activation: rewritten under the same name (no revision in the message) it runs
    its new code, and a message's own time limit applies too."""
    make_invoker()
    put_action(r, "inplace", "def main(args):\n    return {'v': 1}\n")
    assert record_of(r, submit(r, "inplace"))["response"]["result"] == {"v": 1}
    put_action(r, "inplace", "import time\ndef main(args):\n    time.sleep(1)\n    return {'v': 2}\n")
    assert record_of(r, submit(r, "inplace"))["response"]["result"] == {"v": 2}
    late = record_of(r, submit(r, "inplace", timeout_ms=300))
    assert late["response"]["statusCode"] == 2 and "300 milliseconds" in late["response"]["result"]["error"]


def test_deleted_action_and_malformed_message(r, make_invoker):
    make_invoker()
    rec = record_of(r, submit(r, "ghost"))
    assert rec["response"]["status"] == "whisk internal error"
    assert "no longer exists" in rec["response"]["result"]["error"]
    r.lpush(QUEUE, b"not json")
    deadline = time.monotonic() + 5
    while (r.llen(QUEUE) or r.llen(INFLIGHT)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.llen(QUEUE) == 0 and r.llen(INFLIGHT) == 0


def test_result_over_the_limit_is_a_developer_error(r, make_invoker):
    make_invoker()
    put_action(r, "big", "def main(args):\n    return {'x': 'a' * (1 << 20)}\n")
    rec = record_of(r, submit(r, "big"))
    assert rec["response"]["statusCode"] == 2 and "1048576 bytes" in rec["response"]["result"]["error"]


def test_logs_are_capped_at_the_log_limit(r, make_invoker):
    make_invoker()
    put_action(r, "chatty", "def main(args):\n    for i in range(30000):\n        print('x' * 99)\n    return {}\n",
               limits={"logs": 1})
    rec = record_of(r, submit(r, "chatty"))
    assert rec["response"]["success"]
    assert "truncated" in rec["logs"][-1] and "1048576 bytes" in rec["logs"][-1]
    assert 9000 < len(rec["logs"]) < 10500


def test_idle_containers_are_stopped(r, make_invoker):
    invoker = make_invoker(idle_timeout_s=0.5)
    put_action(r, "echo", ECHO)
    rec = record_of(r, submit(r, "echo"))
    deadline = time.monotonic() + 5
    while invoker.pool.size() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert invoker.pool.size() == 0
    assert gone(rec["response"]["result"]["pid"])


def test_prefetch_reaches_the_gpu_server_before_the_run(r, make_invoker, tmp_path):
    path = str(tmp_path / "gpu.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    requests_seen = []

    def serve():
        conn, _ = server.accept()
        with conn:
            header, _ = protocol.recv(conn, 0)
            requests_seen.append((time.time(), header))
            protocol.send(conn, {"ok": True, "device": 0})

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    make_invoker(gpu_socket=path)
    put_action(r, "echo", ECHO)
    rec = record_of(r, submit(r, "echo", models=["resnet50"]))
    thread.join(5)
    server.close()
    assert rec["response"]["success"]
    assert [h for _, h in requests_seen] == [{"op": "prefetch", "model": "resnet50"}]
    assert requests_seen[0][0] * 1000 <= rec["start"] + annotations(rec)["initTime"]


def test_prefetch_without_a_gpu_server_is_not_fatal(r, make_invoker, tmp_path):
    make_invoker(gpu_socket=str(tmp_path / "absent.sock"))
    put_action(r, "echo", ECHO)
    assert record_of(r, submit(r, "echo", models=["resnet50"]))["response"]["success"]


def test_stop_requeues_running_activations_and_kills_containers(r, make_invoker):
    invoker = make_invoker(shutdown_grace_s=0.2)
    put_action(r, "sleepy", SLEEPY)
    aid = submit(r, "sleepy", {"sleep": 30})
    deadline = time.monotonic() + 15
    while invoker.pool.size() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    [container] = invoker.pool.containers()
    invoker.stop()
    assert container.proc.poll() is not None
    # the action's unpacked code lived in the container's folder, which is gone
    assert not Path(container.workdir).exists()
    assert r.llen(INFLIGHT) == 0 and [json.loads(m)["activationId"] for m in r.lrange(QUEUE, 0, -1)] == [aid]
    assert r.get(f"torpor:activation:{aid}") is None


def test_messages_left_in_flight_are_recovered_on_start(r, make_invoker):
    put_action(r, "echo", ECHO)
    msg = message("echo", {"left": True})
    r.lpush(INFLIGHT, json.dumps(msg))
    make_invoker()
    assert record_of(r, msg["activationId"])["response"]["result"]["echo"] == {"left": True}


def test_health_endpoints(r, make_invoker):
    port = free_port()
    make_invoker(http_port=port)
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["ok"] is True
    ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_cli_heartbeat_and_clean_stop(r, redis_url, tmp_path):
    torpor = Path(sys.executable).parent / "torpor"
    env = {**os.environ, "TORPOR_REDIS_URL": redis_url, "TORPOR_NODE_ID": NODE,
           "TORPOR_GPU_SOCKET": str(tmp_path / "gpu.sock")}
    output = open(tmp_path / "invoker.log", "wb")
    proc = subprocess.Popen([str(torpor), "invoker"], env=env, stdout=output, stderr=subprocess.STDOUT)
    output.close()
    try:
        alive = f"torpor:node:{NODE}:alive"
        deadline = time.monotonic() + 15
        while not r.exists(alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < r.pttl(alive) <= 3000
        assert r.smembers("torpor:nodes") == {NODE.encode()}
        node = r.hgetall(f"torpor:node:{NODE}")
        assert int(node[b"invoker_pid"]) == proc.pid and node[b"gpu_socket"] == str(tmp_path / "gpu.sock").encode()
        seen = int(node[b"last_seen"])
        time.sleep(1.5)
        assert int(r.hget(f"torpor:node:{NODE}", "last_seen")) > seen and 0 < r.pttl(alive) <= 3000
        put_action(r, "echo", ECHO)
        runtime_pid = record_of(r, submit(r, "echo"))["response"]["result"]["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not r.exists(alive)
        assert gone(runtime_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_containers_of_an_invoker_killed_with_sigkill_stop_by_themselves(r, redis_url, tmp_path):
    torpor = Path(sys.executable).parent / "torpor"
    env = {**os.environ, "TORPOR_REDIS_URL": redis_url, "TORPOR_NODE_ID": NODE,
           "TORPOR_GPU_SOCKET": str(tmp_path / "gpu.sock")}
    with open(tmp_path / "invoker.log", "wb") as output:
        proc = subprocess.Popen([str(torpor), "invoker"], env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        put_action(r, "echo", ECHO)
        runtime_pid = record_of(r, submit(r, "echo"))["response"]["result"]["pid"]
        assert not gone(runtime_pid, 0.1)
        proc.kill()  # no chance to stop its containers
        proc.wait()
        assert wait_until(lambda: gone(runtime_pid), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
