"""Does one GPU-server process drive two GPUs at once? (issue 3: the GIL)

    python bench/parallel.py [--model resnet50] [--clients 4] [--seconds 10]

One GPU server (``Node`` + the real Unix-socket ``Server``, in this process) serves two copies
of ``--model`` (bench/models.py, batch 1, CUDA graphs on), one resident on each GPU. Clients
are separate processes, each a closed loop of ``GPUServerClient.infer`` through the socket.
Phase 1: ``--clients`` clients on GPU 0 alone. Phase 2: as many on each of GPU 0 and GPU 1
at once. If one process could not feed two GPUs (Python's GIL serialising the per-request
work of both), each GPU's rate in phase 2 would fall well below phase 1's;
``scaling`` = (rate 0 + rate 1 in phase 2) ÷ (2 × rate 0 in phase 1) says how close to
perfect (1.0) it is. Writes ``<out>/<gpu>-parallel.json`` with the command.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from runtime.gpu_server import zoo
from runtime.gpu_server.device import discover
from runtime.gpu_server.node import Node
from runtime.gpu_server.repository import ModelSpec, Repository
from runtime.gpu_server.store import ModelStore

from models import MODELS  # bench/models.py: python puts bench/ on sys.path


def client_loop(socket: str, model: str, device: int, x: np.ndarray, seconds: float, start, counts) -> None:
    """One client: a first call (connection, resident model), then at the shared ``start``
    barrier a closed loop of inferences for ``seconds``; puts (device, requests/s, first
    call ms) on ``counts``."""
    from runtime.client import GPUServerClient

    client = GPUServerClient(socket)
    t = time.perf_counter()
    client.infer(model, [x], device=device)
    first_ms = (time.perf_counter() - t) * 1e3
    start.wait()
    began, done = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        client.infer(model, [x], device=device)
        done += 1
    counts.put((device, done / (time.perf_counter() - began), first_ms))


def phase(socket: str, jobs: list[tuple[str, int]], x: np.ndarray, seconds: float) -> tuple[dict[int, float], list]:
    """Runs one client process per job (model, device), all starting together after their
    first call; returns (requests/s by device, [(device, first call ms), ...])."""
    ctx = multiprocessing.get_context("spawn")
    counts, start = ctx.Queue(), ctx.Barrier(len(jobs))
    procs = [ctx.Process(target=client_loop, args=(socket, m, d, x, seconds, start, counts)) for m, d in jobs]
    for p in procs:
        p.start()
    rates: dict[int, float] = {}
    firsts = []
    for _ in procs:
        device, rate, first_ms = counts.get()
        rates[device] = rates.get(device, 0.0) + rate
        firsts.append((device, round(first_ms, 2)))
    for p in procs:
        p.join()
    return rates, firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    from runtime.client import GPUServerClient
    from runtime.gpu_server.config import GPUServerSettings
    from runtime.gpu_server.server import Server, Service

    arch, config, specs = MODELS[args.model]
    root = Path(tempfile.mkdtemp(prefix="torpor-parallel-"))
    repo = Repository(root / "models")
    torch.manual_seed(0)
    module = zoo.build(arch, config)
    names = [f"{args.model}-gpu{k}" for k in range(2)]
    for name in names:
        folder = repo.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(module, str(folder / "model.safetensors"))
        ModelSpec(name=name, inputs=specs, architecture=arch, config=config).write(folder)
    node = Node(ModelStore(repo, pin=True), discover(0, 0, 8 << 30), 2 << 20)
    settings = GPUServerSettings(socket=str(root / "gpu.sock"))
    server = Server(settings.socket, Service(node, settings), 0o660)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    x = np.random.default_rng(0).standard_normal(specs[0].shape, dtype=np.float32)
    client = GPUServerClient(settings.socket)
    for k, name in enumerate(names):
        for _ in range(2):  # resident; the second run queues the graph capture
            client.infer(name, [x], device=k)
    for ex in node.executors:
        if not ex.wait_for_captures(120.0):
            raise RuntimeError(f"device {ex.device.index}: graph capture unfinished after 120 s")
    alone, _ = phase(settings.socket, [(names[0], 0)] * args.clients, x, args.seconds)
    both, firsts = phase(settings.socket, [(names[0], 0)] * args.clients + [(names[1], 1)] * args.clients, x,
                         args.seconds)
    placed = {name: [e.device.index for e in node.executors if e.is_resident(name)] for name in names}
    server.shutdown()
    result = {
        "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
        "model": args.model, "clients_per_gpu": args.clients, "seconds": args.seconds,
        "alone_rps": {"0": round(alone[0], 1)}, "both_rps": {str(d): round(r, 1) for d, r in sorted(both.items())},
        "scaling": round((both[0] + both[1]) / (2 * alone[0]), 3),
        "first_call_ms": firsts, "resident_on": placed, "runs": [e.stats.runs for e in node.executors],
        "command": "python bench/parallel.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['gpu'].lower().replace(' ', '-')}-parallel.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
