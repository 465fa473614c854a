"""Typed process configuration: one dataclass per process, read from flags and env vars.

Each field of a settings dataclass carries its env var, help text and unit in
``field(metadata=...)``; :func:`options` turns the fields into click options (flag, env
var, default), :func:`from_kwargs` builds the dataclass back from what click parsed, and
:func:`reference` renders every field as a Markdown table row for ``docs/configuration.md``.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, TypeVar

import click

T = TypeVar("T")


def setting(default: Any, env: str, help: str, unit: str = "", flag: str | None = None) -> Any:
    """A dataclass field that is also a CLI flag and an env var.

    Args:
        default: value when neither the flag nor the env var is given.
        env: environment variable name, e.g. ``TORPOR_REDIS_URL``.
        help: one line for ``--help`` and the configuration reference.
        unit: unit of the value (``ms``, ``bytes``...), shown in the reference.
        flag: flag name when it differs from the field name with ``_`` → ``-``.
    """
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "unit": unit, "flag": flag})


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def options(cls: type) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of settings dataclass ``cls``."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            t = _type(cls, f)
            unit = f" [{f.metadata['unit']}]" if f.metadata.get("unit") else ""
            if t is bool:
                name = _flag(f)
                decl = f"{name}/--no-{name[2:]}"
                fn = click.option(decl, f.name, default=f.default, envvar=f.metadata["env"],
                                  show_default=True, help=f.metadata["help"] + unit)(fn)
            else:
                fn = click.option(_flag(f), f.name, type=t, default=f.default, envvar=f.metadata["env"],
                                  show_default=True, help=f.metadata["help"] + unit)(fn)
        return fn

    return decorate


def from_kwargs(cls: type[T], kwargs: dict) -> T:
    """Pops the fields of ``cls`` out of click's ``kwargs`` and returns the dataclass."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})


def from_env(cls: type[T], **overrides: Any) -> T:
    """Builds ``cls`` from env vars (converted to each field's type) and explicit overrides."""
    import os

    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = os.environ.get(f.metadata["env"])
        if raw is not None:
            t = _type(cls, f)
            values[f.name] = raw.lower() in ("1", "true", "yes", "on") if t is bool else t(raw)
    values.update(overrides)
    return cls(**values)


def reference(cls: type) -> str:
    """Markdown table of the fields of ``cls``: flag, env var, default, unit, meaning."""
    rows = ["| flag | env var | default | unit | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        rows.append(f"| `{_flag(f)}` | `{f.metadata['env']}` | `{f.default!r}` | {f.metadata.get('unit', '')} | {f.metadata['help']} |")
    return "\n".join(rows)
