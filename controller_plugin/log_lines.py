"""The controller's log lines: one per invocation, and gunicorn's own lines in the format
the process was given (``--log-format text|json``, runtime/log_format.py).

With ``--log-format json`` every line the controller process writes is one JSON object:
its own records through the root logger, and gunicorn's error and access lines through
:class:`GunicornJsonLogger` (gunicorn configures those two loggers itself, with handlers of
its own that the root logger's format does not reach).
"""
from __future__ import annotations

import logging

from gunicorn import glogging

from runtime.log_format import JsonFormatter

log = logging.getLogger("controller_plugin.invocations")

PROCESS = "controller"


def log_invocation(activation_id: str, namespace: str, action: str, node: str, *, blocking: bool, outcome: str,
                   slo_ms: float, status_code: int | None = None, latency_ms: float | None = None) -> None:
    """Writes the invocation's one line (info level, logger ``controller_plugin.invocations``);
    its JSON fields are ``event`` (``"activation"``), ``activation_id``, ``namespace``,
    ``action``, ``node`` (where it was queued), ``blocking``, ``outcome`` (as the
    ``torpor_invocations_total`` label: ``success``, ``application_error``,
    ``developer_error``, ``whisk_error``, ``timeout``, ``accepted``), ``status_code``
    (OpenWhisk 0..3, None without a final record), ``latency_ms`` (admission to answer, ms;
    None for a non-blocking invocation) and ``slo_ms`` (the action's SLO, ms).
    """
    fields = {"event": "activation", "activation_id": activation_id, "namespace": namespace, "action": action,
              "node": node, "blocking": blocking, "outcome": outcome, "status_code": status_code,
              "latency_ms": None if latency_ms is None else round(latency_ms, 1), "slo_ms": slo_ms}
    if latency_ms is None:
        log.info("activation %s %s/%s node %s: %s (non-blocking)", activation_id, namespace, action, node, outcome,
                 extra={"fields": fields})
    else:
        log.info("activation %s %s/%s node %s: %s in %.0f ms (blocking, SLO %g ms)", activation_id, namespace,
                 action, node, outcome, latency_ms, slo_ms, extra={"fields": fields})


class GunicornJsonLogger(glogging.Logger):
    """gunicorn's logger (its ``logger_class``) writing JSON lines: error-log lines as
    :class:`JsonFormatter` objects, and access lines with the request's fields too —
    ``event`` (``"http"``), ``method``, ``path``, ``status``, ``ms``, ``bytes``, ``remote``
    and ``request_id`` (the ``X-Request-ID`` answer header, also in error bodies)."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        formatter = JsonFormatter(PROCESS)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(formatter)

    def access(self, resp, req, environ, request_time) -> None:
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        fields = {"event": "http", "method": atoms["m"], "path": atoms["U"], "status": int(atoms["s"]),
                  "ms": atoms["M"], "bytes": atoms["B"], "remote": atoms["h"],
                  "request_id": atoms.get("{x-request-id}o")}
        self.access_log.info(self.cfg.access_log_format, self.atoms_wrapper_class(atoms), extra={"fields": fields})
