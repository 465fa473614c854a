"""Swap benchmark on a GPU machine: how fast a cold model answers against a resident one and
against the transfer bound (issue 3).

    python bench/swap.py [--models resnet50,bert-large] [--out bench/results]

For each model (batch 1, fp32, random weights with a fixed seed): weight bytes; transfer
bound = bytes ÷ measured pinned host→GPU bandwidth; native warm eager latency (the module on
the GPU, in this process: inputs from the host, outputs back on the host as the served time
has them; ``native_warm_device_ms`` leaves the outputs on the GPU); served warm and cold
latencies measured inside the GPU server's node (request accepted → outputs on the host; CUDA graphs on); naive ``.to("cuda")`` of a
pageable CPU module + run; peer swap over NVLink + run when two GPUs exist; max abs
difference of served outputs against native. Medians of repeated runs. The redirection
overhead (client → Unix socket + shared memory → server → back, 1×3×224×224 in, 1×1000 out)
is measured separately. Writes ``<out>/<gpu>-swap.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_model

from runtime.gpu_server import zoo
from runtime.gpu_server.device import discover
from runtime.gpu_server.graphs import flatten
from runtime.gpu_server.node import Node
from runtime.gpu_server.repository import ModelSpec, Repository, TensorSpec
from runtime.gpu_server.store import ModelStore

from models import IMAGE, MODELS  # bench/models.py: python puts bench/ on sys.path


def timed(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in ms (``fn`` must synchronise what it times)."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def bandwidth(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Median copy bandwidth src → dst in GB/s."""
    def copy():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    copy()
    return src.numel() / timed(copy, 10) / 1e6


def inputs_of(specs: list[TensorSpec]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = []
    for s in specs:
        if s.dtype == "float32":
            out.append(torch.randn(s.shape, generator=g))
        else:
            out.append(torch.randint(1, 1000, s.shape, generator=g))
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def write_bench_model(repo: Repository, name: str) -> tuple[torch.nn.Module, list[TensorSpec]]:
    """Builds bench model ``name`` with seed-0 random weights and writes it into ``repo``
    (weights and spec, no validation run); returns the module and its input specs."""
    arch, config, specs = MODELS[name]
    torch.manual_seed(0)
    module = zoo.build(arch, config)
    folder = repo.folder(name)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(module, str(folder / "model.safetensors"))
    ModelSpec(name=name, inputs=specs, architecture=arch, config=config).write(folder)
    return module, specs


def bench_model(name: str, node: Node, repo: Repository, reps: int, h2d: float) -> dict:
    module, specs = write_bench_model(repo, name)
    x = inputs_of(specs)

    def naive():
        module.to("cuda")
        with torch.inference_mode():
            module(*[t.cuda() for t in x])
        torch.cuda.synchronize()
        module.to("cpu")
    naive_ms = timed(naive, 3)

    module.to("cuda")
    with torch.inference_mode():
        def native_device():
            out = module(*[t.cuda() for t in x])
            torch.cuda.synchronize()
            return out

        def native():  # what a plain process answers with: the outputs on the host
            return [o.cpu() for o in flatten(module(*[t.cuda() for t in x]))]
        for _ in range(3):
            native()
        native_ms = timed(native, reps)
        native_device_ms = timed(native_device, reps)
        reference = native()

    hm = node.store.get(name)
    ex0 = node.executors[0]
    for e in node.executors:
        e.evict(name)

    def serve(hint=0):
        outputs, info = node.infer(name, x, hint, 60.0)
        return outputs, info
    for _ in range(2):  # cold eager, then warm eager: queues the graph capture (off the request path)
        serve()
    if not ex0.wait_for_captures(120.0) or not any(k[0] == name for k in ex0.graphs.pairs):
        raise RuntimeError(f"{name}: no graph captured within 120 s of its second run")
    serve()
    warm_ms = timed(lambda: serve(), reps)
    warm_out, info = serve()
    assert info["path"] == "resident"

    def cold():
        ex0.evict(name)  # untimed: not part of the request
        started = time.perf_counter()
        outputs, info = serve()
        return outputs, info, (time.perf_counter() - started) * 1e3
    cold_out, info, _ = cold()
    assert info["swap_in"], info
    cold_ms = statistics.median(cold()[2] for _ in range(max(5, reps // 3)))

    nvlink_ms = None
    if len(node.executors) > 1:
        ex1 = node.executors[1]

        def peer() -> float:
            ex0.evict(name)  # untimed, as for cold()
            started = time.perf_counter()
            pinned = ex1.pin(hm)
            res, _ = ex0.acquire(hm, 60.0, ex1.region_bytes(pinned), prefetch=True)
            try:
                ex0.run(res, x)
            finally:
                ex0.release(res)
                ex1.release(pinned)
            return (time.perf_counter() - started) * 1e3
        ex0.evict(name)
        node.infer(name, x, 1, 60.0)  # resident nowhere, so the hint puts it on device 1
        if ex1.is_resident(name):
            nvlink_ms = statistics.median(peer() for _ in range(max(5, reps // 3)))
            ex1.evict(name)
    module.to("cpu")
    del module
    torch.cuda.empty_cache()
    pairs = [p for k, p in ex0.graphs.pairs.items() if k[0] == name]
    graph = ex0.snapshot()
    return {"capture_ms": sum(p.capture_ms for p in pairs), "graph_pool_bytes": sum(p.pool_bytes for p in pairs),
            "cold_group_bytes": pairs[0].group_bytes if pairs else None,
            "cold_graph_ms_by_group": {str(k): v for k, v in pairs[0].cold_ms.items()} if pairs else None,
            # what the executor measured at capture, and whether warm runs replay the graph
            "capture_eager_ms": pairs[0].eager_ms if pairs else None,
            "warm_graph_ms": pairs[0].warm_ms if pairs else None,
            "warm_runs_graph": pairs[0].warm_beats_eager if pairs else None,
            "bytes": hm.nbytes, "bound_ms": hm.nbytes / h2d / 1e6, "native_warm_ms": native_ms,
            "native_warm_device_ms": native_device_ms,
            "served_warm_ms": warm_ms, "naive_ms": naive_ms, "cold_pcie_ms": cold_ms, "cold_nvlink_ms": nvlink_ms,
            "max_abs_diff": max(max_diff(warm_out, reference), max_diff(cold_out, reference)),
            "graph_runs": graph.get("graph_runs"), "layout_traced": hm.layout.traced}


def redirect_overhead(node: Node, root: Path, reps: int) -> float:
    """Median of (client round trip − server time) in ms for resnet50 through the real socket."""
    from runtime.client import GPUServerClient
    from runtime.gpu_server.config import GPUServerSettings
    from runtime.gpu_server.server import Server, Service

    settings = GPUServerSettings(socket=str(root / "gpu.sock"))
    server = Server(settings.socket, Service(node, settings), 0o660)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = GPUServerClient(settings.socket)
    x = inputs_of(IMAGE)[0].numpy()
    overheads = []
    for _ in range(reps):
        t = time.perf_counter()
        client.infer("resnet50", [x])
        overheads.append((time.perf_counter() - t) * 1e3)
    server_ms = []
    for _ in range(reps):
        t = time.perf_counter()
        outputs, _info = node.infer("resnet50", [torch.from_numpy(x)], 0, 60.0)
        server_ms.append((time.perf_counter() - t) * 1e3)
    server.shutdown()
    return statistics.median(overheads) - statistics.median(server_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--group-mib", type=float, default=2.0, help="copy group size of eager host swap-ins (cold graphs pick theirs by measurement)")
    parser.add_argument("--tf32", action="store_true", help="cuDNN TF32 convolutions (the server's --cudnn-tf32)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # as the GPU server; native runs the same way
    torch.backends.cudnn.allow_tf32 = args.tf32
    gpu = torch.cuda.get_device_name(0)
    pinned = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    h2d = bandwidth(pinned, torch.empty_like(pinned, device="cuda:0"))
    pageable = bandwidth(torch.empty(1 << 30, dtype=torch.uint8), torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0"))
    p2p = None
    if torch.cuda.device_count() > 1:
        p2p = bandwidth(torch.empty(1 << 30, dtype=torch.uint8, device="cuda:1"), torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0"))
    del pinned
    root = Path(tempfile.mkdtemp(prefix="torpor-bench-"))
    repo = Repository(root / "models")
    devices = discover(0, 0, 16 << 30)
    node = Node(ModelStore(repo, pin=True), devices, int(args.group_mib * 2**20))
    result = {"gpu": gpu, "cudnn_tf32": args.tf32, "group_bytes": int(args.group_mib * 2**20), "gpus": torch.cuda.device_count(), "torch": torch.__version__, "h2d_pinned_GBps": h2d,
              "h2d_pageable_GBps": pageable, "p2p_GBps": p2p, "models": {},
              "command": "python bench/swap.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())}
    for name in args.models.split(","):
        started = time.time()
        result["models"][name] = r = bench_model(name, node, repo, args.reps, h2d)
        print(f"{name:16s} {r['bytes'] / 1e6:8.1f} MB bound {r['bound_ms']:7.2f} native {r['native_warm_ms']:7.2f} "
              f"warm {r['served_warm_ms']:7.2f} cold {r['cold_pcie_ms']:7.2f} naive {r['naive_ms']:8.2f} "
              f"nvlink {r['cold_nvlink_ms'] or float('nan'):7.2f} diff {r['max_abs_diff']:.1e} ({time.time() - started:.0f} s)",
              flush=True)
        node.forget(name)
    if "resnet50" in args.models.split(","):
        node.store.get("resnet50")
        result["redirect_overhead_ms"] = redirect_overhead(node, root, 200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("-tf32" if args.tf32 else "") + (f"-group{args.group_mib:g}mib" if args.group_mib != 2 else "")
    path = out / f"{gpu.lower().replace(' ', '-')}-swap{suffix}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "models"}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
