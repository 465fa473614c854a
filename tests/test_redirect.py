"""The redirection path's fast paths (issue 3): the finiteness check, dtype lookups
of the wire format, the server's cache of verified tokens, big-endian inputs, the reply's
``server_ms``, and bench/redirect.py itself — against a real ``torpor gpu-server`` process
with a node secret, on a CPU device."""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import models
from gpu_process import stop_process
from runtime.client import GPUServerClient, ModelError
from runtime.gpu_server import protocol, tokens
from runtime.gpu_server.arena import ALIGNMENT as REGION
from runtime.gpu_server.repository import Repository
from runtime.gpu_server.server import all_finite

ROOT = Path(__file__).resolve().parents[1]
SECRET = "redirect-test-secret-0123456789abcdef"


# ---------------------------------------------------------------- units


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_a_non_finite_value_is_found_anywhere(dtype, bad):
    size = 3 * 224 * 224 + 7
    clean = np.ones((1, size), dtype=dtype)
    assert all_finite(clean)
    for at in (0, 1, size // 2, size - 2, size - 1):
        a = clean.copy()
        a[0, at] = bad
        assert not all_finite(a), at
        assert not all_finite(a[0, at % 2::2]), at  # a strided view holding it


def test_every_float16_value_is_judged_by_its_bits():
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # every bit pattern once
    for v, finite in zip(values, np.isfinite(values)):
        assert all_finite(np.array([1, v, 1], dtype=np.float16)) == finite, v.view(np.uint16)


def test_float_extremes_are_finite():
    for dtype in (np.float16, np.float32, np.float64):
        info = np.finfo(dtype)
        a = np.array([info.max, info.min, info.tiny, info.smallest_subnormal, -info.smallest_subnormal, 0.0, -0.0],
                     dtype=dtype)
        assert all_finite(a), dtype
        assert all_finite(a[:0])


@pytest.mark.parametrize("dtype", ["object", "U8", "V4", ">f4", "datetime64[s]", "no-such-dtype", ["f4"], 3])
def test_dtypes_that_raw_bytes_cannot_hold_are_refused(dtype):
    buf = bytes(64)
    with pytest.raises(protocol.ProtocolError, match="bad tensor description"):
        protocol.read(buf, [{"dtype": dtype, "shape": [1], "offset": 0, "nbytes": 4}], copy=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int32", "uint8", "bool", "f4", "complex64"])
def test_numeric_dtypes_round_trip(dtype):
    want = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    entries, end = protocol.describe([want], 8)
    assert entries[0]["dtype"] == np.dtype(dtype).name and entries[0]["offset"] == 64
    buf = bytearray(end)
    protocol.write(memoryview(buf), entries, [want])
    got = protocol.read(buf, entries, copy=True)[0]
    assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("header", [
    {"op": "infer", "model": "résnet-\u2603", "inputs": [{"dtype": "float32", "shape": [1, 3], "offset": 0, "nbytes": 12}]},
    {"ok": True, "server_ms": 0.1 + 0.2, "big": 2**70, "none": None, "nested": [[[]], {}], "nan": float("nan")},
])
def test_headers_round_trip_as_json_encodes_them(header):
    a, b = socket.socketpair()
    with a, b:
        protocol.send(a, header)
        got, payload = protocol.recv(b, 0)
    want = json.loads(json.dumps(header, separators=(",", ":")))
    assert json.dumps(got) == json.dumps(want) and payload == b""


@pytest.mark.parametrize("text, ok", [
    (b' {"op": "health"}\n', True),  # whitespace around the object, as json.loads accepts it
    (b'{"op": "health"} {}', False), (b'{"op": }', False), (b'[1', False), (b'', False), (b'nope', False),
    (b'"just a string"', False), (b'\xff', False),
])
def test_a_header_is_one_json_object(text, ok):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", len(text)) + text)
        if ok:
            assert protocol.recv(b, 0)[0] == {"op": "health"}
        else:
            with pytest.raises(protocol.ProtocolError, match="JSON"):
                protocol.recv(b, 0)


# ---------------------------------------------------------------- the real server


class SecretServer:
    """``torpor gpu-server`` with a node secret on one CPU device, serving tiny ``resnet``
    (float32 1x3x32x32) and ``gpt2`` (int64 1x8) models."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="torpor-redirect-", dir="/tmp"))  # socket paths: 107 bytes at most
        repo = Repository(self.root / "models")
        self.natives = {kind: models.register(repo, kind, kind) for kind in ("resnet", "gpt2")}
        self.socket = str(self.root / "gpu.sock")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}, "TORPOR_NODE_SECRET": SECRET}
        with open(self.root / "server.log", "wb") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "torpor"), "gpu-server", "--cpu-devices", "1",
                 "--device-memory", str(4 * REGION), "--model-repo", str(repo.root), "--socket", self.socket,
                 "--torch-threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gpu-server did not start: {(self.root / 'server.log').read_text()}")
            time.sleep(0.05)

    def client(self, token: str) -> GPUServerClient:
        return GPUServerClient(self.socket, token=token, timeout_s=30)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    with models.torch_threads(1):
        s = SecretServer()
        yield s
        s.stop()


def resnet_token() -> str:
    return tokens.function_token(SECRET, "ns", "classify", ["resnet"])


def test_an_accepted_token_does_not_open_the_door_to_others(server):
    good = server.client(resnet_token())
    x = models.inputs("resnet")
    want = models.native(server.natives["resnet"], x)
    for _ in range(3):  # the second and third calls find the token verified already
        models.assert_same(good.infer("resnet", x), want)
    # the same claims under another secret's signature, a cut signature, another action's model
    forged = tokens.function_token("another-secret-of-the-same-length-abcd", "ns", "classify", ["resnet"])
    cut = resnet_token()[:-2]
    for token, model, words in [(forged, "resnet", "invalid token"), (cut, "resnet", "invalid token"),
                                (forged, "resnet", "invalid token"), (resnet_token(), "gpt2", "may not use model")]:
        caller = server.client(token)
        with pytest.raises(ModelError) as err:
            caller.infer(model, models.inputs(model))
        caller.close()
        assert err.value.status == 403 and words in str(err.value), token
    models.assert_same(good.infer("resnet", x), want)
    good.close()


def test_a_big_endian_input_gives_the_native_order_output(server):
    client = server.client(resnet_token())
    x = models.inputs("resnet", seed=4)
    swapped = [a.astype(a.dtype.newbyteorder(">")) for a in x]
    assert not swapped[0].dtype.isnative and np.array_equal(swapped[0], x[0])
    models.assert_same(client.infer("resnet", swapped), models.native(server.natives["resnet"], x))
    client.close()


def test_a_dtype_the_wire_cannot_carry_is_a_400_not_a_500(server):
    client = server.client(resnet_token())
    client.infer("resnet", models.inputs("resnet"))  # creates this thread's segment
    shm = client._local.segment
    good, _ = protocol.describe(models.inputs("resnet"))
    for dtype in ("object", ">f4", "U4"):
        with pytest.raises(ModelError) as err:
            client.call({"op": "infer", "model": "resnet", "shm": shm.id, "inputs": [{**good[0], "dtype": dtype}]},
                        segment=shm)
        assert (err.value.status, err.value.code) == (400, "bad_input") and "bad tensor description" in str(err.value)
    client.close()


def test_nan_in_the_last_value_of_a_served_input_is_refused(server):
    client = server.client(resnet_token())
    x = models.inputs("resnet")
    x[0].reshape(-1)[-1] = np.nan
    with pytest.raises(ModelError) as err:
        client.infer("resnet", x)
    assert (err.value.status, err.value.code) == (400, "bad_input") and "NaN or infinity" in str(err.value)
    client.close()


def test_server_ms_is_the_servers_share_of_the_round_trip(server):
    client = server.client(resnet_token())
    x = models.inputs("resnet")
    client.infer("resnet", x)
    for _ in range(5):
        started = time.perf_counter()
        reply, _ = client.call({"op": "infer", "model": "resnet", "shm": client._local.segment.id,
                                "inputs": protocol.describe(x)[0]}, segment=client._local.segment)
        round_trip_ms = (time.perf_counter() - started) * 1e3
        assert 0 < reply["server_ms"] < round_trip_ms and reply["path"] == "resident"
    client.close()


def test_the_redirect_bench_measures_and_breaks_down_a_real_call(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "redirect.py"), "--device", "cpu", "--calls", "40",
                           "--warmup", "5", "--tag", "test", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "redirect-test.json").read_text())
    assert result["device"] == "cpu" and result["calls"] == 40 and result["token_checked"]
    assert result["max_abs_diff_vs_native"] < 1e-4
    assert result["model"]["input"] == ["float32", [1, 3, 224, 224]] and result["model"]["output"] == ["float32", [1, 1000]]
    rt, server_ms, overhead = result["round_trip_ms"], result["server_ms"], result["overhead_ms"]
    assert 0 < server_ms["median"] < rt["median"] and 0 < overhead["median"] < rt["median"]
    assert overhead["min"] <= overhead["p10"] <= overhead["median"] <= overhead["p90"] <= overhead["p99"]
    phases = result["breakdown_us"]
    for name in ("client.shm_write", "client.send", "socket.request_handover", "server.header_read_parse",
                 "server.authorize", "server.validate", "server.node_infer", "server.send", "client.shm_read"):
        assert phases[name] > 0, name
    assert phases["server.node_infer"] < phases["round_trip"]
