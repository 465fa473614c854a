"""Generates ``docs/configuration.md``, the reference of every setting of every Torpor command,
from the settings dataclasses themselves (runtime/settings.py).

    python -m runtime.config_reference           # rewrite docs/configuration.md
    python -m runtime.config_reference --check   # exit 1 when the file is not current

tests/test_configuration_doc.py fails when the committed file differs from what this writes.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from pathlib import Path

import click

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "python -m runtime.config_reference"

# (command, what it is, settings classes as "module:Class"), in the order of the document.
SECTIONS = [
    ("torpor up", "the whole platform on this machine (Redis, controller, one node)",
     ["runtime.up:UpSettings"]),
    ("torpor gpu-server", "a node's GPU server, the only process that touches CUDA",
     ["runtime.gpu_server.config:GPUServerSettings", "runtime.log_format:LogSettings"]),
    ("torpor invoker", "a node's agent that runs activations",
     ["runtime.invoker.config:InvokerSettings", "runtime.log_format:LogSettings"]),
    ("torpor runtime", "one action runtime (OpenWhisk /init + /run, Knative POST /)",
     ["runtime.action.config:RuntimeSettings"]),
    ("torpor controller", "the OpenWhisk-compatible REST API",
     ["controller_plugin.config:ControllerSettings", "runtime.log_format:LogSettings"]),
    ("torpor model register / list / unregister", "the model repository",
     ["runtime.gpu_server.repository:RepositorySettings"]),
    ("torpor loadgen", "trace replay against a running controller",
     ["loadgen.replay:LoadgenSettings"]),
    ("torpor soak", "the long soak run through the whole stack (loadgen/soak.py)",
     ["loadgen.soak:SoakSettings"]),
    ("torpor simulate", "one run of the cluster simulator",
     ["controller_plugin.simulator:ClusterSettings", "controller_plugin.simulator:SimulateSettings"]),
    ("torpor sweep", "a grid of simulator runs",
     ["controller_plugin.simulator:ClusterSettings", "controller_plugin.simulator:SweepSettings"]),
    ("torpor status", "the cluster's nodes, devices and SLO attainment from Redis",
     ["controller_plugin.status:StatusSettings"]),
]

# Defaults computed from the machine at import time: the document shows how they are
# computed, so that it is the same on every machine.
MACHINE_DEFAULTS = {
    ("runtime.invoker.config:InvokerSettings", "node_id"): "the host name (`socket.gethostname()`)",
}


def load(path: str) -> type:
    """The class named by ``"module:Class"``."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f" ({n // scale} {unit})"
    return ""


def _default(path: str, field: dataclasses.Field) -> str:
    override = MACHINE_DEFAULTS.get((path, field.name))
    if override is not None:
        return override
    value = field.default
    if value is None:
        return "none"
    if value == "":
        return "empty"
    shown = f"`{str(value).lower()}`" if isinstance(value, bool) else f"`{value}`"
    if field.metadata.get("unit") == "bytes" and isinstance(value, int):
        shown += _size(value)
    return _cell(shown)


def _flag(cls: type, field: dataclasses.Field) -> str:
    name = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
    if typing.get_type_hints(cls)[field.name] is bool:
        return f"`{name}` / `--no-{name[2:]}`"
    return f"`{name}`"


def table(path: str) -> str:
    """The Markdown table of the settings class at ``path`` (``"module:Class"``): flag, env
    var, default, unit and meaning of each field."""
    cls = load(path)
    rows = ["| flag | env var | default | unit | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        rows.append(f"| {_flag(cls, f)} | `{f.metadata['env']}` | {_default(path, f)} | "
                    f"{f.metadata.get('unit') or ''} | {_cell(f.metadata['help'])} |")
    return "\n".join(rows)


def _commands(name: str, cmd: click.Command):
    """(``torpor ...`` path, command) of ``cmd`` and of its subcommands, depth first."""
    if isinstance(cmd, click.Group):
        for sub in sorted(cmd.commands):
            yield from _commands(f"{name} {sub}", cmd.commands[sub])
    else:
        yield name, cmd


def plain_options() -> str:
    """The Markdown table of every command's options that are not settings (no env var)."""
    from runtime.cli import COMMANDS

    rows = ["| command | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name in sorted(COMMANDS):
        for path, cmd in _commands(f"torpor {name}", load(COMMANDS[name])):
            for p in cmd.params:
                if not isinstance(p, click.Option) or p.envvar or p.hidden or p.name == "help":
                    continue
                flags = " / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
                default = p.default
                if type(default).__name__ == "Sentinel":  # click 8.2+: no default given
                    default = False if p.is_flag else None
                shown = ("required" if p.required else
                         "none" if default is None or default == () else
                         f"`{str(default).lower()}`" if isinstance(default, bool) else
                         f"`{_relative(default)}`")
                rows.append(f"| `{path}` | {flags} | {_cell(shown)} | {_cell(p.help or '')} |")
    return "\n".join(rows)


def _relative(value) -> str:
    # paths defaulting inside the checkout are shown relative to it, the same on every machine
    root = str(DOC.parents[1])
    return str(value).replace(root + "/", "")


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- generated by `{REGENERATE}` from the settings dataclasses; do not edit by hand -->",
        "",
        "Every setting of every `torpor` command is a flag and an environment variable; a flag "
        "wins over the variable, the variable over the default. The settings are dataclasses "
        "declared with `runtime.settings.setting` (runtime/settings.py); this page is generated "
        f"from them (`{REGENERATE}`), and a test fails when it is not current.",
        "",
        "Several processes read the same variable (`TORPOR_REDIS_URL`, `TORPOR_NODE_ID`, ...), so "
        "one environment configures a whole node; the index at the end lists them.",
        "",
    ]
    users: dict[str, list[str]] = {}
    for command, what, paths in SECTIONS:
        out += [f"## `{command}`", "", f"{what[0].upper()}{what[1:]}.", ""]
        for path in paths:
            cls = load(path)
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            out += [f"`{path.replace(':', '.')}`: {doc}", "", table(path), ""]
            for f in dataclasses.fields(cls):
                users.setdefault(f.metadata["env"], [])
                if command not in users[f.metadata["env"]]:
                    users[f.metadata["env"]].append(command)
    out += ["## Flags without an environment variable", "",
            "Per-invocation choices of a command (what to do, where to write), not configuration; "
            "listed from the commands themselves (`runtime/cli.py`).", "",
            plain_options(), ""]
    out += ["## Environment variables", "", "| env var | read by |", "| --- | --- |"]
    for env in sorted(users):
        out.append(f"| `{env}` | {', '.join(f'`{c}`' for c in users[env])} |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--check", is_flag=True, help="exit 1 when the file differs from what would be written")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DOC, show_default=True)
def main(check: bool, out: Path) -> None:
    """Write (or check) the configuration reference."""
    text = render()
    if check:
        if not out.exists() or out.read_text() != text:
            click.echo(f"{out} is not current: run `{REGENERATE}`", err=True)
            sys.exit(1)
        return
    out.write_text(text)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
