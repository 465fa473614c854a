"""Deployment artefacts: Knative manifests, `torpor knative render`, runtimes.json, Dockerfiles, docs.

Knative Services are checked against Knative Serving's published schema, every core
Kubernetes object against the Kubernetes API schema (kubernetes-validate, strict), and the
wiring between the files (socket path, node label, feature flags) against each other.
"""
from __future__ import annotations

import ast
import base64
import importlib.metadata
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement

from controller_plugin.knative import RenderError, command, load_action, load_base, render_service, service_name

ROOT = Path(__file__).resolve().parent.parent
KNATIVE = ROOT / "knative"
KNATIVE_SCHEMA = ROOT.parent / "shared" / "schemas" / "knative" / "serving.knative.dev_service_v1.json"
SAMPLE_ACTION = KNATIVE / "classify-action.json"
SAMPLE_SERVICE = KNATIVE / "function-service.yaml"
# A Kubernetes release kubernetes-validate ships schemas for (checked below).
K8S_VERSION = "1.33.0"
SOCKET_DIR = "/run/torpor"
SOCKET = "/run/torpor/gpu.sock"
GPU_NODE_LABEL = {"torpor.dev/gpu-node": "true"}
# Knative pod-spec fields that stay off unless config-features enables them.
FEATURE_FLAGS = {
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "tolerations": "kubernetes.podspec-tolerations",
    "affinity": "kubernetes.podspec-affinity",
    "hostIPC": "kubernetes.podspec-hostipc",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "initContainers": "kubernetes.podspec-init-containers",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
}
KNATIVE_ONLY_POD_FIELDS = ("containerConcurrency", "timeoutSeconds", "idleTimeoutSeconds",
                           "responseStartTimeoutSeconds")


# ---------------------------------------------------------------- helpers

def manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object of knative/*.yaml (the kustomization itself excluded)."""
    objects = []
    for path in sorted(KNATIVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") != "Kustomization":
                objects.append((path, doc))
    return objects


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def is_knative(doc: dict) -> bool:
    return doc["apiVersion"].startswith("serving.knative.dev/")


def validate_core(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def knative_validator() -> jsonschema.Draft7Validator:
    if not KNATIVE_SCHEMA.is_file():
        pytest.skip(f"Knative Service schema not found at {KNATIVE_SCHEMA} (the shared folder beside the repo)")
    schema = json.loads(KNATIVE_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def as_pod(service: dict) -> dict:
    """The revision template of a Knative Service as a core Pod, for the Kubernetes schema."""
    spec = {k: v for k, v in service["spec"]["template"]["spec"].items() if k not in KNATIVE_ONLY_POD_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": service["metadata"]["name"]}, "spec": spec}


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def sample_action() -> dict:
    return json.loads(SAMPLE_ACTION.read_text(encoding="utf-8"))


def render(action: dict, **kwargs) -> tuple[dict, list[str]]:
    return render_service(action, load_base(SAMPLE_SERVICE), **kwargs)


def zip_code(files: dict[str, str]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return base64.b64encode(buffer.getvalue()).decode()


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    values = [args for k, args in instructions if k == keyword]
    assert values, f"no {keyword}"
    return json.loads(values[-1])  # exec (JSON) form: no shell between the image and torpor


def pip_requirements(instructions: list[tuple[str, str]]) -> list[Requirement]:
    requirements = []
    for keyword, args in instructions:
        if keyword != "RUN":
            continue
        for command_line in re.split(r"&&|;", args):
            words = shlex.split(command_line)
            if words[:2] == ["pip", "install"]:
                requirements += [Requirement(w) for w in words[2:] if not w.startswith("-") and w != "."]
    return requirements


def pyproject_dependencies() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {canonical(r.name): r for r in map(Requirement, data["project"]["dependencies"])}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------- Knative Services

def test_validators_reject_a_broken_manifest(knative_validator):
    service = yaml.safe_load(SAMPLE_SERVICE.read_text(encoding="utf-8"))
    service["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert not knative_validator.is_valid(service)
    deployment = of_kind("Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(deployment)


def test_knative_services_validate_against_knative_schema(knative_validator):
    services = [doc for _, doc in manifests() if is_knative(doc)]
    assert [s["metadata"]["name"] for s in services] == ["classify"]
    rendered = [render(sample_action())[0],
                render({**sample_action(), "name": "Embed_Text", "limits": {"concurrency": 4, "memory": 512}})[0]]
    for service in services + rendered:
        errors = [f"{list(e.path)}: {e.message}" for e in knative_validator.iter_errors(service)]
        assert not errors, errors
        validate_core(as_pod(service))  # hostPath, probes, env: the core schema knows them in detail


def test_core_objects_validate_against_kubernetes_schema():
    assert K8S_VERSION.rsplit(".", 1)[0] in {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    kinds = set()
    for path, doc in manifests():
        if is_knative(doc):
            continue
        try:
            validate_core(doc)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
        kinds.add(doc["kind"])
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "DaemonSet", "PersistentVolumeClaim"} <= kinds


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KNATIVE / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in KNATIVE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert "namespace" not in kustomization  # would move config-features out of knative-serving


def test_function_service_wiring():
    service = yaml.safe_load(SAMPLE_SERVICE.read_text(encoding="utf-8"))
    template = service["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    annotations = template["metadata"]["annotations"]
    assert pod["containerConcurrency"] == 1
    assert annotations["autoscaling.knative.dev/class"] == "kpa.autoscaling.knative.dev"
    assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert int(annotations["autoscaling.knative.dev/max-scale"]) >= 1
    assert float(annotations["autoscaling.knative.dev/target"]) > 0
    assert re.fullmatch(r"\d+[smh]", annotations["autoscaling.knative.dev/scale-down-delay"])

    env = env_of(container)
    assert env["TORPOR_GPU_SOCKET"] == SOCKET
    assert env["__OW_RUNTIME_PLATFORM"] == "knative"
    assert {"__OW_ACTION_CODE", "__OW_ACTION_MAIN", "__OW_ACTION_BINARY", "__OW_ACTION_NAME"} <= env.keys()
    assert not {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"} & env.keys()  # Knative reserves these

    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SOCKET_DIR]
    assert volumes[mount["name"]]["hostPath"] == {"path": SOCKET_DIR, "type": "Directory"}
    assert mount["readOnly"] is True  # Knative forces hostPath mounts read-only; connect() needs no write
    assert "hostIPC" not in pod  # tensors' memfds travel over the socket
    assert pod["nodeSelector"] == GPU_NODE_LABEL

    resources = container.get("resources", {})
    assert not any("nvidia.com/gpu" in resources.get(k, {}) for k in ("limits", "requests"))
    (port,) = container["ports"]
    assert port["name"] in ("http1", "h2c") and port["containerPort"] not in (8012, 8013, 8022, 9090, 9091, 8008)
    probe = container["readinessProbe"]
    assert (probe.get("tcpSocket") or probe["httpGet"])["port"] == port["containerPort"]


def test_readiness_probe_path_is_served_by_the_runtime():
    if importlib.util.find_spec("runtime.action.proxy") is None:
        pytest.skip("runtime/action/proxy.py is not written yet")
    from runtime.action.config import RuntimeSettings
    from runtime.action.proxy import create_app

    service = yaml.safe_load(SAMPLE_SERVICE.read_text(encoding="utf-8"))
    probe = service["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    settings = RuntimeSettings(platform="knative")
    response = create_app(settings).test_client().get(probe["path"])
    assert response.status_code == 200, response.get_data(as_text=True)


def test_gpu_server_daemonset_shares_the_socket_with_functions():
    (daemonset,) = of_kind("DaemonSet")
    service = yaml.safe_load(SAMPLE_SERVICE.read_text(encoding="utf-8"))
    pod = daemonset["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "gpu-server")
    assert int(server["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == SOCKET_DIR]
    assert volumes[mount["name"]]["hostPath"] == {"path": SOCKET_DIR, "type": "DirectoryOrCreate"}
    assert not mount.get("readOnly")  # the server creates the socket
    assert env_of(server)["TORPOR_GPU_SOCKET"] == SOCKET
    # without a node secret the server starts only when told to run unauthenticated
    assert "TORPOR_NODE_SECRET" in env_of(server) or env_of(server)["TORPOR_GPU_INSECURE_NO_AUTH"] == "true"
    assert server["args"][:2] == ["gpu-server", "--socket"]
    assert pod["nodeSelector"] == GPU_NODE_LABEL == service["spec"]["template"]["spec"]["nodeSelector"]
    assert "hostIPC" not in pod
    assert pod["tolerations"] == service["spec"]["template"]["spec"]["tolerations"]


def test_config_features_enable_what_the_services_use():
    (features,) = [doc for doc in of_kind("ConfigMap") if doc["metadata"]["name"] == "config-features"]
    assert features["metadata"]["namespace"] == "knative-serving"
    enabled = {k for k, v in features["data"].items() if v == "enabled"}
    services = [doc for _, doc in manifests() if is_knative(doc)]
    services.append(render({**sample_action(), "name": "other"})[0])
    for service in services:
        pod = service["spec"]["template"]["spec"]
        needed = {flag for field, flag in FEATURE_FLAGS.items() if pod.get(field)}
        if any("hostPath" in v for v in pod.get("volumes", [])):
            needed.add("kubernetes.podspec-volumes-hostpath")
        assert needed <= enabled, f"config-features lacks {needed - enabled}"


def test_controller_and_redis_wiring():
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    services = {s["metadata"]["name"]: s for s in of_kind("Service") if not is_knative(s)}
    redis_pod = deployments["torpor-redis"]["spec"]["template"]["spec"]
    args = redis_pod["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert any(m["mountPath"] == args[args.index("--dir") + 1] for m in redis_pod["containers"][0]["volumeMounts"])
    assert "persistentVolumeClaim" in redis_pod["volumes"][0]

    controller = deployments["torpor-controller"]["spec"]["template"]["spec"]["containers"][0]
    assert controller["args"][0] == "controller"
    assert controller["ports"][0]["containerPort"] == 3233
    env = {e["name"]: e for e in controller["env"]}
    assert env["TORPOR_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "torpor-auth"
    redis_url = env["TORPOR_REDIS_URL"]["value"]
    assert redis_url.startswith(f"redis://torpor-redis:{services['torpor-redis']['spec']['ports'][0]['port']}/")
    assert services["torpor-controller"]["spec"]["ports"][0]["port"] == 3233
    assert env["TORPOR_CONTROLLER_HOST"]["value"] == "0.0.0.0"  # reachable through its Service
    assert "python:3.11-gpu" in env["TORPOR_ACTION_KINDS"]["value"].split(",")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), name
    for name, svc in services.items():
        assert svc["spec"]["selector"] in [d["spec"]["selector"]["matchLabels"] for d in deployments.values()], name


def test_sample_action_code_is_python_with_its_entry_point():
    action = sample_action()
    tree = ast.parse(action["exec"]["code"], "classify.py")
    assert action["exec"]["main"] in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


# ---------------------------------------------------------------- torpor knative render

def test_render_of_the_sample_action_is_the_sample_service():
    rendered, warnings = render(sample_action())
    assert rendered == yaml.safe_load(SAMPLE_SERVICE.read_text(encoding="utf-8"))
    assert warnings == []


def test_render_maps_limits_annotations_and_code():
    action = {**sample_action(), "name": "embed", "version": "0.0.3",
              "exec": {"kind": "python:3.11-gpu", "code": "def handle(a):\n    return a\n", "main": "handle"},
              "annotations": [{"key": "model", "value": ["minilm", "resnet50"]}, {"key": "slo-ms", "value": 200},
                              {"key": "provide-api-key", "value": False}],
              "limits": {"timeout": 1500, "memory": 512, "logs": 10, "concurrency": 4}}
    service, _ = render(action, namespace="functions")
    pod = service["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert service["metadata"]["name"] == "embed" and service["metadata"]["namespace"] == "functions"
    assert pod["containerConcurrency"] == 4
    assert service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/target"] == "4"
    assert pod["timeoutSeconds"] == 2
    assert container["resources"]["limits"]["memory"] == "512Mi" == container["resources"]["requests"]["memory"]
    for meta in (service["metadata"], service["spec"]["template"]["metadata"]):
        assert json.loads(meta["annotations"]["torpor.dev/model"]) == ["minilm", "resnet50"]
        assert meta["annotations"]["torpor.dev/slo-ms"] == "200"
        assert "torpor.dev/provide-api-key" not in meta["annotations"]
    assert service["metadata"]["annotations"]["torpor.dev/action-version"] == "0.0.3"
    env = env_of(container)
    assert env["__OW_ACTION_CODE"] == "def handle(a):\n    return a\n"
    assert env["__OW_ACTION_MAIN"] == "handle"
    assert env["__OW_ACTION_BINARY"] == "false"
    assert env["__OW_ACTION_NAME"] == "embed"
    assert env["TORPOR_GPU_SOCKET"] == SOCKET and env["__OW_RUNTIME_PLATFORM"] == "knative"
    assert any(m["mountPath"] == SOCKET_DIR for m in container["volumeMounts"])
    assert [e["name"] for e in container["env"]].count("__OW_ACTION_CODE") == 1


def test_render_warns_about_timeouts_knative_refuses_by_default():
    service, warnings = render({**sample_action(), "limits": {"timeout": 900_000}})
    assert service["spec"]["template"]["spec"]["timeoutSeconds"] == 900
    assert len(warnings) == 1 and "max-revision-timeout-seconds" in warnings[0]
    assert render({**sample_action(), "limits": {"timeout": 300_000}})[1] == []


def test_render_warns_when_the_code_needs_server_side_apply():
    code = "def main(args):\n    return args\n" + "# padding\n" * 30_000
    service, warnings = render({**sample_action(), "exec": {"kind": "python:3.11-gpu", "code": code}})
    assert env_of(service["spec"]["template"]["spec"]["containers"][0])["__OW_ACTION_CODE"] == code
    assert len(warnings) == 1 and "--server-side" in warnings[0]


def test_render_drops_annotations_the_action_does_not_have():
    service, _ = render({**sample_action(), "annotations": []})
    for meta in (service["metadata"], service["spec"]["template"]["metadata"]):
        assert "torpor.dev/model" not in meta["annotations"] and "torpor.dev/slo-ms" not in meta["annotations"]


def test_render_zip_action():
    code = zip_code({"__main__.py": "def main(args):\n    return args\n", "helper.py": "X = 1\n"})
    service, _ = render({**sample_action(), "name": "zipped", "exec": {"kind": "python:3.11-gpu", "code": code,
                                                                       "binary": True}})
    env = env_of(service["spec"]["template"]["spec"]["containers"][0])
    assert env["__OW_ACTION_BINARY"] == "true" and env["__OW_ACTION_CODE"] == code
    assert env["__OW_ACTION_MAIN"] == "main"


def test_render_blackbox_uses_the_action_image():
    action = {**sample_action(), "exec": {"kind": "blackbox", "image": "registry.example/team/classify:1"}}
    service, _ = render(action)
    (container,) = service["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/team/classify:1"
    assert "__OW_ACTION_CODE" not in env_of(container)
    service, _ = render(sample_action(), image="registry.example/torpor/runtime:2")
    assert service["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/torpor/runtime:2"


def test_render_binds_init_parameters_and_warns_about_the_others():
    action = {**sample_action(), "parameters": [{"key": "LABELS", "value": ["cat", "dog"], "init": True},
                                                {"key": "MODE", "value": "fast", "init": True},
                                                {"key": "threshold", "value": 0.5}]}
    service, warnings = render(action)
    env = env_of(service["spec"]["template"]["spec"]["containers"][0])
    assert env["LABELS"] == '["cat", "dog"]' and env["MODE"] == "fast"
    assert "threshold" not in env
    assert len(warnings) == 1 and "'threshold'" in warnings[0]


@pytest.mark.parametrize("change, message", [
    ({"exec": {"kind": "python:3.11-gpu"}}, "exec.code is missing"),
    ({"exec": {"kind": "nodejs:20", "code": "x"}}, "does not run on the Torpor runtime image"),
    ({"exec": {"kind": "blackbox"}}, "needs exec.image"),
    ({"exec": {"kind": "python:3.11-gpu", "code": "eA==", "binary": True}}, "not a base64 zip"),
    ({"exec": {"kind": "python:3.11-gpu", "code": "x" * (1024 * 1024 + 1)}}, "at most"),
    ({"limits": {"concurrency": 0}}, "limits.concurrency"),
    ({"limits": {"concurrency": 5000}}, "limits.concurrency"),
    ({"limits": {"memory": "256"}}, "limits.memory"),
    ({"limits": {"timeout": -1}}, "limits.timeout"),
    ({"annotations": [{"key": "slo-ms", "value": "soon"}]}, "slo-ms"),
    ({"annotations": {"model": "resnet50"}}, "annotations must be a list"),
    ({"parameters": [{"key": "bad name", "value": 1, "init": True}]}, "environment variable"),
    ({"name": ""}, "no name"),
    ({"exec": None}, "no exec"),
])
def test_render_rejects_bad_records(change, message):
    with pytest.raises(RenderError, match=re.escape(message)):
        render({**sample_action(), **change})


def test_service_names_are_dns_labels_and_stay_distinct():
    assert service_name("classify") == "classify"
    names = {service_name("my_action"), service_name("my-action"), service_name("My.Action"),
             service_name("my-action", package="tools"), service_name("9lives"), service_name("x" * 100)}
    assert len(names) == 6
    for name in names:
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    with pytest.raises(RenderError):
        render(sample_action(), name="Not_A_Label")


def test_load_action_accepts_wsk_action_get_output():
    text = "ok: got action classify\n" + SAMPLE_ACTION.read_text(encoding="utf-8")
    assert load_action(text) == sample_action()
    with pytest.raises(RenderError, match="not JSON"):
        load_action("{")
    with pytest.raises(RenderError, match="JSON object"):
        load_action("[1]")


def test_render_command_writes_the_service(tmp_path):
    out = tmp_path / "classify.yaml"
    runner = CliRunner()
    result = runner.invoke(command, ["render", str(SAMPLE_ACTION), "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert written == yaml.safe_load(SAMPLE_SERVICE.read_text(encoding="utf-8"))
    assert "__OW_ACTION_CODE:" not in out.read_text(encoding="utf-8")  # the code is a literal block, not escaped
    assert "    def main(args):\n" in out.read_text(encoding="utf-8")

    action = {**sample_action(), "limits": {"concurrency": 3}}
    result = runner.invoke(command, ["render", "-", "--image", "example/img:1"], input=json.dumps(action))
    assert result.exit_code == 0, result.output
    service = yaml.safe_load(result.stdout)
    assert service["spec"]["template"]["spec"]["containerConcurrency"] == 3
    assert service["spec"]["template"]["spec"]["containers"][0]["image"] == "example/img:1"


def test_render_command_reports_errors_without_a_traceback(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    result = runner.invoke(command, ["render", str(bad)])
    assert result.exit_code == 1 and "not JSON" in result.output and result.exception.__class__ is SystemExit
    result = runner.invoke(command, ["render", str(SAMPLE_ACTION), "--base", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "not found" in result.output
    result = runner.invoke(command, ["render", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "No such file" in result.output


def test_render_command_through_the_torpor_script(tmp_path):
    out = tmp_path / "svc.yaml"
    result = subprocess.run([sys.executable, "-c", "from runtime.cli import main; main()", "knative", "render",
                             str(SAMPLE_ACTION), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(out.read_text(encoding="utf-8"))["metadata"]["name"] == "classify"


# ---------------------------------------------------------------- runtimes.json

def test_runtimes_manifest():
    manifest = json.loads((ROOT / "runtimes.json").read_text(encoding="utf-8"))
    kinds = []
    for family, entries in manifest["runtimes"].items():
        assert sum(bool(e.get("default")) for e in entries) == 1, f"family {family} needs exactly one default"
        for entry in entries:
            kinds.append(entry["kind"])
            assert entry["image"]["name"] and set(entry["image"]) <= {"prefix", "name", "tag"}
            assert set(entry) <= {"kind", "image", "default", "deprecated", "attached", "requireMain",
                                  "sentinelledLogs", "stemCells"}, entry["kind"]
            if "attached" in entry:
                assert set(entry["attached"]) == {"attachmentName", "attachmentType"}
            for cell in entry.get("stemCells", []):
                assert cell["initialCount"] >= 0 and re.fullmatch(r"\d+ MB", cell["memory"])
    assert len(kinds) == len(set(kinds))
    assert {"python:3.10", "nodejs:20"} <= set(kinds)

    (torpor,) = [e for e in manifest["runtimes"]["python"] if e["kind"] == "python:3.11-gpu"]
    assert torpor["image"] == {"prefix": "torpor", "name": "action-python-gpu", "tag": "latest"}
    assert torpor["attached"] == {"attachmentName": "codefile", "attachmentType": "text/plain"}
    assert torpor["requireMain"] is False and torpor["sentinelledLogs"] is True and torpor["stemCells"]
    assert torpor["image"] in manifest["blackboxes"]
    sample = yaml.safe_load(SAMPLE_SERVICE.read_text(encoding="utf-8"))
    image = torpor["image"]
    assert sample["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image['prefix']}/{image['name']}:{image['tag']}"
    assert sample_action()["exec"]["kind"] == "python:3.11-gpu"


# ---------------------------------------------------------------- Dockerfiles

def test_runtime_image_runs_the_proxy_without_torch():
    stage = final_stage(dockerfile(ROOT / "Dockerfile.runtime"))
    assert exec_form(stage, "ENTRYPOINT") + exec_form(stage, "CMD") == ["torpor", "runtime"]
    assert "8080" in [port for k, args in stage if k == "EXPOSE" for port in args.split()]
    base = next(args for k, args in stage if k == "FROM").lower()
    assert not re.search(r"cuda|pytorch|nvidia", base), base
    runs = " ".join(args for k, args in stage if k == "RUN")
    assert "pip install --no-deps ." in runs
    assert not re.search(r"\b(torch|torchvision|triton|nvidia[-\w]*|cuda[-\w]*|cupy[-\w]*)\b", runs.lower())
    assert any(k == "USER" and not args.startswith(("0", "root")) for k, args in stage)

    installed = {canonical(r.name): r for r in pip_requirements(stage)}
    declared = pyproject_dependencies()
    assert {"flask", "gunicorn", "requests", "numpy", "click", "redis"} <= installed.keys()
    for name, requirement in installed.items():
        assert name in declared, f"{name} is installed in the runtime image but not a dependency in pyproject.toml"
        assert requirement.specifier == declared[name].specifier, f"{name}: {requirement} vs {declared[name]}"


def test_gpu_server_image():
    instructions = dockerfile(ROOT / "Dockerfile.gpu-server")
    stage = final_stage(instructions)
    command_line = exec_form(stage, "ENTRYPOINT") + exec_form(stage, "CMD")
    assert command_line[:3] == ["torpor", "gpu-server", "--socket"]
    assert command_line[3] == SOCKET
    base_arg = next(args for k, args in instructions if k == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-runtime", base_arg)
    (daemonset,) = of_kind("DaemonSet")
    assert env_of(daemonset["spec"]["template"]["spec"]["containers"][0])["TORPOR_GPU_SOCKET"] == command_line[3]


def test_runtime_image_contents_are_enough_for_the_runtime_and_controller():
    """The image's Python packages are pyproject's minus those left out of Dockerfile.runtime.

    Starting `torpor runtime` and `torpor controller`, and importing the redirection client
    that action code imports, with the left-out packages blocked shows that the image can run them.
    """
    installed = {canonical(r.name) for r in pip_requirements(final_stage(dockerfile(ROOT / "Dockerfile.runtime")))}
    left_out = set(pyproject_dependencies()) - installed
    assert "torch" in left_out
    owners = importlib.metadata.packages_distributions()
    blocked = {module for module, dists in owners.items() if {canonical(d) for d in dists} & left_out}
    assert "torch" in blocked
    probe = (
        "import importlib, importlib.abc, sys\n"
        "blocked = set(sys.argv[1].split(','))\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in blocked:\n"
        "            raise ModuleNotFoundError(f'{name} is not in the runtime image', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "if sys.argv[2] == 'import':\n"
        "    importlib.import_module(sys.argv[3])\n"
        "else:\n"
        "    from runtime.cli import main\n"
        "    main(sys.argv[2:])\n"
    )
    checks = [(["runtime", "--help"], "runtime.action.proxy"), (["controller", "--help"], "controller_plugin.api"),
              (["import", "runtime.client"], "runtime.client")]
    checked = 0
    for args, module in checks:
        if importlib.util.find_spec(module) is None:
            continue
        result = subprocess.run([sys.executable, "-c", probe, ",".join(sorted(blocked)), *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{module} cannot start in the runtime image:\n{result.stderr}"
        checked += 1
    if not checked:
        pytest.skip("runtime/action/proxy.py, controller_plugin/api.py and runtime/client.py are not written yet")


# ---------------------------------------------------------------- docs

DOCS = [ROOT / "docs" / "deploy-knative.md", KNATIVE / "README.md", ROOT / "docs" / "deploy-openwhisk.md",
        ROOT / "README.md"]


def shell_lines(text: str) -> list[str]:
    """Command lines of the ```sh blocks and of `inline code` spans, continuations joined."""
    chunks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, flags=re.S)
    chunks += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = []
    for chunk in chunks:
        lines += [line.strip() for line in chunk.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def referenced_files(line: str) -> tuple[list[str], list[str]]:
    """(files a command reads, files it writes) for kubectl apply/delete, torpor knative render,
    docker build and jq."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return [], []
    reads, writes = [], []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word in ("-f", "-k", "--filename", "--kustomize", "--base") and following:
            reads.append(following)
        elif word in ("--out", ">") and following:
            writes.append(following)
    if words[:3] == ["torpor", "knative", "render"] and len(words) > 3:
        reads.append(words[3])
    if words[:1] == ["jq"]:
        reads += [w for w in words[2:] if "/" in w and w != ">"]
    return [r for r in reads if r not in ("-",) and "://" not in r], writes


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_commands_refer_to_files_that_exist(doc):
    lines = [line for line in shell_lines(doc.read_text(encoding="utf-8"))
             if line.startswith(("kubectl", "torpor", "docker build", "jq"))]
    written = {w for line in lines for w in referenced_files(line)[1]}
    read = [r for line in lines for r in referenced_files(line)[0] if r not in written]
    assert read, f"{doc.name}: no kubectl/torpor/docker command found"
    missing = [r for r in read if not (ROOT / r).exists()
               or ((ROOT / r).is_dir() and not (ROOT / r / "kustomization.yaml").is_file())]
    assert not missing, f"{doc.name} refers to missing files: {missing}"


def test_readme_deploy_sections_use_the_deploy_docs_commands():
    sections = re.split(r"^## ", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M)
    deploy = {s.split("\n", 1)[0]: s for s in sections if s.startswith("Deploy on ")}
    assert sorted(deploy) == ["Deploy on Knative", "Deploy on OpenWhisk"]
    documented = set(shell_lines((ROOT / "docs" / "deploy-openwhisk.md").read_text(encoding="utf-8"))
                     + shell_lines((ROOT / "docs" / "deploy-knative.md").read_text(encoding="utf-8")))
    for title, text in deploy.items():
        commands = [line.strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)
                    for line in block.splitlines() if line.strip()]
        assert commands, title
        assert not [c for c in commands if c not in documented], f"README {title}: commands not in docs/deploy-*.md"


def test_knative_docs_apply_every_manifest():
    text = (ROOT / "docs" / "deploy-knative.md").read_text(encoding="utf-8")
    applied = " ".join(line for line in shell_lines(text) if line.startswith("kubectl apply"))
    assert "-k knative/" in applied and "-f knative/config-features-patch.yaml" in applied
    assert "torpor knative render" in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_manifests_validate(doc, knative_validator):
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)]
    for block in blocks:
        if not (isinstance(block, dict) and "apiVersion" in block and "kind" in block):
            continue
        if is_knative(block):
            assert knative_validator.is_valid(block)
        else:
            validate_core(block)
