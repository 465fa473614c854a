"""Faults at the GPU server (issue 6, docs/faults.md): a real ``torpor gpu-server`` process with
a node secret, driven over its socket. Register, unregister and invoke interleaved (case 4),
hostile frames and inputs (case 5), callers that give up (case 7), a crash and a restart
under a connected client (case 9), tokens, admin ops and the socket's mode and group
(case 11)."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import models
from faults_helpers import GPUServer, register_slow, wait_until
from runtime.client import GPUServerClient, ModelError
from runtime.gpu_server import protocol, tokens
from runtime.gpu_server.repository import Repository

SECRET = "test-node-secret-" + "x" * 24
ADMIN = tokens.admin_token(SECRET)
NOGROUP = 65534  # nogroup / nobody on Debian
MAX_INPUT_BYTES = 64 << 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Served:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="torpor-flt-", dir="/tmp"))
        self.root.chmod(0o755)  # other users may reach the socket; its own mode decides
        self.repo = Repository(self.root / "models")
        self.natives = {kind: models.register(self.repo, kind, kind) for kind in ("resnet", "gpt2", "vit")}
        self.natives["slow"] = register_slow(self.repo)
        group = ("--socket-group", str(NOGROUP)) if os.geteuid() == 0 else ()
        self.server = GPUServer(self.root, self.repo, extra=("--node-secret", SECRET, "--max-input-bytes",
                                                             str(MAX_INPUT_BYTES), *group), admin_token=ADMIN)
        self.server.start()

    def admin(self, **kw) -> GPUServerClient:
        return self.server.client(**kw)

    def function(self, models_: list[str], ns: str = "guest", action: str = "fn") -> GPUServerClient:
        return self.server.client(token=tokens.function_token(SECRET, ns, action, models_))

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def served():
    s = Served()
    yield s
    s.close()


def in_use_and_queued(client: GPUServerClient) -> list[tuple[int, int]]:
    devices = client.stats()["devices"]
    return [(sum(r["in_use"] for r in d["resident"].values()), d["queue"]) for d in devices]


# ---------------------------------------------------------------- case 11: who may do what


def test_a_function_token_reaches_only_its_own_models(served):
    mine = served.function(["resnet"], action="classify")
    arrays = models.inputs("resnet", seed=1)
    models.assert_same(mine.infer("resnet", arrays), models.native(served.natives["resnet"], arrays))
    assert mine.prefetch("resnet") in (0, 1)
    for call in (lambda: mine.infer("gpt2", models.inputs("gpt2")), lambda: mine.prefetch("gpt2")):
        with pytest.raises(ModelError) as err:
            call()
        assert (err.value.status, err.value.code) == (403, "forbidden")
        assert "guest/classify may not use model 'gpt2'" in str(err.value) and "resnet" in str(err.value)
    # another function's model is refused before its existence is told
    with pytest.raises(ModelError) as err:
        mine.infer("no-such-model", arrays)
    assert err.value.status == 403
    for op in ("register", "unregister", "evict", "stats"):
        with pytest.raises(ModelError) as err:
            mine.call({"op": op, "model": "resnet"})
        assert err.value.status == 403 and f"may not use op '{op}'" in str(err.value)
    assert mine.health()["healthy"]  # health is open: probes need no token
    mine.close()


@pytest.mark.parametrize("token, words", [
    ("", "needs a token"),
    (tokens.function_token("another-node-secret", "guest", "fn", ["resnet"]), "signature does not match"),
    (tokens.admin_token("another-node-secret"), "signature does not match"),
    ("not-a-token", "not of the form"),
    ("é.é", "not of the form"),
    # claims changed after signing: the signature no longer fits
    (tokens.function_token(SECRET, "guest", "fn", ["gpt2"]).split(".")[0] + "."
     + tokens.function_token(SECRET, "guest", "fn", ["resnet"]).split(".")[1], "signature does not match"),
], ids=["none", "other-secret", "other-admin", "garbage", "non-ascii", "tampered"])
def test_missing_forged_and_tampered_tokens_are_refused(served, token, words):
    client = served.server.client(token=token)
    for header in ({"op": "stats"}, {"op": "infer", "model": "resnet", "shm": "x", "inputs": []}):
        with pytest.raises(ModelError) as err:
            client.call(header)
        assert err.value.status == 403 and words in str(err.value)
        assert not token or token not in str(err.value)
    client.close()


def test_admin_token_may_do_everything(served):
    admin = served.admin()
    assert "resnet" in admin.register("resnet")["model"]
    admin.infer("gpt2", models.inputs("gpt2"))
    assert admin.stats()["devices"]
    admin.close()


def test_programs_an_action_registers_are_its_own():
    claims = {"ns": "guest", "action": "my-fn", "models": ["resnet"]}
    prefix = tokens.program_prefix("guest", "my-fn")
    assert tokens.allows(claims, prefix + "Net-0123456789abcdef") and tokens.allows(claims, "resnet")
    assert not tokens.allows(claims, tokens.program_prefix("guest", "other") + "Net-0123456789abcdef")
    assert not tokens.allows(claims, "guest.my-fnx.Net-0123456789abcdef")
    # the same names runtime.remote gives them
    from runtime import remote
    os.environ.update({"__OW_ACTION_NAME": "/guest/my-fn", "__OW_NAMESPACE": "guest"})
    try:
        assert remote.action_scope() + "." == prefix
    finally:
        for k in ("__OW_ACTION_NAME", "__OW_NAMESPACE"):
            os.environ.pop(k)


def _connect_as(path: str, uid: int, gid: int) -> str:
    """Connects to ``path`` from a child process running as ``uid``/``gid`` with no other
    groups; returns ``ok`` or the error's name."""
    pid = os.fork()
    if pid == 0:  # the child only connects, then leaves without running any Python clean-up
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "ok", 13: "PermissionError"}.get(os.waitstatus_to_exitcode(status), "other error")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
def test_socket_is_reachable_by_its_group_only(served):
    st = os.stat(served.server.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOGROUP
    assert _connect_as(served.server.socket, NOGROUP, NOGROUP) == "ok"  # a member of the socket's group
    assert _connect_as(served.server.socket, NOGROUP, 1) == "PermissionError"  # anyone else


# ---------------------------------------------------------------- case 4: admin ops racing calls


def test_register_unregister_and_infer_interleaved_end_in_the_last_state(served):
    """Threads register, unregister and infer one model at sub-millisecond spacing while its
    weights are replaced in the repository; afterwards the state is the one the last
    operation left, and each served output was one of the two weight sets'."""
    repo, name = served.repo, "churn"
    old = models.register(repo, name, "resnet", seed=21)
    arrays = models.inputs("resnet", seed=3)
    want = {"old": models.native(old, arrays)}
    new = models.build("resnet", seed=22)
    want["new"] = models.native(new, arrays)
    new_weights = models.save(new, served.root / "churn-new.safetensors")
    # the server's first load of an architecture imports its code (seconds): not part of the race
    models.assert_same(served.admin().infer(name, arrays), want["old"])
    stop = threading.Event()
    errors: list[BaseException] = []
    outputs: list[list[np.ndarray]] = []

    def loop(body):
        client = served.admin()
        try:
            while not stop.is_set():
                body(client)
                time.sleep(0.0002)
        except BaseException as exc:  # collected: any failure fails the test
            errors.append(exc)
        finally:
            client.close()

    def infer(client):
        try:
            outputs.append(client.infer(name, arrays))
        except ModelError as exc:
            if exc.status != 404:  # the name may be between unregister and the next load
                raise

    threads = [threading.Thread(target=loop, args=(body,)) for body in (
        infer, infer, infer,
        lambda c: c.register(name), lambda c: c.unregister(name), lambda c: c.evict(name))]
    for t in threads:
        t.start()
    time.sleep(0.4)
    repo.register(models.spec(name, "resnet"), new_weights)  # new files while the ops race
    time.sleep(0.8)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(outputs) > 20
    for out in outputs:
        assert any(all(np.array_equal(g, w) for g, w in zip(out, ref)) for ref in want.values())

    admin = served.admin()
    assert admin.health()["healthy"]
    admin.unregister(name)  # the last operation: nothing of the model stays in memory
    stats = admin.stats()
    assert name not in stats["models"] and all(name not in d["resident"] for d in stats["devices"])
    assert in_use_and_queued(admin) == [(0, 0), (0, 0)]
    models.assert_same(admin.infer(name, arrays), want["new"])  # and the next call loads the new files
    admin.register(name)
    assert name in admin.stats()["models"]
    repo.unregister(name)
    admin.unregister(name)
    admin.close()


# ---------------------------------------------------------------- case 5: hostile input


def framed(header: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header


@pytest.mark.parametrize("frame, words", [
    (framed(b""), "not valid JSON"),
    (framed(b"   \n\t"), "not valid JSON"),
    (framed(b'{"op": "health"}\x00'), "not valid JSON"),
    (framed(b'{"op": "infer", "model": "res'), "not valid JSON"),
    (framed(b"[" * 100_000 + b"]" * 100_000), "nests JSON too deeply"),
], ids=["empty", "whitespace", "nul", "truncated", "deep"])
def test_unparseable_frames_get_a_400_naming_the_problem(served, frame, words):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(served.server.socket)
        sock.sendall(frame)
        reply, _ = protocol.recv(sock, 0)
    assert (reply["ok"], reply["status"], reply["code"]) == (False, 400, "bad_request") and words in reply["error"]
    assert served.admin().health()["healthy"]


@pytest.mark.parametrize("arrays, status, words", [
    ([np.zeros((1, 3, 32, 32), np.float64)], 400, "must be float32, got float64"),
    ([np.zeros((1, 3, 8), np.float32)], 400, "must have shape 1x3x?x?, got 1x3x8"),
    ([np.full((1, 3, 16, 16), np.nan, np.float32)], 400, "NaN or infinity"),
    ([np.full((1, 3, 16, 16), np.inf, np.float32)], 400, "NaN or infinity"),
    ([np.zeros((1, 3, 0, 16), np.float32)], 400, "must have shape"),
    ([np.ones((1, 3, 2600, 2600), np.float32)], 413, f"exceed the limit of {MAX_INPUT_BYTES} bytes"),
], ids=["dtype", "rank", "nan", "inf", "zero-size", "too-large"])
def test_bad_tensors_are_refused_before_any_work(served, arrays, status, words):
    client = served.function(["slow"])
    swaps = sum(d["swap_ins"] for d in served.admin().stats()["devices"])
    started = time.monotonic()
    with pytest.raises(ModelError) as err:
        client.infer("slow", arrays)
    assert err.value.status == status and words in str(err.value)
    assert time.monotonic() - started < 2.0
    assert sum(d["swap_ins"] for d in served.admin().stats()["devices"]) == swaps
    client.close()


@pytest.mark.parametrize("header, words", [
    ({"op": ["infer"]}, "field 'op' must be a string"),
    ({"op": "prefetch", "model": "m" * 300}, "over the limit of 200 bytes"),
    ({"op": "prefetch", "model": "a\x00b"}, "NUL"),
    ({"op": "prefetch", "model": "../slow"}, "no '/'"),
    ({"op": "prefetch", "model": ".hidden"}, "leading '.'"),
], ids=["op-list", "long-name", "nul-name", "path-name", "dot-name"])
def test_malformed_ops_and_model_names_are_a_400_not_a_5xx(served, header, words):
    with pytest.raises(ModelError) as err:
        served.admin().call(header)
    assert (err.value.status, err.value.code) == (400, "bad_request") and words in str(err.value)
    assert str(served.server.root) not in str(err.value)  # nothing of the server's paths leaks
    assert served.admin().health()["healthy"]


def test_an_unknown_model_is_a_404_naming_it(served):
    with pytest.raises(ModelError) as err:
        served.admin().infer("no-such-model", models.inputs("resnet"))
    assert (err.value.status, err.value.code) == (404, "unknown_model") and "'no-such-model'" in str(err.value)


# ---------------------------------------------------------------- case 7: callers that give up


def test_callers_that_give_up_leave_the_model_resident_and_nothing_held(served):
    admin = served.admin()
    image = np.random.default_rng(0).standard_normal((1, 3, 640, 640), dtype=np.float32)  # ~0.25 s a run
    want = models.native(served.natives["slow"], [image])
    models.assert_same(admin.infer("slow", [image]), want)
    devices = admin.stats()["devices"]
    swaps, runs = sum(d["swap_ins"] for d in devices), sum(d["runs"] for d in devices)
    results: list[int] = []

    def impatient():
        client = served.server.client(timeout_s=0.1)
        try:
            client.infer("slow", [image])
            results.append(200)
        except ModelError as exc:
            results.append(exc.status)
        finally:
            client.close()

    threads = [threading.Thread(target=impatient) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results.count(504) >= 7  # each gave up after 100 ms
    # the runs finish into the void; then nothing is held and the model was never reloaded
    assert wait_until(lambda: in_use_and_queued(admin) == [(0, 0), (0, 0)], 20)
    devices = admin.stats()["devices"]
    assert sum(d["swap_ins"] for d in devices) == swaps
    assert any("slow" in d["resident"] for d in devices)
    assert sum(d["runs"] for d in devices) == runs + 8
    models.assert_same(admin.infer("slow", [image]), want)
    assert "Traceback" not in served.server.log_path.read_text()
    admin.close()


# ---------------------------------------------------------------- case 9: crash and restart


def test_a_crash_mid_swap_fails_callers_fast_and_a_restart_serves_again(served):
    client = served.admin()
    arrays = models.inputs("vit", seed=8)
    want = models.native(served.natives["vit"], arrays)
    models.assert_same(client.infer("vit", arrays), want)  # a connection that stays open
    client.evict("slow")
    outcome: list = []

    def cold_call():
        other = served.admin()
        try:
            other.infer("slow", [np.ones((1, 3, 1024, 1024), np.float32)])
            outcome.append("served")
        except ModelError as exc:
            outcome.append(exc)
        finally:
            other.close()

    caller = threading.Thread(target=cold_call)
    caller.start()
    time.sleep(0.05)  # the swap-in (and the ~0.7 s run) of the cold model is under way
    served.server.kill()
    caller.join(5)
    assert not caller.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], ModelError) and (outcome[0].status, outcome[0].code) == (503, "unavailable")
    started = time.monotonic()
    with pytest.raises(ModelError) as err:
        client.infer("vit", arrays)
    assert err.value.status == 503 and time.monotonic() - started < 1.0
    served.server.start()
    # the same client, whose connection died with the old process, is served by the new one
    # (models load again from the repository on demand)
    models.assert_same(client.infer("vit", arrays), want)
    assert "vit" in client.stats()["models"]
    client.close()
