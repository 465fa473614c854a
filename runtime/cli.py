"""The ``torpor`` command. Subcommands are imported only when run, so that ``torpor runtime``
(the action runtime, which must stay free of torch and CUDA) loads nothing it does not need."""
from __future__ import annotations

import importlib

import click

# subcommand -> "module:attribute" of a click command
COMMANDS = {
    "up": "runtime.up:command",
    "gpu-server": "runtime.gpu_server.server:command",
    "invoker": "runtime.invoker.invoker:command",
    "runtime": "runtime.action.proxy:command",
    "controller": "controller_plugin.api:command",
    "model": "runtime.gpu_server.repository:command",
    "loadgen": "loadgen.replay:command",
    "soak": "loadgen.soak:command",
    "simulate": "controller_plugin.simulator:command",
    "sweep": "controller_plugin.simulator:sweep_command",
    "status": "controller_plugin.status:command",
    "report": "loadgen.report:command",
    "knative": "controller_plugin.knative:command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise click.ClickException(f"subcommand {name!r} is not available: {exc}") from exc


@click.group(cls=LazyGroup)
def main() -> None:
    """Torpor: serverless GPU inference with fast model swapping."""
