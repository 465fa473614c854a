"""How Torpor's long-running processes write their logs: human-readable text lines, or one
JSON object a line for log collectors (``--log-format json``).

A log call may attach machine-readable fields with ``extra={"fields": {...}}``; the JSON
format puts them at the top level of the line's object (the text format shows only the
message, which repeats them in words).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import click

from runtime.settings import from_kwargs, setting

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")


@dataclass
class LogSettings:
    """Log format and level of a process (the controller, the invoker and the GPU server take them).

    Raises:
        ValueError: a format or level that is not one of :data:`FORMATS` / :data:`LEVELS`.
    """

    log_format: str = setting("text", "TORPOR_LOG_FORMAT", "log lines as 'text' or 'json' (one object a line)")
    log_level: str = setting("info", "TORPOR_LOG_LEVEL",
                             "lowest level logged: debug, info, warning, error (debug: one line per GPU request)")

    def __post_init__(self) -> None:
        self.log_format = self.log_format.strip().lower()
        self.log_level = self.log_level.strip().lower()
        if self.log_format not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {self.log_format!r}")
        if self.log_level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {self.log_level!r}")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC, ms), ``level``, ``process`` (the
    Torpor process, e.g. ``invoker``), ``logger``, ``message``, the record's ``fields`` and,
    for an exception, ``exception`` (the formatted traceback)."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "process": self.process, "logger": record.name,
                "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(settings: LogSettings, process: str) -> None:
    """Sends the root logger's records to stderr in ``settings``' format and level.

    Args:
        settings: format and level.
        process: the process's name, written on every line (``controller``, ``invoker``,
            ``gpu-server``).
    """
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def configure_from_kwargs(kwargs: dict, process: str) -> LogSettings:
    """Pops the :class:`LogSettings` fields out of click's ``kwargs`` and applies them.

    Raises:
        click.BadParameter: a format or level that is not known.
    """
    try:
        settings = from_kwargs(LogSettings, kwargs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--log-format / --log-level") from None
    configure(settings, process)
    return settings
