"""Plots and files of results: load-generator reports, simulator sweeps, swap benchmarks.

:func:`write_report` saves one load-generator report as JSON and a summary PNG;
``torpor report`` turns any mix of result files into PNGs. Figures are drawn on
``matplotlib.figure.Figure`` objects (Agg canvas), never through pyplot, so that plotting
in-process leaves the host program's matplotlib backend alone.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TIMELINE_BIN_S = 5.0
BENCH_FIRST = ("served_warm_ms", "cold_pcie_ms", "bound_ms")


def write_report(report: dict[str, Any], json_path: str | Path, png_path: str | Path) -> None:
    """Writes a :func:`loadgen.replay.replay` report as strict JSON and a summary PNG.

    The JSON holds the whole dict, per-request series included; the PNG has the latency
    CDF of completed requests and each function's P98 against its SLO. Parent folders are
    created.

    Raises:
        ValueError: the report holds NaN or infinity (strict JSON cannot).
        OSError: a file cannot be written.
    """
    json_path, png_path = Path(json_path), Path(png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, allow_nan=False)
    json_path.write_text(text + "\n")

    fig = _figure(12, 4.5)
    cdf_ax, slo_ax = fig.subplots(1, 2)
    _draw_cdf(cdf_ax, [("completed requests", report)])
    _draw_p98_vs_slo(slo_ax, report)
    attained = report.get("slo_attainment")
    fig.suptitle(f"{report['functions']} functions, {report['requests']} requests, "
                 f"{report['failed']} failed, {report['wrong_outputs']} wrong; SLO attainment "
                 f"{'-' if attained is None else format(attained, '.1%')}")
    _save(fig, png_path)


def detect_kind(data: Any) -> str:
    """``"loadgen"``, ``"simulator"`` or ``"bench"`` for a parsed result file.

    Raises:
        ValueError: the data matches none of the three shapes.
    """
    if isinstance(data, dict):
        if isinstance(data.get("latencies"), list) and isinstance(data.get("per_function"), dict):
            return "loadgen"
        if isinstance(data.get("runs"), list):
            return "simulator"
        if isinstance(data.get("models"), dict) and "gpu" in data:
            return "bench"
    raise ValueError("not a loadgen report ('latencies', 'per_function'), simulator result ('runs') "
                     "or bench swap result ('gpu', 'models')")


def plot_latency_cdf(reports: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """One CDF curve of completed-request latency (ms, log axis) per labelled loadgen report."""
    fig = _figure(7, 4.5)
    _draw_cdf(fig.subplots(), reports)
    _save(fig, path)


def plot_timeline(report: dict[str, Any], path: Path, bin_s: float = TIMELINE_BIN_S) -> None:
    """Requests (completed, failed) and swap-ins per ``bin_s`` seconds, with each bin's P98.

    Times are the requests' scheduled real seconds since the start. Swap-ins are drawn when
    the report has ``"swap_ins"``: a list of times (s since the start) of swap-ins.
    """
    ok = np.asarray(report["latencies"], dtype=np.float64).reshape(-1, 3)
    bad = np.asarray(report.get("failures", []), dtype=np.float64).reshape(-1, 3)
    swaps = np.asarray(report.get("swap_ins", []), dtype=np.float64).reshape(-1)
    end = max([0.0] + [float(a.max()) for a in (ok[:, 0], bad[:, 0], swaps) if a.size])
    edges = np.arange(0.0, end + bin_s, bin_s)
    if len(edges) < 2:
        edges = np.array([0.0, bin_s])
    mids = (edges[:-1] + edges[1:]) / 2

    fig = _figure(10, 4.5)
    ax = fig.subplots()
    ax.stairs(np.histogram(ok[:, 0], edges)[0], edges, label="completed", color="tab:blue")
    if bad.size:
        ax.stairs(np.histogram(bad[:, 0], edges)[0], edges, label="failed", color="tab:red")
    if "swap_ins" in report:
        ax.stairs(np.histogram(swaps, edges)[0], edges, label="swap-ins", color="tab:purple")
    ax.set_xlim(0, edges[-1])
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(f"count per {bin_s:g} s")
    p98_ax = ax.twinx()
    which = np.digitize(ok[:, 0], edges) - 1
    p98 = [np.percentile(ok[which == b, 1], 98) if np.any(which == b) else np.nan for b in range(len(mids))]
    p98_ax.plot(mids, p98, color="tab:green", marker=".", label="P98 latency")
    p98_ax.set_ylabel("P98 latency (ms)")
    handles = ax.get_legend_handles_labels()
    more = p98_ax.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize="small")
    ax.set_title(f"Requests and swap-ins over time ({bin_s:g} s bins)")
    _save(fig, path)


def plot_simulator(result: dict[str, Any], path: Path) -> None:
    """SLO attainment against function count, one line per policy (and P98 when given)."""
    by_policy: dict[str, list[dict]] = defaultdict(list)
    for run in result["runs"]:
        by_policy[str(run.get("policy", "?"))].append(run)
    with_p98 = any(run.get("p98_ms") is not None for run in result["runs"])
    fig = _figure(12 if with_p98 else 7, 4.5)
    axes = fig.subplots(1, 2 if with_p98 else 1, squeeze=False)[0]
    for policy, runs in sorted(by_policy.items()):
        runs = sorted(runs, key=lambda r: r["functions"])
        x = [r["functions"] for r in runs]
        axes[0].plot(x, [_num(r.get("slo_attainment")) for r in runs], marker="o", label=policy)
        if with_p98:
            axes[1].plot(x, [_num(r.get("p98_ms")) for r in runs], marker="o", label=policy)
    axes[0].set_xlabel("functions")
    axes[0].set_ylabel("SLO attainment")
    axes[0].set_title("SLO attainment vs function count")
    axes[0].legend(fontsize="small")
    if with_p98:
        axes[1].set_xlabel("functions")
        axes[1].set_ylabel("P98 latency (ms)")
        axes[1].set_title("P98 latency vs function count")
        axes[1].legend(fontsize="small")
    _save(fig, path)


def plot_bench(result: dict[str, Any], path: Path) -> None:
    """Grouped bars per model: served warm, cold over PCIe, transfer bound, other ``*_ms``."""
    models = list(result["models"])
    keys = [k for k in BENCH_FIRST if any(k in m for m in result["models"].values())]
    keys += sorted({k for m in result["models"].values() for k, v in m.items()
                    if k.endswith("_ms") and k not in keys and isinstance(v, (int, float))})
    fig = _figure(max(7, 1.5 * len(models) * max(1, len(keys)) / 2), 4.5)
    ax = fig.subplots()
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(models))
    for j, key in enumerate(keys):
        ax.bar(x + (j - (len(keys) - 1) / 2) * width,
               [_num(result["models"][m].get(key)) for m in models], width, label=key.removesuffix("_ms"))
    ax.set_xticks(x, models)
    ax.set_ylabel("ms")
    ax.set_title(f"Swap-in: cold vs warm vs transfer bound ({result.get('gpu', '?')})")
    ax.legend(fontsize="small")
    _save(fig, path)


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", default="loadgen/results/plots", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="folder for the PNG files")
def command(results: tuple[Path, ...], out_dir: Path) -> None:
    """Plot loadgen reports, simulator results and bench swap results as PNG files.

    Loadgen: NAME_latency_cdf.png and NAME_timeline.png (and latency_cdf.png comparing all
    reports when there are several); simulator: NAME_slo_attainment.png; bench:
    NAME_swap.png. Prints each path written.
    """
    loaded = []
    for path in results:
        try:
            data = json.loads(path.read_text())
            loaded.append((path, detect_kind(data), data))
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"{path}: {exc}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_stems([p for p, _, _ in loaded])
    written = []
    for (path, kind, data), name in zip(loaded, names):
        try:
            if kind == "loadgen":
                written.append(out_dir / f"{name}_latency_cdf.png")
                plot_latency_cdf([(name, data)], written[-1])
                written.append(out_dir / f"{name}_timeline.png")
                plot_timeline(data, written[-1])
            elif kind == "simulator":
                written.append(out_dir / f"{name}_slo_attainment.png")
                plot_simulator(data, written[-1])
            else:
                written.append(out_dir / f"{name}_swap.png")
                plot_bench(data, written[-1])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise click.ClickException(f"{path}: malformed {kind} result: {exc!r}") from exc
    reports = [(name, data) for (_, kind, data), name in zip(loaded, names) if kind == "loadgen"]
    if len(reports) > 1:
        written.append(out_dir / "latency_cdf.png")
        plot_latency_cdf(reports, written[-1])
    for path in written:
        click.echo(str(path))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _draw_cdf(ax: Any, reports: list[tuple[str, dict[str, Any]]]) -> None:
    slos = set()
    for label, report in reports:
        latencies = np.sort(np.asarray([row[1] for row in report["latencies"]], dtype=np.float64))
        if latencies.size:
            ax.plot(latencies, np.arange(1, latencies.size + 1) / latencies.size, label=label)
        slos.update(f["slo_ms"] for f in report["per_function"].values())
    for slo in sorted(slos):
        ax.axvline(slo, color="grey", linestyle="--", linewidth=1)
    ax.axhline(0.98, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, from scheduled time)")
    ax.set_ylabel("share of completed requests")
    ax.set_title("Latency CDF (dashed: SLO, dotted: P98)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")


def _draw_p98_vs_slo(ax: Any, report: dict[str, Any]) -> None:
    rows = sorted(report["per_function"].values(), key=lambda f: _num(f["p98_ms"]))
    x = np.arange(len(rows))
    colors = ["tab:green" if f["slo_met"] else "tab:red" if f["slo_met"] is False else "tab:grey" for f in rows]
    ax.bar(x, [_num(f["p98_ms"]) for f in rows], color=colors, width=1.0)
    ax.step(x, [f["slo_ms"] for f in rows], where="mid", color="black", linewidth=1, label="SLO")
    ax.set_xlabel("functions (sorted by P98)")
    ax.set_ylabel("P98 of completed requests (ms)")
    ax.set_title("Per-function P98 vs SLO (red: missed, failures count as infinite)")
    ax.legend(fontsize="small")


def _unique_stems(paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        name, n = path.stem, 1
        while name in names:
            n += 1
            name = f"{path.stem}-{n}"
        names.append(name)
    return names
