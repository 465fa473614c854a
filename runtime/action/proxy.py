"""The action runtime: OpenWhisk's ``/init`` and ``/run`` (and Knative's ``POST /``) served by
Flask under gunicorn with one sync worker, so one activation runs at a time per process.

This process never imports torch nor touches CUDA: user code reaches models through
``runtime.client``.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import click
import gunicorn.app.base
from flask import Flask, Response, g, json, request
from werkzeug.exceptions import HTTPException

from runtime.action.config import RuntimeSettings
from runtime.action.errors import REINIT, ActionError
from runtime.action.request_body import discard, parse_json, read_body
from runtime.action.runner import ActionRunner
from runtime.settings import from_kwargs, options

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"


def _respond(status: int, payload: Any) -> Response:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return Response(text, status=status, mimetype="application/json")


def _end_activation() -> None:
    # The invoker reads an activation's logs up to this line on each stream.
    for stream in (sys.stdout, sys.stderr):
        stream.write(SENTINEL + "\n")
        stream.flush()


def _refuse_init() -> Response:
    print(REINIT, flush=True)
    print(REINIT, file=sys.stderr, flush=True)
    return _respond(403, {"error": REINIT})


def _read_object(limit: int) -> tuple[dict, int]:
    raw = read_body(request.stream, request.content_length, limit)
    message = parse_json(raw)
    if not isinstance(message, dict):
        raise ActionError(400, f"request body must be a JSON object, not {type(message).__name__}")
    return message, len(raw)


def _init_from_env(runner: ActionRunner, settings: RuntimeSettings) -> None:
    try:
        runner.init({"code": settings.action_code, "main": settings.action_main,
                     "binary": settings.action_binary, "name": settings.action_name})
    except ActionError as exc:
        print(f"the action in __OW_ACTION_CODE failed to initialize: {exc.message}", file=sys.stderr, flush=True)
        runner.init_failed(exc.message)


def create_app(settings: RuntimeSettings) -> Flask:
    """The runtime's WSGI app; holds one :class:`ActionRunner` for the life of the process.

    Routes: ``POST /init``, ``POST /run``, ``GET /healthz``, and with ``settings.knative``
    also ``POST /``. In Knative mode with ``settings.action_code`` set the action is
    initialised here, from the settings, and every later init is refused (403).
    """
    runner = ActionRunner(settings.action_dir)
    dedicated = settings.knative and bool(settings.action_code)
    if dedicated:
        _init_from_env(runner, settings)
    app = Flask(__name__)

    @app.errorhandler(ActionError)
    def action_error(exc: ActionError) -> Response:
        return _respond(exc.status, {"error": exc.message})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _respond(exc.code or 500, {"error": f"{exc.name}: {request.method} {request.path}"})

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        traceback.print_exc()
        return _respond(500, {"error": f"internal error in the action runtime: {type(exc).__name__}: {exc}"})

    @app.after_request
    def after(response: Response) -> Response:
        if g.get("end_activation"):
            _end_activation()
        return response

    @app.post("/init")
    def init() -> Response:
        if runner.initialized or dedicated:
            discard(request.stream)
            return _refuse_init()
        g.end_activation = True
        message, _ = _read_object(settings.init_body_limit)
        runner.init(message.get("value"))
        g.end_activation = False
        return _respond(200, {"ok": True})

    @app.post("/run")
    def run() -> Response:
        g.end_activation = True
        message, _ = _read_object(settings.run_body_limit)
        activation = {key: value for key, value in message.items() if key != "value"}
        return _respond(200, runner.run(message.get("value", {}), activation))

    @app.get("/healthz")
    def healthz() -> Response:
        return _respond(200, {"ok": True, "initialized": runner.initialized})

    if settings.knative:
        @app.post("/")
        def knative() -> Response:
            message, size = _read_object(settings.init_body_limit)
            has_init = "init" in message
            has_run = "value" in message or "activation" in message
            # a request that carries an activation always ends with the sentinels
            g.end_activation = has_run
            if not (has_init or has_run):
                raise ActionError(400, 'a Knative request needs "init", "activation" or "value"')
            if has_init:
                # a warm pod gets the same init again with every init-and-run: run it
                repeated = has_run and runner.initialized_with(message["init"])
                if dedicated or (runner.initialized and not repeated):
                    return _refuse_init()
                if not repeated:
                    g.end_activation = True
                    runner.init(message["init"])
                    g.end_activation = has_run
                    if not has_run:
                        return _respond(200, {"ok": True})
            elif size > settings.run_body_limit:
                raise ActionError(413, f"request body of {size} bytes is over the limit {settings.run_body_limit} bytes")
            activation = message.get("activation") or {}
            if not isinstance(activation, dict):
                raise ActionError(400, 'the "activation" field must be a JSON object')
            return _respond(200, runner.run(message.get("value", {}), activation))

    return app


class _Server(gunicorn.app.base.BaseApplication):
    """gunicorn serving :func:`create_app`: one sync worker, no access log, no control socket."""

    def __init__(self, settings: RuntimeSettings):
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        values = {
            "bind": [f"{self.settings.host}:{self.settings.port}"],
            "workers": 1,
            "worker_class": "sync",
            "timeout": self.settings.worker_timeout,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "proc_name": "torpor-runtime",
            # gunicorn >= 25 opens a control socket at one fixed path per user: runtimes side
            # by side would fight over it
            "control_socket_disable": True,
        }
        for name, value in values.items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self) -> Flask:
        return create_app(self.settings)


@click.command("runtime")
@options(RuntimeSettings)
def command(**kwargs: Any) -> None:
    """Serve one action: OpenWhisk /init and /run (Knative: POST /) on PORT, under gunicorn."""
    try:
        settings = from_kwargs(RuntimeSettings, kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    # user prints must reach the invoker's pipes as they happen, in order with the sentinels
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    if settings.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(settings.parent_pid,), daemon=True,
                         name="parent-watch").start()
    _Server(settings).run()


def _exit_with_parent(parent_pid: int, period_s: float = 1.0) -> None:
    """Kills this runtime's process group (gunicorn's master and worker, the action's own
    children) once ``parent_pid`` is no longer its parent: an invoker killed with SIGKILL
    cannot stop its containers, and a restarted one does not know them."""
    while os.getppid() == parent_pid:
        time.sleep(period_s)
    if os.getpgid(0) == os.getpid():  # the invoker starts each runtime in a session of its own
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
