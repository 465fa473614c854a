"""OpenWhisk runtime conformance of the action runtime, run as the image runs it: the
``torpor runtime`` command (gunicorn inside) as a subprocess, spoken to over HTTP, its stdout
and stderr read through pipes to check logs and activation sentinels."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
REINIT = "Cannot initialize the action more than once."
NO_CODE = "Missing main/no code to execute."
BAD_RESULT = "The action did not return a dictionary or array."
BAD_ARGUMENT = "The action did not receive a dictionary or array as an argument."
TORPOR = Path(sys.executable).parent / "torpor"
RUN_LIMIT = 1024 * 1024 + 64 * 1024

ECHO = """
import sys
def main(args):
    print("hello stdout")
    print("hello stderr", file=sys.stderr)
    return args
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RuntimeProcess:
    """A ``torpor runtime`` subprocess on a free port; threads collect its stdout and stderr."""

    def __init__(self, action_dir: Path, args: tuple[str, ...] = (), port: int | None = None, **env: str):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("__OW_", "K_", "TORPOR_"))}
        clean.update(PORT=str(self.port), TORPOR_ACTION_DIR=str(action_dir))
        clean.update(env)
        self.proc = subprocess.Popen([str(TORPOR), "runtime", *args], env=clean,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._lock = threading.Lock()
        for name, pipe in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._collect, args=(name, pipe), daemon=True).start()
        self._wait_ready()

    def _collect(self, name: str, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            with self._lock:
                self.lines[name].append(raw.decode("utf-8", "replace").rstrip("\n"))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"torpor runtime exited {self.proc.returncode}: {self.lines['err']}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.02)
        raise AssertionError("torpor runtime did not answer /healthz within 30 s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def post(self, path: str, payload=None, data=None) -> requests.Response:
        return requests.post(self.url + path, json=payload, data=data, timeout=30)

    def init(self, code: str, main: str = "main", binary: bool = False, env=None) -> requests.Response:
        value = {"name": "action", "main": main, "code": code, "binary": binary}
        if env is not None:
            value["env"] = env
        return self.post("/init", {"value": value})

    def run(self, value, **activation) -> requests.Response:
        return self.post("/run", {"value": value, **activation})

    def mark(self) -> tuple[int, int]:
        """Position in the logs; ``since(mark)`` returns what came after it."""
        with self._lock:
            return len(self.lines["out"]), len(self.lines["err"])

    def since(self, mark: tuple[int, int]) -> tuple[list[str], list[str]]:
        with self._lock:
            return self.lines["out"][mark[0]:], self.lines["err"][mark[1]:]

    def sentinels_since(self, mark: tuple[int, int]) -> tuple[int, int]:
        out, err = self.since(mark)
        return out.count(SENTINEL), err.count(SENTINEL)

    def wait_sentinels(self, mark: tuple[int, int], count: int = 1) -> tuple[list[str], list[str]]:
        """Waits until ``count`` sentinels arrived on each stream since ``mark`` and returns
        the logs since ``mark``; fails when more arrived."""
        deadline = time.monotonic() + 10
        while min(self.sentinels_since(mark)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.sentinels_since(mark) == (count, count)
        return self.since(mark)


def zipped(files: dict[str, str]) -> str:
    """Base64 of a zip archive holding ``files`` (path -> text)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, textwrap.dedent(text))
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def start_runtime(tmp_path):
    """Starts fresh runtimes (for tests that need their own init); stops them afterwards."""
    started = []

    def start(**env: str) -> RuntimeProcess:
        started.append(RuntimeProcess(tmp_path, **env))
        return started[-1]

    yield start
    for runtime in started:
        runtime.close()


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    """A runtime never successfully initialised: tests on it only send failing inits."""
    runtime = RuntimeProcess(tmp_path_factory.mktemp("blank"), TORPOR_MAX_CODE_BYTES="1000")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    """A runtime initialised with the conformance echo action."""
    runtime = RuntimeProcess(tmp_path_factory.mktemp("echo"))
    assert runtime.init(ECHO).status_code == 200
    yield runtime
    runtime.close()


# conformance 1-2: init without code


def test_init_with_empty_code_is_refused(blank):
    mark = blank.mark()
    r = blank.init("")
    assert r.status_code == 403
    assert r.json() == {"error": NO_CODE}
    blank.wait_sentinels(mark)


def test_init_with_empty_object_is_refused(blank):
    mark = blank.mark()
    r = blank.post("/init", {})
    assert r.status_code != 200
    assert r.json()["error"] in (NO_CODE, "The action failed to generate or locate a binary. See logs for details.")
    blank.wait_sentinels(mark)


def test_run_before_init_fails(blank):
    mark = blank.mark()
    r = blank.run({"a": 1})
    assert r.status_code == 502
    assert r.json()["error"]
    blank.wait_sentinels(mark)


# conformance 3: result not an object


@pytest.fixture(scope="module")
def bad_result(tmp_path_factory):
    """A runtime whose action returns, per ``kind``, something that is not a JSON object."""
    runtime = RuntimeProcess(tmp_path_factory.mktemp("bad_result"))
    assert runtime.init("""
def main(args):
    return {"string": "not a json object", "none": None, "number": 42,
            "nan": {"v": float("nan")}, "set": {"v": {1, 2}}}[args["kind"]]
""").status_code == 200
    yield runtime
    runtime.close()


@pytest.mark.parametrize("kind,error", [("string", BAD_RESULT), ("none", BAD_RESULT), ("number", BAD_RESULT),
                                        ("nan", "not JSON"), ("set", "not JSON")])
def test_result_that_is_not_an_object_is_502(bad_result, kind, error):
    mark = bad_result.mark()
    r = bad_result.run({"kind": kind})
    assert r.status_code == 502
    assert error in r.json()["error"]
    bad_result.wait_sentinels(mark)


# conformance 4: second init


def test_second_init_is_403_with_exact_body_and_no_sentinel(echo):
    mark = echo.mark()
    r = echo.init(ECHO)
    assert r.status_code == 403
    assert r.text.strip() == '{"error":"Cannot initialize the action more than once."}'
    # a run afterwards ends with exactly one sentinel per stream: the refused init wrote none
    assert echo.run({}).status_code == 200
    out, err = echo.wait_sentinels(mark)
    assert out.index(REINIT) < out.index(SENTINEL)
    assert err.index(REINIT) < err.index(SENTINEL)


# conformance 5: non-standard entry point


def test_non_standard_entry_point(start_runtime):
    runtime = start_runtime()
    assert runtime.init("def niam(args):\n    return args\n", main="niam").status_code == 200
    assert runtime.run({"string": "hello"}).json() == {"string": "hello"}


# conformance 6: echo and logs


@pytest.mark.parametrize("value", [{"string": "hello"}, {"string": "❄ ☃ ❄"}, {"numbers": [42, 1]},
                                   {"object": {"a": "A"}}])
def test_echo_with_logs_and_one_sentinel_per_stream(echo, value):
    mark = echo.mark()
    r = echo.run(value)
    assert r.status_code == 200
    assert r.json() == value
    out, err = echo.wait_sentinels(mark)
    assert out == ["hello stdout", SENTINEL]
    assert err == ["hello stderr", SENTINEL]


def test_array_input_and_array_result(echo):
    value = [1, "two", {"three": [3]}]
    r = echo.run(value)
    assert r.status_code == 200
    assert r.json() == value


@pytest.mark.parametrize("value", [42, "text", None, True])
def test_argument_that_is_not_an_object_or_array_is_404(echo, value):
    mark = echo.mark()
    r = echo.run(value)
    assert r.status_code == 404
    assert r.json() == {"error": BAD_ARGUMENT}
    echo.wait_sentinels(mark)


# conformance 7: Unicode in source, parameters, logs and result


def test_unicode_source_parameters_logs_and_result(start_runtime):
    runtime = start_runtime()
    mark = runtime.mark()
    assert runtime.init("""
def main(args):
    sep = args["delimiter"]
    s = sep + " ☃ " + sep
    print(s)
    return {"winter": s}
""").status_code == 200
    r = runtime.run({"delimiter": "❄"})
    assert r.json() == {"winter": "❄ ☃ ❄"}
    # a successful init writes no sentinel: the run's is the only one
    out, _ = runtime.wait_sentinels(mark)
    assert out == ["❄ ☃ ❄", SENTINEL]


# conformance 8: env from /init at import time; the runtime itself never loads torch


def test_init_env_is_set_before_import(start_runtime):
    runtime = start_runtime()
    code = """
import os, sys
AT_IMPORT = {name: os.environ[name] for name in ("SOME_VAR", "ANOTHER_VAR", "NUMBER")}
def main(args):
    return {"at_import": AT_IMPORT, "module": __name__,
            "heavy": sorted(m for m in ("torch", "torch.cuda", "tensorflow") if m in sys.modules)}
"""
    assert runtime.init(code, env={"SOME_VAR": "xyz", "ANOTHER_VAR": "", "NUMBER": 42}).status_code == 200
    result = runtime.run({}).json()
    assert result["at_import"] == {"SOME_VAR": "xyz", "ANOTHER_VAR": "", "NUMBER": "42"}
    assert result["module"] == "main__"
    assert result["heavy"] == []


def test_init_env_with_a_non_object_is_400(blank):
    r = blank.init("def main(a):\n    return a\n", env=["A=1"])
    assert r.status_code == 400
    assert "env" in r.json()["error"]


# conformance 9: __OW_* activation context


OW_KEYS = ["api_host", "api_key", "namespace", "action_name", "action_version", "activation_id", "deadline"]


def test_activation_context_variables(start_runtime):
    runtime = start_runtime(__OW_API_HOST="https://whisk.example:443")
    assert runtime.init(f"""
import os
def main(args):
    return {{key: os.environ.get("__OW_" + key.upper()) for key in {OW_KEYS!r}}}
""").status_code == 200
    context = {"api_key": "uuid:key", "namespace": "guest", "action_name": "/guest/ctx", "action_version": "0.0.1",
               "activation_id": "a1b2", "transaction_id": "t1", "deadline": "1700000000000"}
    assert runtime.run({}, **context).json() == {"api_host": "https://whisk.example:443", "api_key": "uuid:key",
                                                 "namespace": "guest", "action_name": "/guest/ctx",
                                                 "action_version": "0.0.1", "activation_id": "a1b2",
                                                 "deadline": "1700000000000"}
    # the next activation has no api_key and a numeric deadline: nothing of the previous one stays
    second = runtime.run({}, namespace="other", activation_id="c3d4", deadline=1700000000123).json()
    assert second["api_key"] is None and second["action_name"] is None
    assert second["deadline"] == "1700000000123"
    assert second["namespace"] == "other"
    assert second["api_host"] == "https://whisk.example:443"


# conformance 10: ~1 MB argument


def test_one_megabyte_string_echoes_byte_for_byte(echo):
    text = ("0123456789abcdefghijklmnopqrstuvwxyz" * 29_200 + "❄ ☃ ❄")[-1_048_561:]
    # sent as the invoker sends it: UTF-8, not \u-escaped
    body = json.dumps({"value": {"arg": text}}, ensure_ascii=False).encode()
    r = echo.post("/run", data=body)
    assert r.status_code == 200
    assert r.json()["arg"].encode() == text.encode()


# size limits and malformed bodies: clear JSON errors, never a 500


def test_run_body_over_the_limit_is_413(echo):
    mark = echo.mark()
    r = echo.run({"arg": "x" * (RUN_LIMIT + 1)})
    assert r.status_code == 413
    assert r.json()["error"].endswith(f"limit {RUN_LIMIT} bytes")
    echo.wait_sentinels(mark)
    assert echo.run({"still": "alive"}).json() == {"still": "alive"}


def test_chunked_run_body_over_the_limit_is_413(echo):
    def chunks():
        yield b'{"value": {"arg": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}}'

    r = requests.post(echo.url + "/run", data=chunks(), timeout=30)
    assert r.status_code == 413
    assert r.json()["error"].endswith(f"limit {RUN_LIMIT} bytes")


def test_init_code_over_the_limit_is_413(blank):
    limit = 1000 + 64 * 1024
    r = blank.init("#" * (limit + 10))
    assert r.status_code == 413
    assert r.json()["error"].endswith(f"limit {limit} bytes")


@pytest.mark.parametrize("body,problem", [
    (b"", "empty"),
    (b" \r\n\t ", "whitespace"),
    (b'{"value": {"a": "\x00"}}', "NUL byte"),
    (b'{"value": {"a": 1', "truncated"),
    (b'{"value": {"a": 1}} x', "not valid JSON"),
    (b'{"value": NaN}', "NaN"),
    (b'{"value": "\xff"}', "UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b"[" * 100_000, "deeply"),
    (b'{"value": {"a": 1e400}}', "out of the range of a double"),
])
def test_malformed_run_body_is_400(echo, body, problem):
    mark = echo.mark()
    r = echo.post("/run", data=body)
    assert r.status_code == 400
    assert problem in r.json()["error"]
    echo.wait_sentinels(mark)


@pytest.mark.parametrize("body", [b'{"value": {}, "a=b": "x"}', b'{"value": {}, "namespace": "a\\u0000b"}',
                                  b'{"value": {}, "\\ud800": "lone surrogate"}'])
def test_activation_field_that_cannot_be_an_env_var_is_400(echo, body):
    mark = echo.mark()
    r = echo.post("/run", data=body)
    assert r.status_code == 400
    assert "environment variable" in r.json()["error"]
    echo.wait_sentinels(mark)


@pytest.mark.parametrize("body,problem", [(b"", "empty"), (b'{"value": {"code": "x"', "truncated"),
                                          (b'{"value": ["code"]}', "object")])
def test_malformed_init_body_is_400(blank, body, problem):
    r = blank.post("/init", data=body)
    assert r.status_code == 400
    assert problem in r.json()["error"]


def test_port_flag_wins_over_the_port_variable(tmp_path):
    port = _free_port()
    runtime = RuntimeProcess(tmp_path, args=("--port", str(port)), port=port, PORT="not-a-port")
    try:
        assert runtime.init(ECHO).status_code == 200
        assert runtime.run({"on": port}).json() == {"on": port}
    finally:
        runtime.close()


def test_unknown_route_and_method_are_json_errors(blank):
    r = requests.get(blank.url + "/run", timeout=10)
    assert r.status_code == 405
    assert "error" in r.json()
    r = blank.post("/", {"value": {}})
    assert r.status_code == 404
    assert "error" in r.json()


# Python runtime extras: exceptions and zip actions


def test_exception_is_502_with_traceback_on_stderr(start_runtime):
    runtime = start_runtime()
    assert runtime.init("""
import sys
def main(args):
    if args.get("exit"):
        sys.exit(3)
    raise ValueError("nooooo")
""").status_code == 200
    mark = runtime.mark()
    r = runtime.run({})
    assert r.status_code == 502
    assert r.json() == {"error": "nooooo"}
    _, err = runtime.wait_sentinels(mark)
    assert "Traceback (most recent call last):" in err
    assert "ValueError: nooooo" in err
    # sys.exit in user code fails the activation, not the runtime
    r = runtime.run({"exit": True})
    assert r.status_code == 502
    assert r.json() == {"error": "3"}
    assert requests.get(runtime.url + "/healthz", timeout=10).json()["initialized"] is True


def test_code_that_fails_to_import_is_502(blank):
    mark = blank.mark()
    r = blank.init("def main(args)\n    return args\n")
    assert r.status_code == 502
    assert "SyntaxError" in r.json()["error"]
    _, err = blank.wait_sentinels(mark)
    assert any("SyntaxError" in line for line in err)


def test_missing_entry_point_is_502(blank):
    r = blank.init("def main(args):\n    return args\n", main="nope")
    assert r.status_code == 502
    assert "nope" in r.json()["error"]


def test_zip_with_main_py(start_runtime):
    runtime = start_runtime()
    code = zipped({"__main__.py": "def main(args):\n    return {'zipped': args['name']}\n"})
    assert runtime.init(code, binary=True).status_code == 200
    assert runtime.run({"name": "Ada"}).json() == {"zipped": "Ada"}


def test_zip_with_another_entry_point(start_runtime):
    runtime = start_runtime()
    code = zipped({"__main__.py": "def niam(args):\n    return {'greetings': 'Hello from a non-standard entrypoint.'}\n"})
    assert runtime.init(code, main="niam", binary=True).status_code == 200
    assert runtime.run({}).json() == {"greetings": "Hello from a non-standard entrypoint."}


def test_zip_reads_relative_files_and_imports_siblings(start_runtime, tmp_path):
    runtime = start_runtime()
    code = zipped({
        "__main__.py": """
            import os
            import helper
            def main(args):
                with open("data/words.txt", encoding="utf-8") as f:
                    words = f.read().split()
                return {"words": words, "shout": helper.shout(words[0]), "cwd": os.getcwd()}
        """,
        "helper.py": "def shout(word):\n    return word.upper() + '!'\n",
        "data/words.txt": "snow ❄ ice\n",
    })
    assert runtime.init(code, binary=True).status_code == 200
    result = runtime.run({}).json()
    assert result["words"] == ["snow", "❄", "ice"]
    assert result["shout"] == "SNOW!"
    assert Path(result["cwd"]).parent == tmp_path


def test_zip_with_a_virtualenv(start_runtime, tmp_path):
    runtime = start_runtime()
    code = zipped({
        "__main__.py": """
            import os
            import tinymod
            def main(args):
                return {"greeting": tinymod.GREETING, "from": tinymod.__file__, "venv": os.environ["VIRTUAL_ENV"]}
        """,
        "virtualenv/bin/activate_this.py": """
            import os, site
            base = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            os.environ["VIRTUAL_ENV"] = base
            site.addsitedir(os.path.join(base, "lib", "python3", "site-packages"))
        """,
        "virtualenv/lib/python3/site-packages/tinymod.py": "GREETING = 'hello from the virtualenv'\n",
    })
    assert runtime.init(code, binary=True).status_code == 200
    result = runtime.run({}).json()
    assert result["greeting"] == "hello from the virtualenv"
    assert result["from"].endswith("virtualenv/lib/python3/site-packages/tinymod.py")
    assert result["venv"].startswith(str(tmp_path))


def test_zip_without_main_py_is_502(blank):
    mark = blank.mark()
    r = blank.init(zipped({"main.py": "def main(args):\n    return args\n"}), binary=True)
    assert r.status_code == 502
    assert "__main__.py" in r.json()["error"]
    _, err = blank.wait_sentinels(mark)
    assert any("__main__.py" in line for line in err)


def test_zip_with_a_virtualenv_lacking_activate_this_is_502(blank):
    r = blank.init(zipped({"__main__.py": "def main(a):\n    return a\n", "virtualenv/README": "empty\n"}), binary=True)
    assert r.status_code == 502
    assert "activate_this.py" in r.json()["error"]


@pytest.mark.parametrize("code,problem", [("not base64 at all!", "base64"),
                                          (base64.b64encode(b"plain text").decode(), "zip")])
def test_binary_code_that_is_not_a_zip_is_400(blank, code, problem):
    r = blank.init(code, binary=True)
    assert r.status_code == 400
    assert problem in r.json()["error"]
