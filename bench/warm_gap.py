"""Where a served model's warm time differs from native: the same weights run four ways on one
GPU, outputs left on the device, medians of ``--reps`` runs (issue 3: bert-large's served warm
time was 1.04 × native on 1×H200, with the same kernels in its CUDA graph).

    python bench/warm_gap.py [--models bert-large,resnet50] [--out bench/results]

- ``eager_own``: ``module.cuda()`` run eagerly on the default stream — native;
- ``graph_own``: that module captured into a CUDA graph on a side stream, replayed;
- ``eager_arena``: a copy bound to the model's bytes in one device buffer, as the GPU server
  binds it (store.HostModel.instantiate on a slice of an arena), run eagerly;
- ``graph_arena``: that copy captured and replayed — what the served warm path does.

``graph_own`` vs ``eager_own`` isolates the graph, ``eager_arena`` vs ``eager_own`` the packed
weights (alignment, one allocation). Writes ``<out>/<gpu>-warm-gap.json``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from runtime.gpu_server.graphs import flatten
from runtime.gpu_server.repository import Repository
from runtime.gpu_server.store import ModelStore

from swap import inputs_of, max_diff, timed, write_bench_model  # bench/swap.py: python puts bench/ on sys.path


def median_ms(fn, reps: int, stream: torch.cuda.Stream) -> float:
    """Median wall time of ``fn()`` followed by a synchronisation of ``stream``, ms."""
    stream.synchronize()
    return timed(lambda: (fn(), stream.synchronize()), reps)


def eager_and_graph(module: torch.nn.Module, inputs: list[torch.Tensor], reps: int) -> tuple[float, float, list]:
    """(eager ms on the default stream, graph replay ms on a side stream, graph outputs)."""
    default = torch.cuda.current_stream()
    static = [x.cuda() for x in inputs]
    for _ in range(3):
        module(*static)
    eager = median_ms(lambda: module(*static), reps, default)
    side = torch.cuda.Stream()
    side.wait_stream(default)
    with torch.cuda.stream(side):
        for _ in range(2):
            module(*static)
    default.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = flatten(module(*static))
    for _ in range(3):
        graph.replay()
    return eager, median_ms(graph.replay, reps, torch.cuda.current_stream()), [o.clone() for o in out]


def bench_model(name: str, root: Path, reps: int) -> dict:
    repo = Repository(root / "models")
    module, specs = write_bench_model(repo, name)
    module.eval()
    hm = ModelStore(repo, pin=True).get(name)
    x = inputs_of(specs)
    with torch.inference_mode():
        module.cuda()
        eager_own, graph_own, out_own = eager_and_graph(module, x, reps)
        module.cpu()
        arena = torch.empty(hm.nbytes, dtype=torch.uint8, device="cuda")
        arena.copy_(hm.buffer)
        bound = hm.instantiate(arena).eval()
        eager_arena, graph_arena, out_arena = eager_and_graph(bound, x, reps)
    diff = max_diff(out_own, out_arena)
    del bound, arena
    torch.cuda.empty_cache()
    return {"bytes": hm.nbytes, "eager_own_ms": eager_own, "graph_own_ms": graph_own, "eager_arena_ms": eager_arena,
            "graph_arena_ms": graph_arena, "graph_over_eager_own": graph_own / eager_own,
            "arena_over_own_eager": eager_arena / eager_own, "max_abs_diff_own_vs_arena": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-large,resnet50")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--tf32", action="store_true", help="cuDNN TF32 convolutions (the server's --cudnn-tf32)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/warm_gap.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # as the GPU server
    torch.backends.cudnn.allow_tf32 = args.tf32
    root = Path(tempfile.mkdtemp(prefix="torpor-warm-gap-"))
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cudnn_tf32": args.tf32, "models": {},
              "command": "python bench/warm_gap.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())}
    for name in args.models.split(","):
        result["models"][name] = r = bench_model(name, root, args.reps)
        print(f"{name:16s} eager own {r['eager_own_ms']:7.2f}  graph own {r['graph_own_ms']:7.2f}  "
              f"eager arena {r['eager_arena_ms']:7.2f}  graph arena {r['graph_arena_ms']:7.2f} ms", flush=True)
    out = Path(args.out) / (result["gpu"].lower().replace(" ", "-") + "-warm-gap.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
