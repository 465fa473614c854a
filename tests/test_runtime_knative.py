"""The action runtime as a Knative Service runs it: ``__OW_RUNTIME_PLATFORM=knative``, ``PORT``
and ``K_SERVICE`` set, everything through ``POST /``; code either sent in ``init`` or given
to a dedicated image through ``__OW_ACTION_*``."""
from __future__ import annotations

import pytest

from test_runtime_conformance import REINIT, RuntimeProcess, zipped

KNATIVE = {"__OW_RUNTIME_PLATFORM": "knative", "K_SERVICE": "hello", "K_REVISION": "hello-00001",
           "K_CONFIGURATION": "hello"}

HELLO = """
import os
def main(args):
    print("hello " + args.get("name", "stranger"))
    return {"greeting": "Hello " + args.get("name", "stranger"), "service": os.environ["K_SERVICE"],
            "namespace": os.environ.get("__OW_NAMESPACE"), "activation": os.environ.get("__OW_ACTIVATION_ID")}
"""
INIT = {"name": "hello", "main": "main", "code": HELLO, "binary": False}


@pytest.fixture
def knative(tmp_path):
    """Starts runtimes in Knative mode (extra env per call); stops them afterwards."""
    started = []

    def start(**env: str) -> RuntimeProcess:
        started.append(RuntimeProcess(tmp_path, **KNATIVE, **env))
        return started[-1]

    yield start
    for runtime in started:
        runtime.close()


def test_init_then_run_through_the_single_entry_point(knative):
    runtime = knative()
    mark = runtime.mark()
    r = runtime.post("/", {"init": INIT})
    assert r.status_code == 200
    r = runtime.post("/", {"activation": {"namespace": "guest", "activation_id": "k1"}, "value": {"name": "Joe"}})
    assert r.status_code == 200
    assert r.json() == {"greeting": "Hello Joe", "service": "hello", "namespace": "guest", "activation": "k1"}
    out, _ = runtime.wait_sentinels(mark)
    assert out == ["hello Joe", "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"]
    # an init alone on an initialised runtime is refused, without a sentinel
    mark = runtime.mark()
    r = runtime.post("/", {"init": INIT})
    assert r.status_code == 403
    assert r.json() == {"error": REINIT}
    assert runtime.post("/", {"value": {}}).status_code == 200
    out, err = runtime.wait_sentinels(mark)
    assert REINIT in out and REINIT in err


def test_init_and_run_in_one_request(knative):
    runtime = knative()
    both = {"init": INIT, "activation": {"namespace": "guest"}, "value": {"name": "Ann"}}
    r = runtime.post("/", both)
    assert r.status_code == 200
    assert r.json()["greeting"] == "Hello Ann"
    # a warm pod gets the same init with every request and runs it
    both["value"] = {"name": "Bob"}
    assert runtime.post("/", both).json()["greeting"] == "Hello Bob"
    # other code on an initialised pod is refused
    other = dict(both, init=dict(INIT, code="def main(args):\n    return {}\n"))
    r = runtime.post("/", other)
    assert r.status_code == 403
    assert r.json() == {"error": REINIT}


def test_run_before_init_and_malformed_requests(knative):
    runtime = knative(TORPOR_MAX_PAYLOAD_BYTES="1000")
    r = runtime.post("/", {"value": {"name": "Joe"}})
    assert r.status_code == 502
    r = runtime.post("/", {"something": "else"})
    assert r.status_code == 400
    assert "init" in r.json()["error"]
    r = runtime.post("/", data=b'{"init": ')
    assert r.status_code == 400
    assert "truncated" in r.json()["error"]
    # a run-only request is held to the payload limit, not the code limit
    r = runtime.post("/", {"value": {"blob": "z" * 70_000}})
    assert r.status_code == 413
    assert r.json()["error"].endswith(f"limit {1000 + 64 * 1024} bytes")
    r = runtime.post("/", {"init": INIT, "activation": "not an object", "value": {}})
    assert r.status_code == 400
    assert "activation" in r.json()["error"]


def test_dedicated_image_takes_code_from_the_environment(knative):
    runtime = knative(__OW_ACTION_CODE=HELLO, __OW_ACTION_NAME="hello")
    assert runtime.post("/", {"value": {"name": "Eve"}}).json()["greeting"] == "Hello Eve"
    r = runtime.post("/", {"init": INIT})
    assert r.status_code == 403
    assert r.json() == {"error": REINIT}
    assert runtime.post("/init", {"value": INIT}).status_code == 403


def test_dedicated_image_with_a_zip_and_another_entry_point(knative):
    code = zipped({"__main__.py": "def niam(args):\n    return {'echo': args}\n"})
    runtime = knative(__OW_ACTION_CODE=code, __OW_ACTION_BINARY="true", __OW_ACTION_MAIN="niam")
    r = runtime.post("/", {"activation": {"activation_id": "z1"}, "value": {"a": [1, 2]}})
    assert r.status_code == 200
    assert r.json() == {"echo": {"a": [1, 2]}}


def test_dedicated_image_whose_code_fails_reports_it_on_every_run(knative):
    runtime = knative(__OW_ACTION_CODE="raise RuntimeError('broken at import')\n")
    for _ in range(2):
        r = runtime.post("/", {"value": {}})
        assert r.status_code == 502
        assert "broken at import" in r.json()["error"]
