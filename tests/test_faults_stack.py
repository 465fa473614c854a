"""Faults through the whole stack (issue 6, docs/faults.md): ``runtime.up.Stack`` — Redis,
controller, invoker, action runtimes, GPU server on one CPU device — with a node secret and a
200 kB payload limit. Model errors and limits at every layer (case 5), an action timeout
(case 6), callers that give up (case 7), tokens, namespaces and logs (case 11), then the GPU
server killed mid-swap and restarted (case 9) and Redis restarted under load (case 10); those
two run last, as they restart parts of the module's stack."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

import models
from controller_plugin.config import GUEST_AUTH, ControllerSettings
from faults_helpers import TORPOR, register_slow, wait_until
from runtime.action.config import ENVELOPE_BYTES, RuntimeSettings
from runtime.client import GPUServerClient
from runtime.gpu_server import protocol, tokens
from runtime.gpu_server.repository import Repository
from runtime.invoker.config import InvokerSettings
from runtime.redis_server import RedisServer, free_port
from runtime.up import Stack, UpSettings

SECRET = "stack-node-secret-" + "s" * 30
PAYLOAD_LIMIT = 200_000
GUEST = tuple(GUEST_AUTH.split(":", 1))
OTHER = ("5d1b2f0e-0000-4000-8000-0123456789ab", "otherNamespaceKey42")
SMALL = 48  # image side of a quick call of the slow model (~2 ms)

CALL = '''
import os, time
import numpy as np
from runtime.client import Model

def main(args):
    time.sleep(args.get("sleep_before", 0))
    fill = float("nan") if args.get("fill") == "nan" else args.get("fill", 0.5)
    x = np.full(args.get("shape", [1, 3, 32, 32]), fill, dtype=args.get("dtype", "float32"))
    out = Model(args["model"])(x)
    time.sleep(args.get("sleep_after", 0))
    first = out[0] if isinstance(out, tuple) else out
    return {"pid": os.getpid(), "output": first.ravel()[:64].tolist()}
'''
ENV = '''
import os
def main(args):
    return {"payload_limit": os.environ.get("TORPOR_MAX_PAYLOAD_BYTES"),
            "torpor_env": sorted(k for k in os.environ if k.startswith("TORPOR_")),
            "token": os.environ.get("TORPOR_FUNCTION_TOKEN")}
'''
COUNTER = '''
import os, time
def main(args):
    with open(args["file"], "a") as f:
        f.write(os.environ["__OW_ACTIVATION_ID"] + "\\n")
    time.sleep(args.get("sleep", 0))
    return {"ok": True}
'''


class Api:
    """The stack's REST API as the guest (or another namespace's) caller."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.base = f"{stack.api_host}/api/v1/namespaces"

    def deploy(self, name: str, code: str, models_: list[str] | None = None, timeout_ms: int = 60000,
               params: dict | None = None) -> None:
        body = {"exec": {"kind": "python:3", "code": code},
                "annotations": [{"key": "model", "value": models_}] if models_ else [],
                "parameters": [{"key": k, "value": v} for k, v in (params or {}).items()],
                "limits": {"timeout": timeout_ms}}
        r = requests.put(f"{self.base}/_/actions/{name}?overwrite=true", json=body, auth=GUEST, timeout=30)
        assert r.status_code == 200, r.text

    def invoke(self, name: str, params: dict, result: bool = True, timeout_s: float = 120, auth=GUEST,
               **kw) -> requests.Response:
        return requests.post(f"{self.base}/_/actions/{name}", params={"blocking": "true", "result": str(result).lower()},
                             json=params, auth=auth, timeout=timeout_s, **kw)

    def activation(self, activation_id: str, auth=GUEST, namespace: str = "_") -> requests.Response:
        return requests.get(f"{self.base}/{namespace}/activations/{activation_id}", auth=auth, timeout=30)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("faults")
    repo = Repository(state / "models")
    natives = {kind: models.register(repo, kind, kind) for kind in ("resnet", "gpt2")}
    natives["slow"] = register_slow(repo)
    env = {"TORPOR_NODE_SECRET": SECRET, "TORPOR_MAX_PAYLOAD_BYTES": str(PAYLOAD_LIMIT),
           "TORPOR_INVOKER_MAX_CONTAINERS": "6"}
    settings = UpSettings(state_dir=str(state), auth=f"{GUEST_AUTH},{OTHER[0]}:{OTHER[1]}=other")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with Stack(settings, cpu_devices=1, device_memory=24 << 20) as s:
            s.natives = natives
            yield s


@pytest.fixture(scope="module")
def api(stack) -> Api:
    return Api(stack)


@pytest.fixture(scope="module")
def gpu(stack):
    client = GPUServerClient(stack.socket, token=tokens.admin_token(SECRET), timeout_s=30)
    yield client
    client.close()


def native_output(stack, model: str, x: np.ndarray) -> list[float]:
    return models.native(stack.natives[model], [x])[0].ravel()[:64].tolist()


def mapped_segments(pid: int) -> int:
    """Tensor segments (protocol.Segment memfds) mapped by process ``pid``."""
    return sum("memfd:torpor-tensors" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def held(gpu: GPUServerClient) -> list[tuple[int, int]]:
    """(models in use, requests queued) per device."""
    return [(sum(r["in_use"] for r in d["resident"].values()), d["queue"]) for d in gpu.stats()["devices"]]


def swap_ins(gpu: GPUServerClient) -> int:
    return sum(d["swap_ins"] for d in gpu.stats()["devices"])


# ---------------------------------------------------------------- case 5: errors naming the problem


@pytest.mark.parametrize("params, words", [
    ({"model": "resnet", "fill": "nan"}, "input pixel_values of model resnet contains NaN or infinity (model call failed: 400 bad_input)"),
    ({"model": "resnet", "dtype": "float64"}, "must be float32, got float64 (model call failed: 400 bad_input)"),
    ({"model": "resnet", "shape": [1, 3, 16]}, "must have shape 1x3x32x32, got 1x3x16 (model call failed: 400 bad_input)"),
    ({"model": "ghost"}, "unknown model 'ghost' (model call failed: 404 unknown_model)"),
    ({"model": "gpt2"}, "may not use model 'gpt2'"),
], ids=["nan", "dtype", "shape", "unknown-model", "not-its-model"])
def test_a_model_error_ends_the_activation_naming_the_problem(api, gpu, params, words):
    """An action that lets a ModelError escape ends as an action developer error whose message
    is the GPU server's, status included: HTTP 502 to a blocking caller, never a 500."""
    api.deploy("caller", CALL, ["resnet", "ghost"])
    response = api.invoke("caller", params, result=False)
    assert response.status_code == 502, response.text
    record = response.json()
    assert record["response"]["statusCode"] == 2 and words in record["response"]["result"]["error"]
    assert held(gpu) == [(0, 0)]


def test_a_good_call_through_the_stack_equals_native(stack, api):
    api.deploy("caller", CALL, ["resnet", "ghost"])
    response = api.invoke("caller", {"model": "resnet"})
    assert response.status_code == 200, response.text
    assert response.json()["output"] == native_output(stack, "resnet", np.full((1, 3, 32, 32), 0.5, np.float32))


@pytest.mark.parametrize("body, words", [
    (b"   \n", "only whitespace"),
    (b'{"a": 1}\x00', "NUL byte"),
    (b'{"a": [1, 2', "truncated"),
    (b'{"x": NaN}', "not valid JSON"),
], ids=["whitespace", "nul", "truncated", "nan"])
def test_bad_bodies_get_400_at_the_controller_and_the_runtime(stack, api, runtime_process, body, words):
    response = requests.post(f"{api.base}/_/actions/caller?blocking=true", data=body, auth=GUEST,
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and words in response.json()["error"]
    response = requests.post(f"{runtime_process}/run", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and words in response.json()["error"]


def test_an_empty_body_means_no_parameters_at_the_controller_and_is_refused_by_the_runtime(api, runtime_process):
    # OpenWhisk's contract: an invoke without a body passes no parameters
    api.deploy("env", ENV)
    response = requests.post(f"{api.base}/_/actions/env?blocking=true&result=true", auth=GUEST, timeout=60)
    assert response.status_code == 200, response.text
    response = requests.post(f"{runtime_process}/run", data=b"", timeout=30)
    assert response.status_code == 400 and "empty" in response.json()["error"]


def test_the_gpu_server_refuses_an_empty_frame(stack):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(stack.socket)
        sock.sendall(b"\x00\x00\x00\x00")
        reply, _ = protocol.recv(sock, 0)
    assert reply["status"] == 400 and "not valid JSON" in reply["error"]


def test_hostile_input_raises_no_server_error_metric(stack, api):
    """The refusals of this test (and of the tests above it) count as client errors only."""
    api.deploy("caller", CALL, ["resnet", "ghost"])
    for params in ({"model": "resnet", "fill": "nan"}, {"model": "ghost"}, {"model": "gpt2"}):
        assert api.invoke("caller", params).status_code == 502
    assert requests.post(f"{api.base}/_/actions/caller?blocking=true", data=b"\x00", auth=GUEST,
                         timeout=30).status_code == 400

    def counted(text: str, name: str) -> dict[str, float]:
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name + "{")}

    gpu = counted(requests.get(f"{stack.gpu_metrics_url}/metrics", timeout=10).text, "torpor_gpu_requests_total")
    assert any('status="400"' in k for k in gpu) and any('status="403"' in k for k in gpu)
    assert {k: v for k, v in gpu.items() if 'status="5' in k and v} == {}
    invocations = counted(requests.get(f"{stack.api_host}/metrics", timeout=10).text, "torpor_invocations_total")
    assert any('outcome="developer_error"' in k for k in invocations)
    assert {k: v for k, v in invocations.items() if 'outcome="whisk_error"' in k and v} == {}


@pytest.fixture(scope="module")
def runtime_process(tmp_path_factory):
    """A ``torpor runtime`` as the invoker starts it, with the stack's payload limit."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("runtime")
    proc = subprocess.Popen([TORPOR, "runtime", "--port", str(port)], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TORPOR_MAX_PAYLOAD_BYTES": str(PAYLOAD_LIMIT),
                                                            "TORPOR_ACTION_DIR": str(workdir)})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    assert wait_until(up, 30)
    assert requests.post(url + "/init", json={"value": {"code": "def main(a):\n    return a\n"}}, timeout=30).ok
    yield url
    proc.terminate()
    proc.wait(10)


def test_the_payload_limit_is_one_setting():
    fields = [next(f for f in cls.__dataclass_fields__.values() if f.name == "max_payload_bytes")
              for cls in (ControllerSettings, RuntimeSettings, InvokerSettings)]
    assert {f.metadata["env"] for f in fields} == {"TORPOR_MAX_PAYLOAD_BYTES"}
    assert {f.default for f in fields} == {1 << 20}


def test_a_payload_over_the_limit_is_a_413_stating_it_at_every_layer(api, runtime_process):
    api.deploy("env", ENV, params={"pad": "p" * (PAYLOAD_LIMIT // 2)})
    # the runtime was given the invoker's value of the same setting
    assert api.invoke("env", {}).json()["payload_limit"] == str(PAYLOAD_LIMIT)
    response = api.invoke("env", {"x": "y" * PAYLOAD_LIMIT})
    assert response.status_code == 413 and f"{PAYLOAD_LIMIT} bytes" in response.json()["error"]
    # under the limit alone, over it with the action's default parameters
    response = api.invoke("env", {"x": "y" * (PAYLOAD_LIMIT * 2 // 3)})
    assert response.status_code == 413 and f"the limit of {PAYLOAD_LIMIT} bytes" in response.json()["error"]
    # the runtime's /run body holds the parameters plus an envelope (ids, deadline...)
    response = requests.post(f"{runtime_process}/run", json={"value": {"x": "y" * (PAYLOAD_LIMIT + ENVELOPE_BYTES)}},
                             timeout=30)
    assert response.status_code == 413 and f"{PAYLOAD_LIMIT + ENVELOPE_BYTES} bytes" in response.json()["error"]
    assert requests.post(f"{runtime_process}/run", json={"value": {"x": "y" * PAYLOAD_LIMIT}}, timeout=30).ok


# ---------------------------------------------------------------- case 6: action timeout


def test_a_run_over_its_timeout_is_a_developer_error_and_leaves_nothing_behind(stack, api, gpu):
    api.deploy("slowcall", CALL, ["slow"], timeout_ms=1000)
    gpu.infer("slow", [np.full((1, 3, SMALL, SMALL), 0.5, np.float32)])  # loaded: the 1 s is for the call alone
    first = api.invoke("slowcall", {"model": "slow", "shape": [1, 3, SMALL, SMALL]})
    assert first.status_code == 200, first.text
    pid = first.json()["pid"]
    server_pid = dict(stack.procs)["gpu-server"].pid
    segments_before = mapped_segments(server_pid)
    assert segments_before  # the container's segment, mapped by the server for its connection
    # ~2 s of model work: the invoker kills the container after 1 s, mid-run
    response = api.invoke("slowcall", {"model": "slow", "shape": [1, 3, 1600, 1600]}, result=False)
    assert response.status_code == 502
    record = response.json()
    assert record["response"]["statusCode"] == 2
    assert record["response"]["result"]["error"] == "The action exceeded its time limits of 1000 milliseconds."
    assert {"key": "timeout", "value": True} in record["annotations"]
    # the GPU work finishes into the void; no model stays in use, nothing queued
    assert wait_until(lambda: held(gpu) == [(0, 0)], 15)
    # the killed process's connection closed: the server unmapped its segment (a memfd, freed
    # by the kernel with its last mapping)
    assert wait_until(lambda: mapped_segments(server_pid) < segments_before, 15)
    again = api.invoke("slowcall", {"model": "slow", "shape": [1, 3, SMALL, SMALL]})
    assert again.status_code == 200, again.text
    assert again.json()["pid"] != pid
    assert again.json()["output"] == native_output(stack, "slow", np.full((1, 3, SMALL, SMALL), 0.5, np.float32))


# ---------------------------------------------------------------- case 7: callers that give up


def test_callers_that_give_up_cause_no_reload_and_the_next_request_succeeds(stack, api, gpu):
    api.deploy("patient", CALL, ["resnet"])
    params = {"model": "resnet", "sleep_before": 0.5, "sleep_after": 0.5}  # ~1 s around the model call
    assert api.invoke("patient", {"model": "resnet"}).status_code == 200
    swaps = swap_ins(gpu)
    since = int(time.time() * 1000)

    def give_up(_):
        try:
            api.invoke("patient", params, timeout_s=0.1)
            return "answered"
        except requests.Timeout:
            return "gave up"

    with ThreadPoolExecutor(50) as pool:
        assert list(pool.map(give_up, range(50))) == ["gave up"] * 50

    def finished() -> int:
        r = requests.get(f"{api.base}/_/activations", params={"name": "patient", "since": since, "count": "true"},
                         auth=GUEST, timeout=30)
        return r.json()["activations"]

    assert wait_until(lambda: finished() >= 50, 90, step_s=0.5)  # every run finished, into the void
    response = api.invoke("patient", {"model": "resnet"})
    assert response.status_code == 200
    assert response.json()["output"] == native_output(stack, "resnet", np.full((1, 3, 32, 32), 0.5, np.float32))
    assert swap_ins(gpu) == swaps  # no reload storm: the model stayed resident all along
    assert "resnet" in gpu.stats()["devices"][0]["resident"] and held(gpu) == [(0, 0)]
    records = requests.get(f"{api.base}/_/activations", params={"name": "patient", "since": since, "limit": 0,
                                                                 "docs": "true"}, auth=GUEST, timeout=30).json()
    assert all(r["response"]["success"] for r in records)


# ---------------------------------------------------------------- case 11: isolation


def test_an_action_gets_its_own_token_and_never_the_node_secret(api):
    api.deploy("env", ENV, ["resnet"])
    body = api.invoke("env", {}).json()
    assert "TORPOR_NODE_SECRET" not in body["torpor_env"] and "TORPOR_REDIS_URL" not in body["torpor_env"]
    assert tokens.verify(SECRET, body["token"]) == {"ns": "guest", "action": "env", "models": ["resnet"]}


def test_other_namespaces_are_refused(api):
    api.deploy("env", ENV)
    response = api.invoke("env", {}, result=False)
    activation_id = response.json()["activationId"]
    assert api.activation(activation_id).status_code == 200
    assert api.activation(activation_id, auth=OTHER).status_code == 404  # its own namespace has no such id
    assert api.activation(activation_id, auth=OTHER, namespace="guest").status_code == 403
    refused = requests.post(f"{api.base}/guest/actions/env?blocking=true", json={}, auth=OTHER, timeout=30)
    assert refused.status_code == 403
    assert requests.post(f"{api.base}/_/actions/env?blocking=true", json={}, auth=OTHER, timeout=30).status_code == 404


def test_credentials_never_reach_the_logs(stack, api):
    api.deploy("env", ENV, ["resnet"])
    token = api.invoke("env", {}).json()["token"]
    logs = "".join(p.read_text(errors="replace") for p in (Path(stack.state) / "logs").glob("*.log"))
    assert "activation" in logs  # the logs are there to search
    for secret in (SECRET, GUEST[1], OTHER[1], token, tokens.admin_token(SECRET)):
        assert secret not in logs


# ---------------------------------------------------------------- case 9: GPU server killed mid-swap


def _gpu_server(stack) -> subprocess.Popen:
    return next(proc for name, proc in stack.procs if name == "gpu-server" and proc.poll() is None)


def test_gpu_server_killed_mid_swap_is_noticed_and_the_node_serves_again_after_a_restart(stack, api, gpu):
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    api.deploy("slowcall", CALL, ["slow"])
    assert api.invoke("slowcall", {"model": "slow", "shape": [1, 3, SMALL, SMALL]}).status_code == 200
    gpu.evict("slow")  # the next calls swap it in again
    params = {"model": "slow", "shape": [1, 3, 1024, 1024]}
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(api.invoke, "slowcall", params, False) for _ in range(4)]
        time.sleep(0.6)  # container starts, then the swap-in and the first ~0.7 s runs
        proc = _gpu_server(stack)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        # the invoker marks its GPU server down and withholds the node; the controller routes
        # nothing there: a new invocation is refused at once
        assert wait_until(lambda: r.hget("torpor:node:node0", "gpu_server") == "down"
                          and not r.exists("torpor:node:node0:alive"), 3)
        assert time.monotonic() - killed < 3
        refused = api.invoke("slowcall", params)
        assert refused.status_code == 503 and "No invoker" in refused.json()["error"]
        answers = [c.result(timeout=60) for c in calls]
    for answer in answers:  # every in-flight activation failed, clearly, with a final record
        assert answer.status_code in (200, 500), answer.text
        if answer.status_code == 500:
            assert answer.json()["response"]["statusCode"] == 3
            assert "GPU server of node node0 became unavailable (503)" in answer.json()["response"]["result"]["error"]
    assert any(a.status_code == 500 for a in answers)

    stack.procs = [(name, p) for name, p in stack.procs if p.poll() is None]
    stack._spawn("gpu-server", "gpu-server")
    restarted = time.monotonic()
    assert wait_until(lambda: r.hget("torpor:node:node0", "gpu_server") == "up"
                      and r.exists("torpor:node:node0:alive"), 60)
    assert time.monotonic() - restarted < 30
    # a warm container's client reconnects; the model comes back from the repository
    small = {"model": "slow", "shape": [1, 3, SMALL, SMALL]}
    response = api.invoke("slowcall", small)
    assert response.status_code == 200, response.text
    assert response.json()["output"] == native_output(stack, "slow", np.full((1, 3, SMALL, SMALL), 0.5, np.float32))
    r.close()


# ---------------------------------------------------------------- case 10: Redis restarted under load


def test_redis_restarted_under_load_loses_nothing_and_runs_nothing_twice(stack, api, tmp_path):
    runs = tmp_path / "runs.txt"
    api.deploy("counter", COUNTER)
    before = api.invoke("counter", {"file": str(runs)}, result=False)
    assert before.status_code == 200
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []

    def load():
        while not stop.is_set():
            try:
                response = api.invoke("counter", {"file": str(runs), "sleep": 0.2}, result=False, timeout_s=60)
                answers.append((response.status_code, response.headers.get("X-OpenWhisk-Activation-Id")))
            except requests.RequestException as exc:
                answers.append((0, type(exc).__name__))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    port = stack.redis.port
    stack.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
    time.sleep(0.5)
    stack.redis = RedisServer(Path(stack.state) / "redis", port=port).start()  # same data, same port
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join(90)

    # the registry and the activations from before the restart are still there
    assert requests.get(f"{api.base}/_/actions/counter", auth=GUEST, timeout=30).status_code == 200
    assert api.activation(before.json()["activationId"]).json()["response"]["success"]
    accepted = [aid for status, aid in answers if status in (200, 202)]
    assert len(accepted) > 10 and all(status in (200, 202, 503) for status, _ in answers), answers
    for aid in accepted:  # each accepted activation finishes, successfully
        assert wait_until(lambda: api.activation(aid).status_code == 200, 30), aid
        assert api.activation(aid).json()["response"]["success"]
    ran = runs.read_text().split()
    assert len(ran) == len(set(ran))  # nothing ran twice
    assert set(accepted) <= set(ran)
    # a 503 may name an activation that was queued after all: it then ran once, like the others
    assert api.invoke("counter", {"file": str(runs)}).status_code == 200
