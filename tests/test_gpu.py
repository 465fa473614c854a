"""Cases of issue 6 that only a CUDA GPU can show, against a real ``torpor gpu-server`` process
on the machine's GPUs (skipped where there is none; run on the device machine, see
docs/faults.md):

- case 8: a CUDA fault on one GPU (a model indexing out of bounds on the device: token ids
  past its embedding, in a registration that lacks the id limits; eagerly, and inside a
  CUDA graph replay) → the caller gets a 5xx naming the fault, the GPU is unhealthy in
  Redis and in ``/readyz``; that the other GPU keeps serving is an expected failure until
  each GPU has its own process;
- case 1 on a GPU: 1,000 swap-in/evict cycles with an inference each leave NVML's used device
  memory and the server's host RSS flat within 64 MB;
- CUDA graphs are captured off the request path (the executor's capture thread);
- the host store's buffers (store.host_buffer) are page-locked at their exact size, for
  every GPU.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
import requests
import torch

import models
from gpu_process import GPUServerProcess
from runtime.client import ModelError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARENA = str(1 << 30)
FLAT_BYTES = 64 << 20
CYCLES = 1000


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def nvml_used(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
    finally:
        pynvml.nvmlShutdown()


def wait_for(predicate, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def captured(client) -> int:
    """Graph captures finished on device 0, or -1 while one is queued."""
    device = client.stats()["devices"][0]
    return -1 if device["captures_queued"] else device["graph_captures"]


def test_graphs_are_captured_off_the_request_path():
    server = GPUServerProcess(("resnet",), devices=0, regions=0, extra=("--arena-bytes", ARENA))
    try:
        client = server.client()
        x = models.inputs("resnet")
        want = models.native(server.natives["resnet"], x)
        for _ in range(2):  # the swap-in's eager run, then a warm eager run: it queues the capture
            np.testing.assert_allclose(client.infer("resnet", x, device=0)[0], want[0], rtol=1e-4, atol=1e-5)
        assert wait_for(lambda: captured(client) == 1, 60.0)  # done with no request in flight
        assert client.stats()["devices"][0]["graph_runs"] == 0
        np.testing.assert_allclose(client.infer("resnet", x, device=0)[0], want[0], rtol=1e-4, atol=1e-5)
        assert client.stats()["devices"][0]["graph_runs"] == 1
    finally:
        server.stop()


def fault_device_0(redis_url: str, good_runs: int = 1) -> tuple[GPUServerProcess, list[np.ndarray], list[np.ndarray]]:
    """A GPU server whose device 0 just took a device-side assert, after ``good_runs``
    correct requests (a graph is captured after the second request, off the request path;
    from the third on, requests replay it — the bad one too, when it comes third or later);
    returns it, good inputs of its ``gpt2`` model and their native outputs. Checks the
    caller's 5xx naming the fault."""
    server = GPUServerProcess(("gpt2",), devices=0, regions=0,
                              extra=("--arena-bytes", ARENA, "--redis-url", redis_url, "--node-id", "gpu-test"))
    # The server refuses ids outside a registered embedding before the run; a registration
    # without those limits (made by a Torpor before they were recorded) lets the bad ids
    # reach the GPU, where they are a sticky device-side assert. The server reads the spec
    # at the model's first request, which comes after this edit.
    spec_path = server.repo.folder("gpt2") / "model.json"
    spec = json.loads(spec_path.read_text())
    for entry in spec["inputs"]:
        entry["high"] = entry["max_len"] = None
    spec_path.write_text(json.dumps(spec))
    good = models.inputs("gpt2")
    want = models.native(server.natives["gpt2"], good)
    client = server.client()
    for i in range(good_runs):
        np.testing.assert_allclose(client.infer("gpt2", good, device=0)[0], want[0], rtol=1e-4, atol=1e-5)
        if i == 1:
            assert wait_for(lambda: captured(client) == 1, 60.0)
    bad = [np.full_like(good[0], models.TINY["gpt2"].vocab + 1000)]  # embedding rows that do not exist
    with pytest.raises(ModelError) as caught:
        client.infer("gpt2", bad, device=0)
    if not (500 <= caught.value.status < 600 and caught.value.code == "device_fault" and "device 0" in str(caught.value)):
        pytest.fail(f"{caught.value!r}\n--- server log ---\n{server.log_path.read_text()[-6000:]}")
    return server, good, want


def test_cuda_fault_marks_the_gpu_unhealthy_in_redis_and_readiness(redis_url):
    server, _, _ = fault_device_0(redis_url)
    try:
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert wait_for(lambda: r.hget("torpor:node:gpu-test:device:0", "healthy") == "0"), \
            r.hgetall("torpor:node:gpu-test:device:0")
        assert "AcceleratorError" in r.hget("torpor:node:gpu-test:device:0", "fault")
        ready = requests.get(server.metrics_url + "/readyz", timeout=10)
        assert ready.status_code == 503 and not ready.json()["devices"][0]["ready"], ready.text
        assert requests.get(server.metrics_url + "/healthz", timeout=10).status_code == 200
    finally:
        server.stop()


def test_cuda_fault_inside_a_graph_replay_is_a_device_fault(redis_url):
    server, _, _ = fault_device_0(redis_url, good_runs=3)  # captured after the second, replayed at the third
    try:
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert wait_for(lambda: r.hget("torpor:node:gpu-test:device:0", "healthy") == "0")
        text = requests.get(server.metrics_url + "/metrics", timeout=10).text
        runs = [line for line in text.splitlines() if line.startswith('torpor_gpu_graph_runs_total{device="0"}')]
        assert runs and float(runs[0].split()[-1]) >= 2, runs  # the third good request and the bad one
    finally:
        server.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.xfail(strict=True, reason="one process serves every GPU, and a device-side assert is sticky for the "
                   "whole process: on 2xH200 GPU 1 failed its probe kernel with the same error. Needs one executor "
                   "process per GPU (issue 3), not built yet")
def test_cuda_fault_on_one_gpu_leaves_the_other_serving(redis_url):
    server, good, want = fault_device_0(redis_url)
    try:
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert wait_for(lambda: r.hget("torpor:node:gpu-test:device:0", "healthy") == "0")
        ready = requests.get(server.metrics_url + "/readyz", timeout=10).json()
        assert [d["ready"] for d in ready["devices"]] == [False, True], ready
        client = server.client()
        for hint in (0, 1, None):  # even a hint for the failed GPU is served by the healthy one
            np.testing.assert_allclose(client.infer("gpt2", good, device=hint)[0], want[0], rtol=1e-4, atol=1e-5)
    finally:
        server.stop()


def test_thousand_swap_cycles_leave_device_and_host_memory_flat():
    server = GPUServerProcess(("resnet", "vit"), devices=0, regions=0, extra=("--arena-bytes", ARENA))
    try:
        client = server.client()
        arrays = {k: models.inputs(k) for k in ("resnet", "vit")}
        want = {k: models.native(server.natives[k], arrays[k]) for k in arrays}

        def cycle(kind: str) -> None:
            client.evict(kind)
            out = client.infer(kind, arrays[kind], device=0)
            np.testing.assert_allclose(out[0], want[kind][0], rtol=1e-4, atol=1e-5)

        for i in range(50):  # allocator pools grown (every run here swaps in: no graph is captured)
            cycle(("resnet", "vit")[i % 2])
        device0, host0 = nvml_used(0), rss_bytes(server.proc.pid)
        swaps0 = client.stats()["devices"][0]["swap_ins"]
        for i in range(CYCLES):
            cycle(("resnet", "vit")[i % 2])
        device1, host1 = nvml_used(0), rss_bytes(server.proc.pid)
        assert client.stats()["devices"][0]["swap_ins"] - swaps0 == CYCLES
        assert abs(device1 - device0) <= FLAT_BYTES, (device0, device1)
        assert abs(host1 - host0) <= FLAT_BYTES, (host0, host1)
        print(f"device used {device0 / 2**20:.1f} -> {device1 / 2**20:.1f} MiB, "
              f"host RSS {host0 / 2**20:.1f} -> {host1 / 2**20:.1f} MiB over {CYCLES} cycles")
    finally:
        server.stop()


def test_host_buffers_are_page_locked_at_their_exact_size():
    from runtime.gpu_server.store import host_buffer

    nbytes = 100_000_000 + 12_345  # PyTorch's pinned allocator would take 128 MiB for it
    buffer = host_buffer(nbytes, pin=True)
    assert buffer.is_pinned() and buffer.untyped_storage().nbytes() == nbytes
    buffer.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    for device in range(torch.cuda.device_count()):  # pinned for every device's context
        on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
        on_device.copy_(buffer, non_blocking=True)
        torch.cuda.synchronize(device)
        assert torch.equal(on_device.cpu(), buffer)
