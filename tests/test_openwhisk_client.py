"""The controller's REST API with the official `openwhisk` npm client (tests/js/client.test.js)
against the whole platform (controller, invoker, action runtimes, GPU server on a CPU
device): code and zip actions, list, get, update, delete; blocking, blocking with the result
(client-side and `result=true`), non-blocking invocations; the activation, its result and
logs; 401, 404, 409, 413 and the `{"error", "code"}` error body.

The npm package is installed here (`npm ci` into tests/js/node_modules, git-ignored) when it
is missing; the test is skipped only when Node.js is absent or the npm registry cannot be
reached."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from runtime.up import Stack, UpSettings

JS = Path(__file__).resolve().parent / "js"
PREFIX = "ow-"
HELLO, ZIPPED = f"{PREFIX}hello", f"{PREFIX}zipped"
NETWORK_ERRORS = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|getaddrinfo|network", re.I)
ZIP_FILES = {
    "__main__.py": "from helper import shout\n\n\ndef main(args):\n    return {'shouted': shout(args['text'])}\n",
    "helper.py": "def shout(text):\n    return text.upper() + '!'\n",
}


def openwhisk_package() -> None:
    """Installs tests/js's locked dependencies unless present; skips without Node.js or network."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("Node.js and npm are not on PATH")
    if (JS / "node_modules" / "openwhisk" / "package.json").is_file():
        return
    proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(JS)], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if NETWORK_ERRORS.search(output):
            pytest.skip(f"npm cannot reach its registry to install the openwhisk package: {output.strip()[-300:]}")
        pytest.fail(f"npm ci failed:\n{output}")


def zip_action() -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in ZIP_FILES.items():
            archive.writestr(name, text)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> dict:
    openwhisk_package()
    settings = UpSettings(state_dir=str(tmp_path_factory.mktemp("openwhisk-client")))
    with Stack(settings, cpu_devices=1, device_memory=16 << 20) as stack:
        env = {**os.environ, "TORPOR_API_HOST": stack.api_host, "TORPOR_AUTH": settings.auth,
               "TORPOR_ZIP_B64": zip_action(), "TORPOR_PREFIX": PREFIX}
        proc = subprocess.run(["node", "client.test.js"], cwd=JS, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"client.test.js failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_error(failure: dict, status: int, words: str) -> None:
    assert failure.get("status") == status, failure
    body = failure["body"]
    assert set(body) == {"error", "code"}, body
    assert isinstance(body["code"], str) and body["code"], body
    assert words in body["error"], body
    assert f"Returned HTTP {status}" in failure["message"] and failure["name"] == "OpenWhiskError"


def test_create_list_get(summary):
    created = summary["created"]
    assert (created["name"], created["kind"], created["version"]) == (HELLO, "python:3", "0.0.1")
    assert {"key": "slo-ms", "value": 100} in created["annotations"]
    assert summary["createdZip"] == {"name": ZIPPED, "kind": "python:3", "binary": True}
    assert {HELLO, ZIPPED} <= set(summary["listed"])
    got = summary["got"]
    assert got["name"] == HELLO and got["sameCode"]
    assert got["parameters"] == [{"key": "greeting", "value": "hello"}]
    assert got["limits"]["timeout"] == 60000 and got["limits"]["memory"] == 256


def test_blocking_invocations(summary):
    record = summary["blocking"]
    assert re.fullmatch(r"[0-9a-f]{32}", record["activationId"]) and record["name"] == HELLO
    assert record["response"] == {"status": "success", "statusCode": 0, "success": True,
                                  "result": {"greeting": "hello Ada"}}
    logs = [line.split(" ", 1)[1] for line in record["logs"]]
    assert sorted(logs) == ["stderr: to stderr", "stdout: hello from Ada"]
    assert summary["blockingResult"] == {"greeting": "hello Bo"}
    assert summary["serverResult"] == {"greeting": "hello Cy"}
    assert summary["zipResult"] == {"shouted": "SWAP!"}


def test_non_blocking_invocation_and_its_activation(summary):
    run = summary["nonBlocking"]
    assert set(run["queued"]) == {"activationId"}
    activation_id = run["queued"]["activationId"]
    assert run["activation"]["activationId"] == activation_id and run["activation"]["name"] == HELLO
    assert run["activation"]["response"]["result"] == {"greeting": "hello Di"}
    assert run["result"] == run["activation"]["response"]
    assert [line.split(" ", 1)[1] for line in run["logs"]["logs"] if "stdout" in line] == ["stdout: hello from Di"]
    listed = summary["activationsListed"]
    assert listed[0] == activation_id and summary["blocking"]["activationId"] in listed


def test_errors_have_status_and_openwhisk_shape(summary):
    errors = summary["errors"]
    assert_error(errors["unauthorized"], 401, "The supplied authentication is invalid.")
    assert_error(errors["missingAction"], 404, "does not exist")
    assert_error(errors["missingActivation"], 404, "does not exist")
    assert_error(errors["exists"], 409, "already exists")
    assert_error(errors["tooLarge"], 413, "1048576")


def test_update_then_delete(summary):
    assert summary["updated"] == {"version": "0.0.2", "parameters": [{"key": "greeting", "value": "hey"}]}
    assert summary["afterUpdate"] == {"greeting": "hey Ed"}
    assert summary["deleted"] == [HELLO, ZIPPED]
    after = summary["afterDelete"]
    assert_error(after["get"], 404, "does not exist")
    assert_error(after["invoke"], 404, "does not exist")
    assert not {HELLO, ZIPPED} & set(after["listed"])
