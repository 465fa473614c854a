"""Unauthenticated GPU-server mode is an explicit opt-in (docs/faults.md, case 11): a real
``torpor gpu-server`` process refuses to start without a node secret unless told
``--insecure-no-auth``, says so loudly when it is, and with a secret refuses bad tokens."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import models
from faults_helpers import TORPOR, GPUServer
from runtime.client import ModelError
from runtime.gpu_server import tokens
from runtime.gpu_server.repository import Repository

SECRET = "auth-test-secret-" + "y" * 24


@pytest.fixture
def root():
    # a Unix socket path has at most 107 bytes: pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="torpor-auth-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def repo(root) -> Repository:
    return Repository(root / "models")


def without_auth_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("TORPOR_NODE_SECRET", "TORPOR_GPU_INSECURE_NO_AUTH")}


@pytest.mark.parametrize("opt_in", [None, "0"], ids=["unset", "false"])
def test_without_a_secret_nor_the_opt_in_the_server_refuses_to_start(root, repo, opt_in):
    env = {**without_auth_settings(), "TORPOR_REDIS_URL": ""}
    if opt_in is not None:
        env["TORPOR_GPU_INSECURE_NO_AUTH"] = opt_in
    socket = root / "gpu.sock"
    done = subprocess.run([TORPOR, "gpu-server", "--cpu-devices", "1", "--model-repo", str(repo.root), "--socket",
                           str(socket)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no node secret" in done.stderr and "TORPOR_NODE_SECRET" in done.stderr
    assert "--insecure-no-auth" in done.stderr and "TORPOR_GPU_INSECURE_NO_AUTH" in done.stderr
    assert not socket.exists()


def test_with_the_opt_in_it_serves_every_caller_and_warns(root, repo, monkeypatch):
    for key in ("TORPOR_NODE_SECRET", "TORPOR_GPU_INSECURE_NO_AUTH"):
        monkeypatch.delenv(key, raising=False)
    with models.torch_threads(1):
        native = models.register(repo, "m", "resnet")
    server = GPUServer(root, repo, devices=1, extra=("--insecure-no-auth",)).start()
    try:
        client = server.client(token="")
        arrays = models.inputs("resnet", seed=2)
        with models.torch_threads(1):
            models.assert_same(client.infer("m", arrays), models.native(native, arrays))
        assert client.stats()["models"] == ["m"]  # an admin op, without any token
        client.close()
    finally:
        server.stop()
    assert "UNAUTHENTICATED GPU server" in server.log_path.read_text()


def test_with_a_secret_missing_and_bad_tokens_are_403_even_with_the_opt_in(root, repo, monkeypatch):
    monkeypatch.delenv("TORPOR_NODE_SECRET", raising=False)
    models.register(repo, "m", "resnet")
    server = GPUServer(root, repo, devices=1, extra=("--node-secret", SECRET, "--insecure-no-auth"),
                       admin_token=tokens.admin_token(SECRET)).start()
    try:
        cases = {"": "needs a token", "not-a-token": "not of the form",
                 tokens.admin_token("another-secret"): "does not match this node's secret"}
        for token, words in cases.items():
            client = server.client(token=token)
            with pytest.raises(ModelError) as refused:
                client.stats()
            assert (refused.value.status, refused.value.code) == (403, "forbidden") and words in str(refused.value)
            assert client.health()["ok"]  # health needs no token
            client.close()
        admin = server.client()
        assert admin.stats()["ok"]
        admin.close()
    finally:
        server.stop()
    assert "UNAUTHENTICATED" not in server.log_path.read_text()
