"""docs/configuration.md is generated from the settings dataclasses and must be current: the
same bytes as a fresh rendering, covering every settings class and every env var any
``torpor`` command reads, the same on every machine."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import socket

import click
from click.testing import CliRunner

from runtime import cli, config_reference

STALE = f"docs/configuration.md is not current: regenerate it with `.venv/bin/{config_reference.REGENERATE}`"


def test_committed_reference_is_current():
    assert config_reference.DOC.read_text() == config_reference.render(), STALE


def settings_classes() -> set[str]:
    """Every dataclass of the project whose fields are all declared with runtime.settings.setting."""
    found = set()
    for package in ("runtime", "controller_plugin", "loadgen"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                    fields = dataclasses.fields(obj)
                    if fields and all("env" in f.metadata for f in fields):
                        found.add(f"{obj.__module__}:{obj.__name__}")
    return found


def test_every_settings_class_has_a_section():
    listed = {path for _, _, paths in config_reference.SECTIONS for path in paths}
    missing = settings_classes() - listed
    assert not missing, f"add {sorted(missing)} to runtime/config_reference.py SECTIONS, then {STALE}"


def env_vars(command: click.Command) -> set[str]:
    out = {p.envvar for p in command.params if isinstance(p, click.Option) and isinstance(p.envvar, str)}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            out |= env_vars(sub)
    return out


def test_every_env_var_of_every_command_is_documented():
    text = config_reference.DOC.read_text()
    group = cli.main
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        undocumented = {e for e in env_vars(group.get_command(ctx, name)) if f"`{e}`" not in text}
        assert not undocumented, f"torpor {name} reads {sorted(undocumented)}, which docs/configuration.md lacks"


def test_machine_dependent_defaults_render_the_same_everywhere():
    [row] = [line for line in config_reference.table("runtime.invoker.config:InvokerSettings").splitlines()
             if line.startswith("| `--node-id`")]
    assert "the host name (`socket.gethostname()`)" in row
    assert f"`{socket.gethostname()}`" not in row


def test_check_flag_reports_a_stale_file(tmp_path):
    out = tmp_path / "configuration.md"
    out.write_text("old\n")
    stale = CliRunner().invoke(config_reference.main, ["--check", "--out", str(out)])
    assert stale.exit_code == 1 and config_reference.REGENERATE in stale.output
    assert CliRunner().invoke(config_reference.main, ["--out", str(out)]).exit_code == 0
    assert out.read_text() == config_reference.render()
    assert CliRunner().invoke(config_reference.main, ["--check", "--out", str(out)]).exit_code == 0
