"""Loading a registered model from its stored layout (repository.write_layout, store.load): the
layout traced at registration is written beside the weights, and a GPU server packs the host
buffer straight from the files, with the template built on the meta device and no forward
pass. The packed buffer must be the one the CPU path (build, trace, pack) produces, and
served outputs must equal native execution of the same weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from runtime.gpu_server import store as store_module
from runtime.gpu_server.layout import ALIGNMENT, Layout, named_weights
from runtime.gpu_server.repository import EXTRA_WEIGHTS_FILE, LAYOUT_FILE, ModelLoadError
from runtime.gpu_server.store import HostModel, load


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slow_load(spec) -> HostModel:
    """The CPU path of store.load, as when no layout is stored."""
    layout_file = Path(spec.path) / LAYOUT_FILE
    saved = layout_file.read_bytes()
    layout_file.unlink()
    try:
        return load(spec, pin=False)
    finally:
        layout_file.write_bytes(saved)


def slot_bytes(model: HostModel) -> list[bytes]:
    return [model.buffer[s.offset:s.offset + s.nbytes].numpy().tobytes() for s in model.layout.slots]


def run(model: HostModel, kind: str) -> list:
    module = model.instantiate(model.buffer)
    return models.native(module, models.inputs(kind))


@pytest.mark.parametrize("kind", models.SMALL)
def test_the_packed_load_gives_the_cpu_paths_buffer_without_a_forward_pass(repo, monkeypatch, kind):
    native = models.register(repo, "m", kind)
    spec = repo.spec("m")
    reference = slow_load(spec)

    def no_trace(*_args, **_kwargs):
        raise AssertionError("the packed load must not trace")

    monkeypatch.setattr(store_module, "trace_layout", no_trace)
    monkeypatch.setattr(store_module, "build", no_trace)
    packed = load(spec, pin=False)
    assert {t.device.type for t in named_weights(packed.template).values()} == {"meta"}
    assert packed.layout.to_json() == reference.layout.to_json()
    assert slot_bytes(packed) == slot_bytes(reference)
    models.assert_same(run(packed, kind), models.native(native, models.inputs(kind)))


def test_non_persistent_buffers_travel_in_the_extra_file(repo):
    native = models.register(repo, "emb", "sentence-embedding")
    folder = Path(repo.spec("emb").path)
    from safetensors import safe_open
    with safe_open(str(folder / EXTRA_WEIGHTS_FILE), framework="pt") as f:
        extra = set(f.keys())
    assert extra and all(n.endswith(("position_ids", "token_type_ids")) for n in extra)
    packed = load(repo.spec("emb"), pin=False)
    models.assert_same(run(packed, "sentence-embedding"), models.native(native, models.inputs("sentence-embedding")))


def test_tied_weights_are_packed_once(repo):
    models.register(repo, "g", "gpt2")
    packed = load(repo.spec("g"), pin=False)
    slot = packed.layout.slot_of()["model.lm_head.weight"]
    assert "model.transformer.wte.weight" in slot.names
    module = packed.instantiate(packed.buffer)
    assert module.get_submodule("model.lm_head").weight.data_ptr() == \
        module.get_submodule("model.transformer.wte").weight.data_ptr()


def test_a_registration_without_a_layout_is_loaded_by_the_cpu_path(repo):
    native = models.register(repo, "old", "resnet")
    spec = repo.spec("old")
    (Path(spec.path) / LAYOUT_FILE).unlink()
    models.assert_same(run(load(spec, pin=False), "resnet"), models.native(native, models.inputs("resnet")))


def test_a_layout_that_names_other_weights_falls_back_to_the_cpu_path(repo):
    native = models.register(repo, "renamed", "resnet")
    layout_file = Path(repo.spec("renamed").path) / LAYOUT_FILE
    data = json.loads(layout_file.read_text())
    data["slots"][0]["names"] = ["no.such.weight"]
    layout_file.write_text(json.dumps(data))
    models.assert_same(run(load(repo.spec("renamed"), pin=False), "resnet"), models.native(native, models.inputs("resnet")))


def test_a_layout_that_disagrees_with_the_weights_file_is_a_load_error(repo):
    models.register(repo, "bad", "resnet")
    layout_file = Path(repo.spec("bad").path) / LAYOUT_FILE
    data = json.loads(layout_file.read_text())
    first = data["slots"][0]
    first["shape"] = [first["nbytes"] // 4]  # same bytes, other shape than in the file
    layout_file.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=first["names"][0]):
        load(repo.spec("bad"), pin=False)


def test_a_malformed_layout_is_a_load_error_naming_the_file(repo):
    models.register(repo, "junk", "resnet")
    (Path(repo.spec("junk").path) / LAYOUT_FILE).write_text('{"slots": 3}')
    with pytest.raises(ModelLoadError, match=LAYOUT_FILE):
        load(repo.spec("junk"), pin=False)


@pytest.mark.parametrize("change, problem", [
    (lambda s: s[1].update(offset=s[0]["offset"]), "slot"),            # overlaps the first
    (lambda s: s[1].update(offset=s[1]["offset"] + 4), "slot"),        # misaligned
    (lambda s: s[0].update(dtype="float16"), "slot"),                  # bytes disagree with dtype
    (lambda s: s[0].update(dtype="not_a_dtype"), "malformed"),
])
def test_layout_from_json_refuses_inconsistent_slots(change, problem):
    layout = Layout.from_json({"total_bytes": 4 * ALIGNMENT, "traced": True, "first_use_end": {"": 2 * ALIGNMENT},
                               "slots": [{"names": ["a"], "offset": 0, "nbytes": 64, "shape": [16], "dtype": "float32"},
                                         {"names": ["b"], "offset": ALIGNMENT, "nbytes": 8, "shape": [2, 1],
                                          "dtype": "float32"}]})
    data = layout.to_json()
    assert Layout.from_json(data).to_json() == data
    change(data["slots"])
    with pytest.raises(ValueError, match=problem):
        Layout.from_json(data)


def test_layout_from_json_refuses_slots_past_the_end():
    with pytest.raises(ValueError, match="past total_bytes"):
        Layout.from_json({"total_bytes": ALIGNMENT, "traced": True, "first_use_end": {},
                          "slots": [{"names": ["a"], "offset": 0, "nbytes": 1024, "shape": [256],
                                     "dtype": "float32"}]})


def test_a_packed_model_is_served_equal_to_native_through_the_store(repo):
    from runtime.gpu_server.store import ModelStore
    native = models.register(repo, "served", "vit")
    model = ModelStore(repo, pin=False).get("served")
    assert all(t.device == torch.device("meta") for t in named_weights(model.template).values())
    models.assert_same(run(model, "vit"), models.native(native, models.inputs("vit")))


@pytest.mark.parametrize("change, words", [
    (lambda d: d["slots"][1]["names"].append(d["slots"][0]["names"][0]), "named in two slots"),
    (lambda d: d["slots"][0].update(names=[]), "non-empty list"),
    (lambda d: d["slots"][0].update(shape="ab"), "list of non-negative integers"),
    (lambda d: d.update(total_bytes=2 ** 62), "claims"),
    (lambda d: d["first_use_end"].update({"": 3}), "first_use_end"),
], ids=["duplicate-name", "no-names", "string-shape", "huge", "first-use-end"])
def test_a_tampered_layout_is_a_load_error_never_wrong_outputs(repo, change, words):
    models.register(repo, "t", "gpt2")
    layout_file = Path(repo.spec("t").path) / LAYOUT_FILE
    data = json.loads(layout_file.read_text())
    change(data)
    layout_file.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=words):
        load(repo.spec("t"), pin=False)


def test_a_layout_nested_too_deeply_is_a_load_error(repo):
    models.register(repo, "deep", "resnet")
    (Path(repo.spec("deep").path) / LAYOUT_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match=LAYOUT_FILE):
        load(repo.spec("deep"), pin=False)


def test_host_buffers_are_page_aligned_mappings_of_the_layouts_size(repo):
    models.register(repo, "m", "resnet")
    model = store_module.ModelStore(repo, pin=False).get("m")
    # its own mapping (store.host_buffer), exactly sized: on CUDA it is page-locked in place,
    # where PyTorch's pinned allocator would round it up to a power of two (tests/test_gpu.py)
    assert model.buffer.data_ptr() % 4096 == 0
    assert model.buffer.untyped_storage().nbytes() == model.layout.total_bytes


def test_a_dropped_model_keeps_its_host_memory_for_the_grace_period_then_frees_it(repo, monkeypatch):
    import gc
    import time
    import weakref

    for name in ("a", "b"):
        models.register(repo, name, "resnet")
    monkeypatch.setattr(store_module, "VERSION_CHECK_S", 0.0)  # every get checks the version
    store = store_module.ModelStore(repo, pin=False, retire_grace_s=3.0)  # ample on a loaded CI machine
    held = weakref.ref(store.get("a"))
    store.get("b")
    assert store.drop("a") is not None
    gc.collect()
    assert held() is not None  # copies issued from its buffer just before may still be reading it
    store.get("b")
    gc.collect()
    assert held() is not None
    time.sleep(3.2)
    store.get("b")  # the next version check lets go of what has served its grace
    gc.collect()
    assert held() is None


def _truncate(data: bytes) -> bytes:
    return data[:-100]


def _huge_header(data: bytes) -> bytes:
    return (2 ** 40).to_bytes(8, "little") + data[8:]


def _broken_header(data: bytes) -> bytes:
    return data[:8] + b"[" + data[9:]  # the JSON object opens as a list


def _shifted_offsets(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(n for n in header if n != "__metadata__")
    header[name]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


@pytest.mark.parametrize("damage, words", [
    (_truncate, "ends inside weight"),
    (_huge_header, "not a safetensors file"),
    (_broken_header, "malformed safetensors header"),
    (_shifted_offsets, "spans bytes"),
], ids=["truncated", "huge-header", "broken-header", "shifted-offsets"])
def test_a_damaged_weights_file_is_a_load_error_naming_the_model(repo, damage, words):
    # the packed path reads the safetensors header and the weights' bytes itself (store.py)
    models.register(repo, "w", "resnet")
    spec = repo.spec("w")
    weights = Path(spec.path) / spec.weights
    weights.chmod(0o644)
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelLoadError, match=f"model w.*{words}"):
        load(spec, pin=False)
