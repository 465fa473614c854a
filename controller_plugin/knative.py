"""``torpor knative``: an OpenWhisk action record as a Knative Service.

``torpor knative render ACTION_JSON_FILE`` reads an action record (what ``wsk action get
NAME`` prints, or ``GET /api/v1/namespaces/{ns}/actions/{name}`` returns) and writes the
Knative Service that runs it on the Torpor runtime image. The Service is built on a base
Service -- by default the sample ``knative/function-service.yaml`` -- whose action-specific
parts (name, code, entry point, limits, model and SLO annotations) are replaced, so the
platform wiring (GPU-server socket mount, node selector, autoscaling) has one source.

The runtime initialises itself from the environment under Knative (``__OW_ACTION_CODE``,
``__OW_ACTION_MAIN``, ``__OW_ACTION_BINARY``, ``__OW_ACTION_NAME`` with
``__OW_RUNTIME_PLATFORM=knative``).
"""
from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import click
import yaml

DEFAULT_BASE = Path(__file__).resolve().parent.parent / "knative" / "function-service.yaml"

ACTION_ENV_PREFIX = "__OW_ACTION_"
# Action annotations (OpenWhisk `-a KEY VALUE`) carried to the Service as `torpor.dev/KEY`.
CARRIED_ANNOTATIONS = ("model", "slo-ms")
# Service annotations that describe the action; replaced as a whole on every render.
ACTION_ANNOTATIONS = tuple(f"torpor.dev/{key}" for key in
                           ("action-name", "action-namespace", "action-version", *CARRIED_ANNOTATIONS))
ACTION_LABEL = "torpor.dev/action"
TARGET_ANNOTATION = "autoscaling.knative.dev/target"

MAX_NAME = 63  # a Kubernetes Service name is a DNS-1035 label
MAX_CONCURRENCY = 1000  # Knative's default container-concurrency-max-limit
# A Kubernetes object is at most ~1.5 MiB; the code travels inside one (three, with the
# Configuration and Revision Knative derives from the Service).
MAX_INLINE_CODE_BYTES = 1024 * 1024
# Client-side `kubectl apply` copies the object into an annotation, and annotations are
# limited to 256 KiB together.
CLIENT_APPLY_CODE_BYTES = 200 * 1024
# Knative's default max-revision-timeout-seconds (ConfigMap config-defaults).
KNATIVE_MAX_TIMEOUT_S = 600

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class RenderError(ValueError):
    """The action record or the base Service cannot make a Knative Service; the message says why."""


def load_action(text: str) -> dict[str, Any]:
    """Parses an action record from JSON text.

    Accepts the raw JSON of the REST API and the output of ``wsk action get``, whose first
    line is ``ok: got action NAME``.

    Raises:
        RenderError: not JSON, or not a JSON object.
    """
    body = text.lstrip()
    if body.startswith("ok:"):
        body = body.partition("\n")[2]
    try:
        record = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RenderError(f"the action record is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise RenderError("the action record must be a JSON object")
    return record


def load_base(path: Path) -> dict[str, Any]:
    """Reads the base Knative Service (one YAML document) from ``path``.

    Raises:
        RenderError: missing file, not YAML, not a ``serving.knative.dev/v1`` Service with
            exactly one container.
    """
    try:
        base = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RenderError(f"base Service {path} not found; give one with --base") from None
    except yaml.YAMLError as exc:
        raise RenderError(f"base Service {path} is not YAML: {exc}") from None
    if not (isinstance(base, dict) and base.get("apiVersion") == "serving.knative.dev/v1"
            and base.get("kind") == "Service"):
        raise RenderError(f"{path} is not a serving.knative.dev/v1 Service")
    containers = base.get("spec", {}).get("template", {}).get("spec", {}).get("containers")
    if not isinstance(containers, list) or len(containers) != 1:
        raise RenderError(f"the base Service in {path} must have exactly one container")
    return base


def service_name(action_name: str, package: str | None = None) -> str:
    """The Kubernetes name of an action: a DNS-1035 label of at most 63 characters.

    ``my_Action`` in package ``tools`` becomes ``tools-my-action-<hash>``: lower case,
    other characters replaced by ``-``; a hash of the original name is appended whenever
    the name had to change, so that distinct actions keep distinct Services.

    Raises:
        RenderError: empty name.
    """
    original = f"{package}/{action_name}" if package else action_name
    if not action_name:
        raise RenderError("the action record has no name")
    name = re.sub(r"[^a-z0-9]+", "-", original.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"fn-{name}".rstrip("-")
    if name == original and len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(original.encode("utf-8")).hexdigest()[:8]
    return f"{name[:MAX_NAME - 9].rstrip('-')}-{digest}"


def _pairs(record: dict[str, Any], field: str) -> list[dict[str, Any]]:
    pairs = record.get(field) or []
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and isinstance(p.get("key"), str) for p in pairs):
        raise RenderError(f"{field} must be a list of {{\"key\": ..., \"value\": ...}} objects")
    return pairs


def _annotation_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _positive_int(limits: dict[str, Any], key: str, unit: str, maximum: int | None = None) -> int | None:
    if key not in limits:
        return None
    value = limits[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum and value > maximum):
        bound = f" and at most {maximum}" if maximum else ""
        raise RenderError(f"limits.{key} must be a whole number of {unit} of at least 1{bound}, got {value!r}")
    return value


def _check_zip(code: str) -> None:
    try:
        payload = base64.b64decode(code, validate=True)
    except (binascii.Error, ValueError):
        raise RenderError("exec.binary is true but exec.code is not base64") from None
    if not payload.startswith(b"PK"):
        raise RenderError("exec.binary is true but exec.code is not a base64 zip archive")


def render_service(action: dict[str, Any], base: dict[str, Any], image: str | None = None,
                   namespace: str | None = None, name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Builds the Knative Service of one action on top of ``base``.

    Args:
        action: OpenWhisk action record: ``name``, ``namespace``, ``version``, ``exec``
            (``kind``, ``code``, ``binary``, ``main``, ``image``), ``parameters``,
            ``annotations`` and ``limits`` (``timeout`` ms, ``memory`` MB, ``concurrency``).
        base: the base Service (see :func:`load_base`); not modified.
        image: container image; default ``exec.image`` of a blackbox action, else the base's.
        namespace: Kubernetes namespace; default the base's.
        name: Service name; default :func:`service_name` of the action.

    Returns:
        The Service as a dict, and warnings for the user (parameters Knative cannot bind,
        code too large for client-side ``kubectl apply``).

    Raises:
        RenderError: the record lacks what a Service needs or holds values out of range.
    """
    warnings: list[str] = []
    execution = action.get("exec")
    if not isinstance(execution, dict):
        raise RenderError("the action record has no exec object")
    kind = execution.get("kind")
    if not isinstance(kind, str) or not kind:
        raise RenderError("exec.kind is missing")
    blackbox = kind == "blackbox"
    if not (blackbox or kind.startswith("python") or image):
        raise RenderError(f"kind {kind!r} does not run on the Torpor runtime image (a Python runtime); "
                          "give --image of a runtime image that serves it")
    image = image or (execution.get("image") if blackbox else None)
    if blackbox and not image:
        raise RenderError("a blackbox action needs exec.image (or --image)")
    code = execution.get("code")
    if code is not None and not isinstance(code, str):
        raise RenderError("exec.code must be a string")
    if not code and not blackbox:
        raise RenderError("exec.code is missing: the action has no code to run")
    binary = execution.get("binary", False)
    if not isinstance(binary, bool):
        raise RenderError("exec.binary must be true or false")
    main = execution.get("main") or "main"
    if not isinstance(main, str):
        raise RenderError("exec.main must be a string")
    if code:
        size = len(code.encode("utf-8"))
        if size > MAX_INLINE_CODE_BYTES:
            raise RenderError(f"the code is {size} bytes; a Knative Service holds at most {MAX_INLINE_CODE_BYTES}: "
                              "build an image with the code in it and render the action as a blackbox")
        if size > CLIENT_APPLY_CODE_BYTES:
            warnings.append(f"the code is {size} bytes: apply the Service with `kubectl apply --server-side` "
                            "(client-side apply stores a copy in an annotation limited to 256 KiB)")
        if binary:
            _check_zip(code)

    action_name = action.get("name")
    if not isinstance(action_name, str) or not action_name:
        raise RenderError("the action record has no name")
    ow_namespace = action.get("namespace") if isinstance(action.get("namespace"), str) else ""
    package = ow_namespace.split("/", 1)[1] if "/" in ow_namespace else None
    k8s_name = name or service_name(action_name, package)
    if not _DNS_1035.match(k8s_name) or len(k8s_name) > MAX_NAME:
        raise RenderError(f"{k8s_name!r} is not a valid Service name (lower-case letters, digits and '-', "
                          f"starting with a letter, at most {MAX_NAME} characters)")

    limits = action.get("limits") or {}
    if not isinstance(limits, dict):
        raise RenderError("limits must be an object")
    timeout_ms = _positive_int(limits, "timeout", "ms")
    memory_mb = _positive_int(limits, "memory", "MB")
    concurrency = _positive_int(limits, "concurrency", "requests", MAX_CONCURRENCY)

    carried: dict[str, str] = {}
    for pair in _pairs(action, "annotations"):
        if pair["key"] in CARRIED_ANNOTATIONS:
            carried[f"torpor.dev/{pair['key']}"] = _annotation_value(pair.get("value"))
    slo = carried.get("torpor.dev/slo-ms")
    if slo is not None:
        try:
            if not float(slo) > 0:
                raise ValueError
        except ValueError:
            raise RenderError(f"annotation slo-ms must be a positive number of ms, got {slo!r}") from None

    init_env: list[dict[str, str]] = []
    for pair in _pairs(action, "parameters"):
        if pair.get("init") is True:
            if not _ENV_NAME.match(pair["key"]):
                raise RenderError(f"init parameter {pair['key']!r} is not a valid environment variable name")
            value = pair.get("value")
            init_env.append({"name": pair["key"], "value": value if isinstance(value, str) else json.dumps(value)})
        else:
            warnings.append(f"parameter {pair['key']!r} is not bound under Knative (no controller merges "
                            "default parameters): callers must pass it")

    service = copy.deepcopy(base)
    metadata = service.setdefault("metadata", {})
    metadata["name"] = k8s_name
    if namespace:
        metadata["namespace"] = namespace
    template = service["spec"]["template"]
    template_meta = template.setdefault("metadata", {})
    pod = template["spec"]
    container = pod["containers"][0]

    for meta in (metadata, template_meta):
        meta.setdefault("labels", {})[ACTION_LABEL] = k8s_name
    annotations = {key: value for key, value in (metadata.get("annotations") or {}).items()
                   if key not in ACTION_ANNOTATIONS}
    annotations["torpor.dev/action-name"] = action_name
    if ow_namespace:
        annotations["torpor.dev/action-namespace"] = ow_namespace
    if isinstance(action.get("version"), str):
        annotations["torpor.dev/action-version"] = action["version"]
    metadata["annotations"] = {**annotations, **carried}
    template_annotations = {key: value for key, value in (template_meta.get("annotations") or {}).items()
                            if key not in ACTION_ANNOTATIONS}
    if concurrency is not None:
        template_annotations[TARGET_ANNOTATION] = str(concurrency)
    template_meta["annotations"] = {**template_annotations, **carried}

    if concurrency is not None:
        pod["containerConcurrency"] = concurrency
    if timeout_ms is not None:
        pod["timeoutSeconds"] = math.ceil(timeout_ms / 1000)
        if pod["timeoutSeconds"] > KNATIVE_MAX_TIMEOUT_S:
            warnings.append(f"timeoutSeconds {pod['timeoutSeconds']} is above Knative's default "
                            f"max-revision-timeout-seconds ({KNATIVE_MAX_TIMEOUT_S}): raise it in config-defaults")
    if image:
        container["image"] = image
    if memory_mb is not None:
        resources = container.setdefault("resources", {})
        resources.setdefault("limits", {})["memory"] = f"{memory_mb}Mi"
        resources.setdefault("requests", {})["memory"] = f"{memory_mb}Mi"

    init_names = {entry["name"] for entry in init_env}
    env = [entry for entry in container.get("env") or []
           if not entry.get("name", "").startswith(ACTION_ENV_PREFIX) and entry.get("name") not in init_names]
    env += [{"name": "__OW_ACTION_NAME", "value": action_name},
            {"name": "__OW_ACTION_MAIN", "value": main},
            {"name": "__OW_ACTION_BINARY", "value": "true" if binary else "false"}]
    if code:
        env.append({"name": "__OW_ACTION_CODE", "value": code})
    container["env"] = env + init_env
    return service, warnings


class _ServiceDumper(yaml.SafeDumper):
    """Writes multi-line strings (the action's code) as literal blocks, readable as code."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ServiceDumper.add_representer(str, _represent_str)


def dump_service(service: dict[str, Any], source: str = "") -> str:
    """YAML text of ``service``, with a header naming the action record it came from."""
    header = f"# Generated by `torpor knative render {source}`.\n" if source else ""
    return header + yaml.dump(service, Dumper=_ServiceDumper, sort_keys=False, allow_unicode=True, width=120)


@click.group("knative")
def command() -> None:
    """Deploy actions on Knative Serving."""


@command.command("render")
@click.argument("action_file", metavar="ACTION_JSON_FILE", type=click.File("r", encoding="utf-8"))
@click.option("--image", help="container image (default: exec.image of a blackbox action, else the base's)")
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True), help="write here instead of stdout")
@click.option("--base", "base_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_BASE,
              show_default=True, help="Knative Service the action's parts are written into")
@click.option("--namespace", help="Kubernetes namespace (default: the base's)")
@click.option("--name", help="Service name (default: derived from the action's name)")
def render_command(action_file, image, out, base_path, namespace, name) -> None:
    """Write the Knative Service of the action in ACTION_JSON_FILE ('-': stdin).

    ACTION_JSON_FILE is an OpenWhisk action record, e.g. `wsk action get NAME > NAME.json`.
    limits.concurrency becomes containerConcurrency, limits.memory (MB) the memory limit,
    limits.timeout (ms) timeoutSeconds; the model and slo-ms annotations become
    torpor.dev/ annotations.
    """
    try:
        service, warnings = render_service(load_action(action_file.read()), load_base(base_path),
                                           image=image, namespace=namespace, name=name)
    except RenderError as exc:
        raise click.ClickException(str(exc)) from exc
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    source = action_file.name if action_file.name != "<stdin>" else "-"
    text = dump_service(service, source)
    if out:
        Path(out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
