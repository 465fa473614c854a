"""The controller's REST API: the OpenWhisk ``/api/v1`` subset that ``wsk``, the ``openwhisk``
npm client and curl speak (actions, invocations, activations), plus ``/healthz`` and
``/readyz``. ``torpor controller`` serves it with gunicorn (one gthread worker).

Every error is JSON ``{"error": message, "code": request id}``; the request id is also in the
``X-Request-ID`` header. See ``docs/rest-api.md``.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import click
import redis
from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from controller_plugin import state
from controller_plugin.auth import ENTITY_NAME, Authenticator, CredentialError, Identity
from controller_plugin.config import ControllerSettings
from controller_plugin.log_lines import GunicornJsonLogger, log_invocation
from controller_plugin.metrics import ControllerMetrics, slo_ms_of
from controller_plugin.routing import build_picker, check_picker_settings, requeue_from_dead_nodes
from runtime.action.errors import ActionError
from runtime.action.request_body import parse_json, read_body
from runtime.gpu_server.protocol import check_model_name
from runtime.log_format import LogSettings, configure_from_kwargs
from runtime.settings import from_kwargs, options

log = logging.getLogger(__name__)

API = "/api/v1"
NS = API + "/namespaces/<namespace>"
ACTIVATION_HEADER = "X-OpenWhisk-Activation-Id"
ACTIVATION_ID = re.compile(r"\A[0-9a-f]{32}\Z")
SEMVER = re.compile(r"\A(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)\Z")
ZIP_MAGIC = b"PK\x03\x04"
BLACKBOX = "blackbox"

# (default, min, max) of each action limit, as OpenWhisk's defaults; units in LIMIT_UNITS.
LIMITS = {"timeout": (60000, 100, 300000), "memory": (256, 128, 512), "logs": (10, 0, 10),
          "concurrency": (1, 1, 500)}
LIMIT_UNITS = {"timeout": "ms", "memory": "MB", "logs": "MB", "concurrency": "activations"}
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 30, 200
# A crashed invoker never gives an activation's in-flight slot back; it lapses this long
# after the activation's deadline.
SLOT_GRACE_MS = 60000
MAX_ACTION_MODELS = 16  # models one action may name in its 'model' annotation

NOT_FOUND = "The requested resource does not exist."
FORBIDDEN = "The supplied authentication is not authorized to access this resource."
NO_AUTH = "The resource requires authentication, which was not supplied with the request."
BAD_AUTH = "The supplied authentication is invalid."
CHALLENGE = {"WWW-Authenticate": 'Basic realm="whisk rest service"'}
# gunicorn's default access log has %(u)s, the Basic-auth user (the UUID half of a credential).
ACCESS_LOG_FORMAT = '%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms'


class ApiError(Exception):
    """An error answer: HTTP ``status`` with ``{"error": message, "code": request id}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


# --- request parsing -----------------------------------------------------------------------

def _json_object(limit: int, what: str) -> dict:
    """The request body as a JSON object; an empty body is ``{}``.

    Raises:
        ApiError: 413 over ``limit`` bytes; 400 not JSON (blank, NUL byte, not UTF-8,
            truncated, ...) or not an object (``what`` names it in the message).
    """
    try:
        body = read_body(request.stream, request.content_length, limit)
        if not body:
            return {}
        value = parse_json(body)
    except ActionError as exc:
        message = exc.message
        if exc.status == 413:
            message = f"The request content was larger than allowed: {message}."
        raise ApiError(exc.status, message) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"The request content was malformed: {what} must be a JSON object, "
                            f"not {_json_type(value)}.")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _flag(name: str, default: bool = False) -> bool:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ApiError(400, f"The query parameter '{name}' must be true or false, not '{raw}'.")


def _int_arg(name: str, collection: str) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"The value '{raw}' is not an integer for {collection}.") from None


def _window(collection: str) -> tuple[int, int]:
    """(skip, limit) of a list request: limit defaults to 30, 0 means the maximum 200."""
    limit = _int_arg("limit", collection)
    skip = _int_arg("skip", collection)
    if limit is None:
        limit = LIST_LIMIT_DEFAULT
    elif limit == 0:
        limit = LIST_LIMIT_MAX
    elif not 0 < limit <= LIST_LIMIT_MAX:
        raise ApiError(400, f"The value '{limit}' is not in the range of 0 to {LIST_LIMIT_MAX} for {collection}.")
    if skip is None:
        skip = 0
    elif skip < 0:
        raise ApiError(400, f"The value '{skip}' is not greater than or equal to 0 for {collection}.")
    return skip, limit


def _entity_name(name: str) -> str:
    if "/" in name:
        raise ApiError(400, f"Packages are not supported: the action name '{name}' may not contain '/'.")
    if not ENTITY_NAME.match(name):
        raise ApiError(400, "The name of the entity contains illegal characters.")
    return name


# --- action records ------------------------------------------------------------------------

def _key_values(value: Any, field: str) -> list[dict]:
    """Validates OpenWhisk's ``[{"key": str, "value": any}]``; a later duplicate key wins."""
    if not isinstance(value, list):
        raise ApiError(400, f"The request content was malformed: '{field}' must be an array of "
                            f"{{\"key\", \"value\"}} objects, not {_json_type(value)}.")
    merged: dict[str, dict] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not item["key"] or "value" not in item:
            raise ApiError(400, f"The request content was malformed: '{field}[{i}]' must be an object "
                                f"with a non-empty string 'key' and a 'value'.")
        entry = {"key": item["key"], "value": item["value"]}
        if "init" in item:
            if not isinstance(item["init"], bool):
                raise ApiError(400, f"The request content was malformed: '{field}[{i}].init' must be a boolean.")
            entry["init"] = item["init"]
        merged.pop(item["key"], None)
        merged[item["key"]] = entry
    return list(merged.values())


def models_of(annotations: list[dict]) -> list[str]:
    """Model names from an action's ``model`` annotation: a string, a JSON list of strings,
    or a string holding such a list; each name once, in first-seen order. Missing
    annotation → [].

    Raises:
        ValueError: the annotation is another type, a name breaks the model-name rules
            (protocol.check_model_name), or it names more than :data:`MAX_ACTION_MODELS`.
    """
    value = next((a["value"] for a in annotations if a["key"] == "model"), None)
    if value is None:
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("the 'model' annotation starts with '[' but is not a JSON list") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise ValueError("the 'model' annotation must be a model name or a list of model names")
    names = list(dict.fromkeys(check_model_name(m) for m in value))
    if len(names) > MAX_ACTION_MODELS:
        raise ValueError(f"the 'model' annotation names {len(names)} models, more than the {MAX_ACTION_MODELS} "
                         "an action may use")
    return names


def _limits(value: Any, current: dict) -> dict:
    if not isinstance(value, dict):
        raise ApiError(400, f"The request content was malformed: 'limits' must be an object, not {_json_type(value)}.")
    limits = dict(current)
    for name, (_, low, high) in LIMITS.items():
        if name not in value or value[name] is None:
            continue
        given = value[name]
        whole = isinstance(given, int) and not isinstance(given, bool) or isinstance(given, float) and given.is_integer()
        if not whole or not low <= given <= high:
            raise ApiError(400, f"The request content was malformed: limits.{name} must be a whole number "
                                f"from {low} to {high} {LIMIT_UNITS[name]}, not {json.dumps(given)}.")
        limits[name] = int(given)
    return limits


def _is_zip(code: str) -> bool:
    try:
        return base64.b64decode(code[:64], validate=True).startswith(ZIP_MAGIC)
    except (binascii.Error, ValueError):
        return False


@dataclass
class ActionRules:
    """What an action record may hold: the accepted exec ``kinds`` (e.g. ``python:3``)."""

    kinds: list[str]

    def resolve_kind(self, kind: str) -> str:
        """The stored kind for ``kind`` (``family:default`` → the first accepted kind of that family).

        Raises:
            ApiError: 400 for a kind that is not accepted (``sequence`` included).
        """
        family, _, version = kind.partition(":")
        if version == "default":
            for known in self.kinds:
                if known.partition(":")[0] == family:
                    return known
        if kind in self.kinds:
            return kind
        if kind == "sequence":
            raise ApiError(400, "Sequence actions are not supported.")
        raise ApiError(400, f"The request content was malformed: kind '{kind}' is not one of "
                            f"{', '.join(self.kinds)} (or an exec with an 'image', kind blackbox).")

    def exec_of(self, value: Any) -> dict:
        """Validates an ``exec`` object; returns the stored form."""
        if not isinstance(value, dict):
            raise ApiError(400, f"The request content was malformed: 'exec' must be an object, not {_json_type(value)}.")
        for field in ("kind", "code", "main", "image"):
            if field in value and value[field] is not None and not isinstance(value[field], str):
                raise ApiError(400, f"The request content was malformed: exec.{field} must be a string.")
        if "binary" in value and value["binary"] is not None and not isinstance(value["binary"], bool):
            raise ApiError(400, "The request content was malformed: exec.binary must be a boolean.")
        kind, code, image = value.get("kind"), value.get("code"), value.get("image")
        if image:
            if kind not in (None, BLACKBOX):
                raise ApiError(400, f"The request content was malformed: an exec with an image has kind "
                                    f"'{BLACKBOX}', not '{kind}'.")
            kind = BLACKBOX
        elif kind == BLACKBOX:
            raise ApiError(400, "The request content was malformed: exec.image is required for kind 'blackbox'.")
        elif not kind:
            raise ApiError(400, "The request content was malformed: exec.kind is required.")
        else:
            kind = self.resolve_kind(kind)
            if not code:
                raise ApiError(400, f"The request content was malformed: exec.code must be a non-empty string "
                                    f"for '{kind}' actions.")
        stored: dict[str, Any] = {"kind": kind}
        if code:
            stored["code"] = code
        binary = value.get("binary")
        stored["binary"] = binary if binary is not None else bool(code) and _is_zip(code)
        if value.get("main"):
            stored["main"] = value["main"]
        if image:
            stored["image"] = image
        return stored

    def build(self, namespace: str, name: str, content: dict, current: dict | None, updated_ms: int) -> dict:
        """The action record after a PUT of ``content`` over ``current`` (None: a new action).

        Fields absent from ``content`` keep their current values (new actions: defaults);
        the version's patch number goes up by one unless ``content`` gives a version.

        Raises:
            ApiError: 400 when ``content`` is malformed or a new action lacks ``exec``.
        """
        if current is None and content.get("exec") is None:
            raise ApiError(400, "The request content was malformed: exec undefined.")
        exec_ = self.exec_of(content["exec"]) if content.get("exec") is not None else current["exec"]
        parameters = (_key_values(content["parameters"], "parameters") if content.get("parameters") is not None
                      else (current or {}).get("parameters", []))
        annotations = (_key_values(content["annotations"], "annotations") if content.get("annotations") is not None
                       else (current or {}).get("annotations", []))
        try:
            models_of(annotations)
        except ValueError as exc:
            raise ApiError(400, f"The request content was malformed: {exc}.") from None
        annotations = [a for a in annotations if a["key"] != "exec"] + [{"key": "exec", "value": exec_["kind"]}]
        base_limits = current["limits"] if current else {k: d for k, (d, _, _) in LIMITS.items()}
        limits = _limits(content["limits"], base_limits) if content.get("limits") is not None else base_limits
        version = content.get("version")
        if version is not None:
            if not isinstance(version, str) or not SEMVER.match(version):
                raise ApiError(400, "The request content was malformed: version must be MAJOR.MINOR.PATCH.")
        elif current is None:
            version = "0.0.1"
        else:
            major, minor, patch = (int(p) for p in current["version"].split("."))
            version = f"{major}.{minor}.{patch + 1}"
        publish = content.get("publish")
        if publish is not None and not isinstance(publish, bool):
            raise ApiError(400, "The request content was malformed: publish must be a boolean.")
        return {"namespace": namespace, "name": name, "version": version, "exec": exec_,
                "parameters": parameters, "annotations": annotations, "limits": limits,
                "publish": publish if publish is not None else (current or {}).get("publish", False),
                "updated": updated_ms}


def _public(action: dict) -> dict:
    """An action record as the API shows it: without the internal ``revision`` id."""
    return {k: v for k, v in action.items() if k != "revision"}


def _action_summary(action: dict) -> dict:
    return {"namespace": action["namespace"], "name": action["name"], "version": action["version"],
            "publish": action["publish"], "annotations": action["annotations"], "limits": action["limits"],
            "exec": {"binary": action["exec"].get("binary", False)}, "updated": action["updated"]}


def _activation_summary(record: dict) -> dict:
    summary = {k: record[k] for k in ("activationId", "namespace", "name", "version", "subject", "start",
                                       "end", "duration", "annotations", "publish")}
    summary["statusCode"] = record["response"]["statusCode"]
    return summary


# --- the application -----------------------------------------------------------------------

class Controller:
    """What the request handlers share: settings, Redis client, authenticator, node picker.

    Args:
        settings: the controller's settings.

    Raises:
        CredentialError: ``settings.auth`` is malformed.
    """

    def __init__(self, settings: ControllerSettings):
        self.settings = settings
        # The socket timeout outlasts the longest BLPOP of a blocking invoke, so a hung Redis
        # cannot hold a request thread forever.
        self.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=5,
                                          socket_timeout=settings.max_blocking_wait_ms / 1000 + 10)
        self.auth = Authenticator(settings.auth, settings.namespace)
        self.picker = build_picker(self.redis, settings.profiles, settings.gpu_kind, settings.device_slots)
        self.rules = ActionRules([k.strip() for k in settings.kinds.split(",") if k.strip()])
        self._stop = threading.Event()
        self._requeuer: threading.Thread | None = None

    def start_requeuer(self) -> None:
        """Starts the daemon thread that moves dead nodes' work (every ``requeue_interval_ms``)."""
        if self.settings.requeue_interval_ms <= 0 or self._requeuer is not None:
            return
        self._requeuer = threading.Thread(target=self._requeue_loop, name="torpor-requeue", daemon=True)
        self._requeuer.start()

    def stop(self) -> None:
        """Stops the requeue thread (if running) and closes the Redis connections."""
        self._stop.set()
        if self._requeuer is not None:
            self._requeuer.join(5)
        self.redis.close()

    def _requeue_loop(self) -> None:
        while not self._stop.wait(self.settings.requeue_interval_ms / 1000):
            try:
                requeue_from_dead_nodes(self.redis, self.picker, now_ms=now_ms(),
                                        dead_after_ms=self.settings.node_dead_after_ms,
                                        max_attempts=self.settings.max_attempts)
            except redis.RedisError as exc:
                log.warning("re-queueing the work of dead nodes failed: %s", exc)
            except Exception:  # the loop must outlive one bad record
                log.exception("re-queueing the work of dead nodes failed")

    def namespace(self, given: str) -> str:
        """The caller's namespace for ``given`` (``_`` is the caller's own); 403 for any other."""
        identity: Identity = g.identity
        if given in ("_", identity.namespace):
            return identity.namespace
        raise ApiError(403, FORBIDDEN)


def create_app(settings: ControllerSettings) -> Flask:
    """The Flask application of the REST API.

    The controller's shared parts are in ``app.extensions["torpor"]`` (a :class:`Controller`),
    its Prometheus metrics in ``app.extensions["torpor_metrics"]`` (served on ``/metrics``);
    its requeue thread runs when ``settings.requeue_interval_ms`` > 0 — call its ``stop()``
    when done with the app.

    Raises:
        CredentialError: ``settings.auth`` is malformed.
    """
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False
    ctl = Controller(settings)
    app.extensions["torpor"] = ctl
    r = ctl.redis
    metrics = app.extensions["torpor_metrics"] = ControllerMetrics(r)

    @app.before_request
    def _authenticate() -> None:
        g.request_id = secrets.token_hex(16)
        if request.path.startswith(API + "/namespaces"):
            header = request.headers.get("Authorization")
            if not header:
                raise ApiError(401, NO_AUTH, CHALLENGE)
            identity = ctl.auth.authenticate(header)
            if identity is None:
                raise ApiError(401, BAD_AUTH, CHALLENGE)
            g.identity = identity

    @app.after_request
    def _tag(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        response = app.json.response({"error": message, "code": g.get("request_id", "")})
        response.status_code = status
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error(exc.status, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        messages = {404: NOT_FOUND, 405: "The requested method is not allowed for this resource.",
                    413: "The request content was larger than allowed."}
        headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
        return error(exc.code or 500, messages.get(exc.code, exc.description or exc.name), headers)

    @app.errorhandler(redis.RedisError)
    def _redis_error(exc: redis.RedisError) -> Response:
        log.warning("Redis request failed: %s", type(exc).__name__)
        return error(503, "The state store (Redis) is unavailable; try again later.")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("request %s failed", g.get("request_id", ""))
        return error(500, "There was an error processing your request.")

    # --- service routes ----------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Any:
        try:
            r.ping()
        except redis.RedisError:
            return error(503, "Redis is not reachable.")
        return {"status": "ready"}

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.get(API, strict_slashes=False)
    def info() -> Any:
        return {"description": "OpenWhisk API (Torpor)", "api_version": "1.0.0", "api_version_path": "v1",
                "build": "torpor", "buildno": "0.1.0",
                "limits": {"actions_per_minute": settings.invocations_per_minute,
                           "concurrent_actions": settings.concurrent_limit,
                           "max_action_duration": LIMITS["timeout"][2], "min_action_duration": LIMITS["timeout"][1],
                           "max_action_memory": LIMITS["memory"][2] * 1048576,
                           "min_action_memory": LIMITS["memory"][1] * 1048576,
                           "max_action_logs": LIMITS["logs"][2] * 1048576, "min_action_logs": 0,
                           "max_payload_bytes": settings.max_payload_bytes}}

    @app.get(API + "/namespaces", strict_slashes=False)
    def namespaces() -> Any:
        return app.json.response([g.identity.namespace])

    # --- actions -----------------------------------------------------------------------

    @app.get(NS + "/actions", strict_slashes=False)
    def list_actions(namespace: str) -> Any:
        ns = ctl.namespace(namespace)
        skip, limit = _window("actions")
        if _flag("count"):
            return {"actions": max(0, state.count_actions(r, ns) - skip)}
        return app.json.response([_action_summary(a) for a in state.list_actions(r, ns, skip, limit)])

    @app.get(NS + "/actions/<path:name>")
    def get_action(namespace: str, name: str) -> Any:
        ns, name = ctl.namespace(namespace), _entity_name(name)
        action = state.get_action(r, ns, name)
        if action is None:
            raise ApiError(404, NOT_FOUND)
        if not _flag("code", default=True):
            action["exec"].pop("code", None)
        return _public(action)

    @app.put(NS + "/actions/<path:name>")
    def put_action(namespace: str, name: str) -> Any:
        ns, name = ctl.namespace(namespace), _entity_name(name)
        overwrite = _flag("overwrite")
        content = _json_object(settings.max_action_bytes, "the action")
        updated = now_ms()
        if overwrite:
            return _public(state.replace_action(r, ns, name,
                                                lambda current: ctl.rules.build(ns, name, content, current, updated)))
        record = ctl.rules.build(ns, name, content, None, updated)
        if not state.create_action(r, record):
            raise ApiError(409, "The requested resource already exists; use overwrite=true to update it.")
        return _public(record)

    @app.delete(NS + "/actions/<path:name>")
    def delete_action(namespace: str, name: str) -> Any:
        ns, name = ctl.namespace(namespace), _entity_name(name)
        action = state.delete_action(r, ns, name)
        if action is None:
            raise ApiError(404, NOT_FOUND)
        return _public(action)

    @app.post(NS + "/actions/<path:name>")
    def invoke(namespace: str, name: str) -> Any:
        ns, name = ctl.namespace(namespace), _entity_name(name)
        blocking, result_only = _flag("blocking"), _flag("result")
        wait_override = _int_arg("timeout", "timeout")
        if wait_override is not None and not 0 < wait_override <= settings.max_blocking_wait_ms:
            raise ApiError(400, f"Timeout must be number of milliseconds up to {settings.max_blocking_wait_ms}.")
        payload = _json_object(settings.max_payload_bytes, "the parameters")
        action = state.get_action(r, ns, name)
        if action is None:
            raise ApiError(404, NOT_FOUND)
        defaults = {p["key"]: p["value"] for p in action["parameters"]}
        final = any(a["key"] == "final" and a["value"] is True for a in action["annotations"])
        if final and any(key in defaults for key in payload):
            raise ApiError(400, "Request defines parameters that are not allowed (e.g., reserved properties).")
        try:
            models = models_of(action["annotations"])
        except ValueError as exc:
            raise ApiError(400, f"The action's annotations are malformed: {exc}.") from None
        params = {**defaults, **payload}
        # the runtime's /run refuses parameters over the same limit: better refused here, at once
        merged_bytes = len(json.dumps(params, separators=(",", ":")).encode())
        if merged_bytes > settings.max_payload_bytes:
            raise ApiError(413, f"The request content was larger than allowed: the parameters with the action's "
                                f"defaults are {merged_bytes} bytes, over the limit of {settings.max_payload_bytes} bytes.")

        submitted = now_ms()
        timeout_ms = action["limits"]["timeout"]
        deadline = submitted + timeout_ms + settings.blocking_margin_ms
        slo_ms = slo_ms_of(action["annotations"])
        activation_id = state.new_activation_id()
        try:
            state.admit(r, state.pending_record(activation_id, action, g.identity.namespace, submitted),
                        hold_until_ms=deadline + SLOT_GRACE_MS, concurrent_limit=settings.concurrent_limit,
                        per_minute_limit=settings.invocations_per_minute)
        except state.Throttled as exc:
            metrics.invoked(ns, action, "throttled")
            raise ApiError(429, str(exc)) from None
        message = {"activationId": activation_id, "namespace": ns, "action": name, "version": action["version"],
                   "revision": action.get("revision"),
                   "params": params, "models": models, "gpu": None, "timeout_ms": timeout_ms,
                   "deadline": deadline, "submitted": submitted, "slo_ms": slo_ms, "attempt": 1,
                   "subject": g.identity.namespace, "blocking": blocking}
        try:
            node = ctl.picker.dispatch(message)
        except redis.RedisError:
            # the LPUSH may have happened with its answer lost: the caller gets the id to check
            log.warning("Redis failed while queueing activation %s", activation_id)
            raise ApiError(503, f"The state store (Redis) failed while queueing activation {activation_id}: it "
                                f"may still run; look it up before invoking again.",
                           {ACTIVATION_HEADER: activation_id}) from None
        except Exception:  # nothing was queued: the record and the slot must not outlive the request
            state.discard_activation(r, ns, activation_id)
            raise
        if node is None:
            state.discard_activation(r, ns, activation_id)
            if state.live_nodes(r):
                metrics.invoked(ns, action, "no_capacity")
                raise ApiError(503, "Every device of the live invokers is unhealthy or has all its activation slots "
                                    "booked; try again later.")
            metrics.invoked(ns, action, "no_invoker")
            raise ApiError(503, "No invoker is available to run the action; try again later.")
        accepted = app.json.response({"activationId": activation_id})
        accepted.status_code = 202
        accepted.headers[ACTIVATION_HEADER] = activation_id
        if not blocking:
            metrics.invoked(ns, action, "accepted")
            log_invocation(activation_id, ns, name, node, blocking=False, outcome="accepted", slo_ms=slo_ms)
            return accepted
        wait_ms = min(settings.max_blocking_wait_ms, timeout_ms + settings.blocking_margin_ms)
        if wait_override is not None:
            wait_ms = min(wait_ms, wait_override)
        try:
            record = state.wait_done(r, activation_id, wait_ms)
        except redis.RedisError:
            # queued already: the activation runs whatever happens to this wait (a Redis
            # restart), so the caller gets its id to poll, not an error inviting a second run
            log.warning("Redis failed while waiting for activation %s: answering 202", activation_id)
            record = None
        latency_ms = now_ms() - submitted
        code = record["response"]["statusCode"] if record is not None and state.is_final(record) else None
        outcome = metrics.blocking_done(ns, action, code, latency_ms)
        log_invocation(activation_id, ns, name, node, blocking=True, outcome=outcome, status_code=code,
                       latency_ms=latency_ms, slo_ms=slo_ms)
        if code is None:
            return accepted
        status = 200 if code == state.SUCCESS else 500 if code == state.WHISK_ERROR else 502
        response = app.json.response(record["response"]["result"] if result_only else record)
        response.status_code = status
        response.headers[ACTIVATION_HEADER] = activation_id
        return response

    # --- activations -------------------------------------------------------------------

    def final_activation(ns: str, activation_id: str) -> dict:
        if not ACTIVATION_ID.match(activation_id):
            raise ApiError(400, "The activation id is not valid: it must be 32 hexadecimal characters.")
        record = state.get_activation(r, activation_id)
        # A pending activation does not exist yet, as in OpenWhisk: clients poll until it does.
        if record is None or record["namespace"] != ns or not state.is_final(record):
            raise ApiError(404, NOT_FOUND)
        return record

    @app.get(NS + "/activations", strict_slashes=False)
    def list_activations(namespace: str) -> Any:
        ns = ctl.namespace(namespace)
        skip, limit = _window("activations")
        name = request.args.get("name") or None
        if name is not None:
            _entity_name(name)
        since, upto = _int_arg("since", "since"), _int_arg("upto", "upto")
        for label, value in (("since", since), ("upto", upto)):
            if value is not None and value < 0:
                raise ApiError(400, f"The value of '{label}' must be epoch milliseconds, not {value}.")
        count, docs = _flag("count"), _flag("docs")
        records = state.iter_activations(r, ns, name=name, since_ms=since, upto_ms=upto)
        if count:
            if docs:
                raise ApiError(400, "The parameter 'docs' is not permitted with 'count'.")
            return {"activations": sum(1 for i, _ in enumerate(records) if i >= skip)}
        page = []
        for i, record in enumerate(records):
            if i >= skip + limit:
                break
            if i >= skip:
                page.append(record if docs else _activation_summary(record))
        return app.json.response(page)

    @app.get(NS + "/activations/<activation_id>", strict_slashes=False)
    def get_activation(namespace: str, activation_id: str) -> Any:
        return final_activation(ctl.namespace(namespace), activation_id)

    @app.get(NS + "/activations/<activation_id>/result")
    def get_result(namespace: str, activation_id: str) -> Any:
        return final_activation(ctl.namespace(namespace), activation_id)["response"]

    @app.get(NS + "/activations/<activation_id>/logs")
    def get_logs(namespace: str, activation_id: str) -> Any:
        return {"logs": final_activation(ctl.namespace(namespace), activation_id)["logs"]}

    # wsk list and wsk namespace get list these collections too; Torpor has none of them.
    @app.get(NS + "/<any(packages, triggers, rules):collection>", strict_slashes=False)
    def empty_collection(namespace: str, collection: str) -> Any:
        ctl.namespace(namespace)
        _window(collection)
        return app.json.response([])

    ctl.start_requeuer()
    return app


# --- torpor controller ---------------------------------------------------------------------

def _gunicorn_app(settings: ControllerSettings, log_settings: LogSettings) -> Any:
    from gunicorn.app.base import BaseApplication

    class ControllerServer(BaseApplication):
        def load_config(self) -> None:
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            for key, value in {"bind": f"{host}:{settings.port}", "workers": 1, "worker_class": "gthread",
                               "threads": settings.threads, "keepalive": settings.keepalive_s,
                               "accesslog": "-", "errorlog": "-",
                               "access_log_format": ACCESS_LOG_FORMAT, "loglevel": log_settings.log_level,
                               "proc_name": "torpor-controller", "graceful_timeout": 10,
                               # one shared ~/.gunicorn/gunicorn.ctl would clash with the other
                               # gunicorn processes of the node (action runtimes)
                               "control_socket_disable": True}.items():
                self.cfg.set(key, value)
            if log_settings.log_format == "json":
                self.cfg.set("logger_class", GunicornJsonLogger)

        def load(self) -> Flask:
            return create_app(settings)

    return ControllerServer()


@click.command("controller")
@options(ControllerSettings)
@options(LogSettings)
def command(**kwargs: Any) -> None:
    """Serve the OpenWhisk-compatible REST API (gunicorn, one gthread worker)."""
    log_settings = configure_from_kwargs(kwargs, "controller")
    settings = from_kwargs(ControllerSettings, kwargs)
    try:
        Authenticator(settings.auth, settings.namespace)
    except CredentialError as exc:
        raise click.BadParameter(str(exc), param_hint="--auth / TORPOR_AUTH") from None
    check_picker_settings(settings.profiles, settings.device_slots)
    _gunicorn_app(settings, log_settings).run()
