"""First-load time of a registered model in the GPU server's host store (store.load): the
packed path (layout stored at registration, template built on the meta device, weights read
straight into the host buffer) against the CPU path (build with weight initialisation, load
the weights, trace one forward pass, pack), on the bench model set (bench/models.py).

    python bench/load.py --models bert-large,gpt2-large --out bench/results/load-cpu.json

Each model is registered once (its registration time is reported too: it now traces the
layout), then loaded ``--repeats`` times by each path, alternating; medians are reported.
``--pin`` page-locks the host buffers as a GPU server on CUDA does. ``--concurrency N`` also
times N packed loads of each model at once from N threads, as the GPU server's loader pool
(``max_loads``) runs them, under the server's thread settings (one intra-op thread is
``--threads 1``; ``--switch-interval-ms``); the small demo models (runtime/demo.py) fit a
laptop:

    python bench/load.py --models resnet-s,resnet-m,vit-s,bert-qa-s,gpt2-s --concurrency 8 \
        --switch-interval-ms 0.25 --out bench/results/load-concurrency-cpu.json
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import torch
from safetensors.torch import save_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import MODELS  # noqa: E402
from runtime import demo  # noqa: E402
from runtime.gpu_server import zoo  # noqa: E402
from runtime.gpu_server.repository import LAYOUT_FILE, ModelSpec, Repository  # noqa: E402
from runtime.gpu_server.store import load  # noqa: E402


def timed_load(spec: ModelSpec, pin: bool, packed: bool) -> float:
    """One store.load of ``spec`` in ms; the CPU path is forced by hiding the stored layout."""
    layout = Path(spec.path) / LAYOUT_FILE
    hidden = layout.with_suffix(".hidden")
    if not packed:
        layout.rename(hidden)
    try:
        started = time.perf_counter()
        model = load(spec, pin)
        elapsed = (time.perf_counter() - started) * 1e3
    finally:
        if not packed:
            hidden.rename(layout)
    if packed and model.template.parameters().__next__().device.type != "meta":
        raise click.ClickException(f"{spec.name}: the packed path did not apply")
    return elapsed


@click.command(help=__doc__)
@click.option("--models", "names", default="bert-large,gpt2-large", show_default=True,
              help="comma-separated names from bench/models.py or runtime/demo.py")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--pin/--no-pin", default=False, show_default=True, help="page-lock the host buffers (needs CUDA)")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="torch intra-op threads")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1),
              help="also time this many packed loads of each model at once (1: none)")
@click.option("--switch-interval-ms", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Python's thread switch interval, ms (the GPU server sets one; default: Python's)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write the result JSON here")
def main(names: str, repeats: int, pin: bool, threads: int, concurrency: int, switch_interval_ms: float | None,
         out: Path | None) -> None:
    torch.set_num_threads(threads)
    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1e3)
    table = {**MODELS, **{m.name: (m.architecture, m.config, m.inputs) for m in demo.MODELS}}
    unknown = [n for n in names.split(",") if n not in table]
    if unknown:
        raise click.BadParameter(f"unknown models {unknown}; known: {', '.join(table)}", param_hint="--models")
    root = Path(tempfile.mkdtemp(prefix="torpor-load-"))
    repo = Repository(root / "models")
    results = {}
    for name in names.split(","):
        arch, config, inputs = table[name]
        torch.manual_seed(0)
        weights = root / f"{name}.safetensors"
        save_model(zoo.build(arch, config), str(weights))
        started = time.perf_counter()
        spec = repo.register(ModelSpec(name=name, inputs=inputs, architecture=arch, config=config), weights)
        register_ms = (time.perf_counter() - started) * 1e3
        weights.unlink()
        cpu, packed = [], []
        for _ in range(repeats):
            cpu.append(timed_load(spec, pin, packed=False))
            packed.append(timed_load(spec, pin, packed=True))
        results[name] = {"bytes": spec.bytes, "register_ms": round(register_ms, 1),
                         "cpu_path_ms": round(statistics.median(cpu), 1),
                         "packed_ms": round(statistics.median(packed), 1),
                         "speedup": round(statistics.median(cpu) / statistics.median(packed), 2)}
        if concurrency > 1:
            together = []
            with ThreadPoolExecutor(concurrency) as pool:
                for _ in range(repeats):
                    together += pool.map(lambda _: timed_load(spec, pin, packed=True), range(concurrency))
            results[name].update({f"packed_{concurrency}_at_once_ms": round(statistics.median(together), 1),
                                  f"packed_{concurrency}_at_once_max_ms": round(max(together), 1)})
        click.echo(f"{name}: {results[name]}", err=True)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": threads, "switch_interval_s": sys.getswitchinterval(), "concurrency": concurrency, "pin": pin,
              "repeats": repeats, "models": results,
              "command": "python bench/load.py " + " ".join(sys.argv[1:])}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
