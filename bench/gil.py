"""How much a busy Python thread slows an eager run in the same process (the GPU server's
``gil_switch_interval_ms``).

    python3 bench/gil.py [--device cpu|cuda] [--busy 2] [--runs 20] [--out bench/results]

An eager forward pass releases the GIL around every operator it launches and must get it
back before launching the next. A thread that holds the GIL in pure Python (a model load's
loop over weights, a capture, request parsing) keeps it until the interpreter's switch
interval (``sys.setswitchinterval``, 5 ms by default) asks it to let go, so each launch can
wait that long: a ResNet of hundreds of launches goes from milliseconds to seconds. Measured
here: the median of ``--runs`` eager forwards of a real architecture (the zoo's transformers
``resnet``, ResNet-50's depth at reduced width, batch 1, 1×3×224×224 float32), alone and
with ``--busy`` threads spinning in Python, at several switch intervals. Writes
``<out>/gil-<device>.json`` with the command.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.gpu_server import zoo  # noqa: E402

CONFIG = {"num_channels": 3, "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [3, 4, 6, 3],
          "layer_type": "bottleneck", "num_labels": 1000}
INTERVALS_MS = (5.0, 1.0, 0.25, 0.05)


def forward_ms(module: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median wall time of one eager forward of ``module`` on ``x`` (device synchronised), ms."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        module(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def with_busy_threads(count: int, measure):
    """``measure()`` while ``count`` threads spin in pure Python (holding the GIL whenever
    they run)."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(i * i for i in range(1000))

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    try:
        return measure()
    finally:
        stop.set()
        for t in threads:
            t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--busy", type=int, default=2, help="threads spinning in Python beside the run")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = zoo.build("resnet", CONFIG).eval().to(device)
    x = torch.randn(1, 3, 224, 224, device=device)
    default = sys.getswitchinterval()
    with torch.inference_mode():
        forward_ms(module, x, 3)
        alone = forward_ms(module, x, args.runs)
        busy = {}
        for interval in INTERVALS_MS:
            sys.setswitchinterval(interval / 1e3)
            busy[str(interval)] = with_busy_threads(args.busy, lambda: forward_ms(module, x, args.runs))
            print(f"switch interval {interval:5.2f} ms: {busy[str(interval)]:9.2f} ms with {args.busy} busy threads "
                  f"({busy[str(interval)] / alone:.1f}x alone, {alone:.2f} ms)")
    sys.setswitchinterval(default)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "busy_threads": args.busy, "runs": args.runs, "alone_ms": alone,
              "busy_ms_by_switch_interval_ms": busy,
              "command": "python bench/gil.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gil-{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
