"""Bring your own model (runtime.remote): a real action builds a torch module in its own code,
hands it to the GPU server at /init, and gets outputs equal to native execution; a later
container of the action reuses the registration; an unexportable module fails at /init with
a message naming the problem. Then the `register_program` op against a real GPU server
process: probe-then-upload, concurrent uploads, limits, conflicts, and archives that would
make torch.export.load unpickle or execute something (refused before torch sees them)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import models
from runtime.client import GPUServerClient, ModelError
from runtime.gpu_server.program_check import UnsafeProgram, check_program
from runtime.gpu_server.repository import STAGING, VERSIONS, ModelSpec, Repository, TensorSpec
from runtime.remote import UnservableOutput, export_failure, remote
from runtime.up import Stack, UpSettings
from gpu_process import stop_process
from test_gpu_server import start_server

MODEL_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head(h.flatten(1)).softmax(-1), h.mean((2, 3))


def build():
    torch.manual_seed(7)
    return Net().eval()
'''

ACTION = MODEL_SOURCE + '''
import os
import numpy as np
from runtime.remote import remote

net = remote(build(), (torch.zeros(2, 3, 8, 8),))


def main(args):
    probs, features = net(np.asarray(args["x"], dtype=np.float32))
    return {"probs": probs.tolist(), "features": features.tolist(), "model": net.name,
            "created": net.created, "uploaded": net.uploaded, "pid": os.getpid()}
'''

GATE = '''
import torch
from torch import nn
from runtime.remote import remote


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


gate = remote(Gate(), (torch.ones(1, 4),))


def main(args):
    return {"ran": True}
'''


def native_net():
    namespace: dict = {}
    exec(compile(MODEL_SOURCE, "model_source", "exec"), namespace)
    return namespace["build"]()


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


# ---------------------------------------------------------------- through the whole platform

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack(UpSettings(state_dir=str(tmp_path_factory.mktemp("byom"))), cpu_devices=1, device_memory=64 << 20) as s:
        yield s


def deploy(stack: Stack, name: str, code: str, params: dict | None = None) -> None:
    body = {"exec": {"kind": "python:3", "code": code}, "limits": {"timeout": 120000},
            "parameters": [{"key": k, "value": v} for k, v in (params or {}).items()]}
    r = stack.session().put(f"{stack.api_host}/api/v1/namespaces/_/actions/{name}?overwrite=true", json=body, timeout=30)
    assert r.status_code == 200, r.text


def invoke(stack: Stack, name: str, params: dict):
    return stack.session().post(f"{stack.api_host}/api/v1/namespaces/_/actions/{name}?blocking=true&result=true",
                                json=params, timeout=180)


def test_remote_model_equals_native_and_a_later_container_reuses_it(stack):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with models.torch_threads(1), torch.no_grad():  # the GPU server runs one torch thread too
        probs, features = (t.numpy() for t in native_net()(torch.from_numpy(x)))

    deploy(stack, "byom", ACTION)
    first = invoke(stack, "byom", {"x": x.tolist()})
    assert first.status_code == 200, first.text
    body = first.json()
    assert np.array_equal(np.asarray(body["probs"], dtype=np.float32), probs)
    assert np.array_equal(np.asarray(body["features"], dtype=np.float32), features)
    assert body["model"].startswith("guest.byom.Net-") and body["created"] and body["uploaded"]

    # an update retires the warm container: the next activation runs in a new runtime process
    deploy(stack, "byom", ACTION, {"unused": 1})
    second = invoke(stack, "byom", {"x": x.tolist()})
    assert second.status_code == 200, second.text
    again = second.json()
    assert again["pid"] != body["pid"]
    assert (again["model"], again["created"], again["uploaded"]) == (body["model"], False, False)
    assert again["probs"] == body["probs"] and again["features"] == body["features"]
    registered = [p.name for p in Path(stack.model_repo).iterdir() if p.name.startswith("guest.byom.")]
    assert registered == [body["model"]]
    assert (Path(stack.model_repo) / body["model"] / "model.pt2").is_file()


def test_unexportable_module_fails_at_init_naming_the_problem(stack):
    deploy(stack, "gate", GATE)
    r = invoke(stack, "gate", {})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert "remote(): cannot export Gate" in error
    assert "data-dependent" in error and "if x.sum() > 0:" in error
    assert not [p for p in Path(stack.model_repo).iterdir() if p.name.startswith("guest.gate.")]


# ---------------------------------------------------------------- remote() before the server

def test_remote_refuses_what_it_cannot_serve_before_contacting_the_server():
    nowhere = GPUServerClient("/nonexistent/gpu.sock")
    with pytest.raises(TypeError, match="takes a torch.nn.Module, not function"):
        remote(lambda x: x, (torch.ones(1),), client=nowhere)
    with pytest.raises(TypeError, match="example input 0 is a list"):
        remote(nn.Identity(), ([1.0],), client=nowhere)
    with pytest.raises(ValueError, match="torch.bfloat16"):
        remote(nn.Identity(), (torch.ones(2, dtype=torch.bfloat16),), client=nowhere)
    with pytest.raises(RuntimeError, match=r"remote\(\): cannot export Gate: .*data-dependent.*if x.sum\(\) > 0:"):
        remote(Gate(), torch.ones(1, 4), client=nowhere)
    with pytest.raises(ModelError) as unreachable:
        remote(nn.Linear(2, 2), torch.ones(1, 2), client=nowhere)
    assert unreachable.value.status == 503


class Returns(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x, self.value


def test_outputs_the_server_cannot_return_are_refused_at_export():
    nowhere = GPUServerClient("/nonexistent/gpu.sock")
    with pytest.raises(UnservableOutput, match="output 1 of Returns is int"):
        remote(Returns(3), torch.ones(2), client=nowhere)
    with pytest.raises(UnservableOutput, match="output 1 of Returns is torch.bfloat16"):
        remote(Returns(torch.ones(2, dtype=torch.bfloat16)), torch.ones(2), client=nowhere)


def test_export_failure_keeps_torch_first_line_and_the_user_frame():
    exc = RuntimeError("Could not guard on X\n\nmore\nThe following call raised this error:\n"
                       '  File "a.py", line 3, in forward\n    if x: pass\n\nrest')
    assert export_failure(exc) == 'RuntimeError: Could not guard on X, at File "a.py", line 3, in forward: if x: pass'
    assert export_failure(ValueError()) == "ValueError"


# ---------------------------------------------------------------- register_program on a real server

MAX_PROGRAM_BYTES = 512 << 10  # below the frame limit (start_server: 1 MiB)


def program(module: nn.Module, *inputs: torch.Tensor) -> bytes:
    ep = torch.export.export(module.eval(), inputs)
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


INPUTS = [{"name": "input", "dtype": "float32", "shape": [2, 4]}]


@pytest.fixture(scope="module")
def server(monkeypatch_module):
    root = Path(tempfile.mkdtemp(prefix="torpor-byom-", dir="/tmp"))
    repo = Repository(root / "models")
    monkeypatch_module.setenv("TORPOR_MAX_PROGRAM_BYTES", str(MAX_PROGRAM_BYTES))
    proc = start_server(root, repo)
    yield root, repo
    stop_process(proc)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture
def client(server):
    c = GPUServerClient(str(server[0] / "gpu.sock"), timeout_s=60)
    yield c
    c.close()


def left_behind(root: Path, prefix: str) -> list[Path]:
    """Temporary upload folders and staged registrations of ``prefix*`` in repository ``root``."""
    temporary = [p for p in root.iterdir() if p.name.startswith(".") and p.name not in (STAGING, VERSIONS)]
    return temporary + list((root / STAGING).glob(prefix + "*"))


def refused(client: GPUServerClient, name: str, digest: str, data: bytes, inputs=INPUTS) -> ModelError:
    with pytest.raises(ModelError) as info:
        client.call({"op": "register_program", "model": name, "digest": digest, "inputs": inputs}, data)
    return info.value


def test_probe_then_upload_then_probe_and_serve(client):
    module = linear(1)
    data = program(module, torch.zeros(2, 4))
    name = f"guest.probe.Linear-{sha(data)[:16]}"
    assert refused(client, name, sha(data), b"").status == 404
    reply, uploaded = client.register_program(name, sha(data), INPUTS, data)
    assert uploaded and reply["created"] and reply["model"] == name and reply["bytes"] > 0
    reply, uploaded = client.register_program(name, sha(data), INPUTS, data)
    assert not uploaded and not reply["created"]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    with torch.no_grad():
        assert np.array_equal(client.infer(name, [x])[0], module(torch.from_numpy(x)).numpy())
    wrong = np.zeros((3, 4), np.float32)
    with pytest.raises(ModelError) as bad_shape:
        client.infer(name, [wrong])
    assert bad_shape.value.status == 400 and "shape 2x4" in str(bad_shape.value)


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.proj = nn.Linear(4, 3)

    def forward(self, x, ids):
        h = self.proj(x)
        return {"scores": h.softmax(-1), "extra": [h.argmax(-1), ids * 2]}


def test_outputs_come_back_in_the_module_structure(client):
    module = Structured().eval()
    x, ids = torch.randn(2, 4), torch.arange(6).reshape(2, 3)
    served = remote(module, (x, ids), client=client)
    out = served(x.numpy(), ids.numpy())
    with torch.no_grad():
        native = module(x, ids)
    assert set(out) == {"scores", "extra"} and isinstance(out["extra"], list) and len(out["extra"]) == 2
    assert np.array_equal(out["scores"], native["scores"].numpy())
    assert [a.dtype for a in out["extra"]] == [np.int64, np.int64]
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(out["extra"], native["extra"]))


def test_concurrent_uploads_register_once(server):
    data = program(linear(2), torch.zeros(2, 4))
    name = f"guest.race.Linear-{sha(data)[:16]}"
    replies, errors = [], []

    def upload():
        c = GPUServerClient(str(server[0] / "gpu.sock"), timeout_s=60)
        try:
            replies.append(c.call({"op": "register_program", "model": name, "digest": sha(data), "inputs": INPUTS}, data)[0])
        except ModelError as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(replies) == 4
    assert sorted(r["created"] for r in replies) == [False, False, False, True]
    assert [p.name for p in server[1].root.iterdir() if p.name.startswith("guest.race.")] == [name]
    assert not left_behind(server[1].root, "guest.race.") and len(list((server[1].root / VERSIONS).glob("guest.race.*"))) == 1


@pytest.mark.parametrize("change, status, code, words", [
    ({"name": "guest.bad.Linear-0000000000000000"}, 400, "bad_request", "ending with"),
    ({"digest": "0" * 64}, 400, "bad_request", "does not match"),
    ({"digest": "abc"}, 400, "bad_request", "SHA-256"),
    ({"name": "resnet50"}, 400, "bad_request", "ending with"),
    ({"name": "../x-{d16}"}, 400, "bad_request", "invalid model name"),
    ({"inputs": [{"name": "x", "dtype": "bfloat16", "shape": [2, 4]}]}, 400, "bad_request", "dtype"),
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": [2, None]}]}, 400, "bad_request", "static shape"),
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": [5, 4]}]}, 502, "model_load_failed", "does not run"),
    # registration would allocate an example of each declared input: the limits of every registration
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": [1 << 20, 1 << 20]}]}, 400, "bad_request",
     "more than 2147483648 elements"),
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}, {"name": "x", "dtype": "float32", "shape": [2, 4]}]},
     400, "bad_request", "input names repeat"),
    ({"payload": b"PK" + b"\0" * 100}, 400, "unsafe_program", "not a torch.export archive"),
])
def test_malformed_registrations_are_refused(client, server, change, status, code, words):
    data = change.get("payload") or program(linear(3), torch.zeros(2, 4))
    digest = change.get("digest", sha(data))
    name = change.get("name", "guest.bad.Linear-{d16}").format(d16=digest[:16])
    error = refused(client, name, digest, data, change.get("inputs", INPUTS))
    assert (error.status, error.code) == (status, code), error
    assert words in str(error)
    assert not [p for p in server[1].root.iterdir() if p.name.startswith("guest.bad.")]
    assert not left_behind(server[1].root, "guest.bad.") and not list((server[1].root / VERSIONS).glob("guest.bad.*"))


def test_oversized_program_is_a_413(client):
    data = b"\0" * (MAX_PROGRAM_BYTES + 1)
    error = refused(client, f"guest.big.x-{sha(data)[:16]}", sha(data), data)
    assert (error.status, error.code) == (413, "too_large")
    assert client.health()["healthy"]  # the connection and the server stay up


def test_a_name_holding_other_bytes_is_a_409(client, server):
    data = program(linear(4), torch.zeros(2, 4))
    name = f"guest.taken.Linear-{sha(data)[:16]}"
    other = server[0] / "other.pt2"
    other.write_bytes(program(linear(5), torch.zeros(2, 4)))
    server[1].register(ModelSpec(name=name, inputs=[TensorSpec("input", "float32", [2, 4])], format="export",
                                 weights="model.pt2"), other)
    error = refused(client, name, sha(data), data)
    assert (error.status, error.code) == (409, "conflict")


# ---------------------------------------------------------------- archives torch.export.load must not see

class Opens:
    """Unpickling this opens (creates) ``path``: a harmless stand-in for any code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def rewrite(data: bytes, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    """The archive ``data`` with members replaced or added, stored raw as torch stores them."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, (replace or {}).get(info.filename, source.read(info.filename)))
        for name, content in (add or {}).items():
            target.writestr(name, content)
    return out.getvalue()


def edit_json(data: bytes, member: str, change) -> bytes:
    document = json.loads(zipfile.ZipFile(io.BytesIO(data)).read(member))
    change(document)
    return rewrite(data, {member: json.dumps(document).encode()})


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def first_node(document: dict) -> dict:
    return document["graph_module"]["graph"]["nodes"][0]


GOOD = program(linear(6), torch.zeros(2, 4))
WEIGHTS_CONFIG = "archive/data/weights/model_weights_config.json"
MODEL_JSON = "archive/models/model.json"


@pytest.mark.parametrize("archive, words", [
    (lambda marker: rewrite(GOOD, {"archive/data/sample_inputs/model.pt": pickled(Opens(marker))}), "not plain tensors"),
    (lambda marker: edit_json(GOOD, WEIGHTS_CONFIG, lambda d: d["config"]["weight"].update(use_pickle=True)), "pickled"),
    (lambda marker: edit_json(GOOD, MODEL_JSON, lambda d: d.update(guards_code=[f"open({marker!r}, 'w')"])), "guard code"),
    (lambda marker: edit_json(GOOD, MODEL_JSON, lambda d: first_node(d).update(target="torch.os.system")),
     "not an ATen operator"),
    (lambda marker: edit_json(GOOD, MODEL_JSON, lambda d: first_node(d).update(target="torch.ops.aten.from_file.default")),
     "aten.from_file"),
    (lambda marker: edit_json(GOOD, MODEL_JSON, lambda d: first_node(d).update(name="x; import os")), "not a plain name"),
    (lambda marker: edit_json(GOOD, MODEL_JSON, lambda d: d["graph_module"]["signature"]["input_specs"][0]
                              ["parameter"].update(parameter_name="__class__")), "not a plain name"),
    (lambda marker: edit_json(GOOD, MODEL_JSON, lambda d: d["graph_module"]["module_call_graph"][0]["signature"].update(
        out_spec=json.dumps([1, {"type": "collections.defaultdict", "context": "{}", "children_spec": []}]))),
     "collections.defaultdict"),
    (lambda marker: rewrite(GOOD, add={"archive/data/aotinductor/model/model.so": b"\x7fELF"}), "not admitted"),
    (lambda marker: rewrite(GOOD, add={"archive/extra/notes.txt": b"hi"}), "not admitted"),
])
def test_archives_that_would_run_code_are_refused_before_loading(tmp_path, archive, words):
    marker = tmp_path / "ran"
    data = archive(str(marker))
    with pytest.raises(UnsafeProgram, match=words.replace("(", r"\(")):
        check_program(data)
    assert not marker.exists()


def test_the_unpickling_threat_is_real_and_the_server_refuses_it(client, tmp_path):
    marker = tmp_path / "ran"
    data = rewrite(GOOD, {"archive/data/sample_inputs/model.pt": pickled(Opens(str(marker)))})
    error = refused(client, f"guest.evil.x-{sha(data)[:16]}", sha(data), data)
    assert (error.status, error.code) == (400, "unsafe_program") and "not plain tensors" in str(error)
    assert not marker.exists()
    # torch.export.load itself retries without weights_only, runs the pickle, and only then
    # finds that the result is not example inputs
    with pytest.raises(Exception):
        torch.export.load(io.BytesIO(data))
    assert marker.exists()


@pytest.mark.parametrize("kind", models.SMALL)
def test_real_architectures_pass_the_check_and_serve_equal_to_native(client, kind):
    module = models.build(kind).eval()
    arrays = models.inputs(kind, seed=1)
    served = remote(module, tuple(torch.from_numpy(a) for a in arrays), name=kind, client=client)
    assert served.name.startswith(f"local.{kind}-")
    check_program((Path(client.socket_path).parent / "models" / served.name / "model.pt2").read_bytes())
    with models.torch_threads(1):
        out = served(*arrays)
        models.assert_same(list(out) if isinstance(out, tuple) else [out], models.native(module, arrays))
