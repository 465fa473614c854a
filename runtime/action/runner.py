"""The action held by one runtime process: initialised once, then run once per activation."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from runtime.action import loader
from runtime.action.errors import (BAD_ARGUMENT, BAD_RESULT, NO_CODE, NOT_INITIALIZED, REINIT,
                                   ActionError)


def environment(values: Any, what: str) -> dict[str, str]:
    """Turns a JSON object into environment variables: strings kept, other values as JSON text.

    Args:
        values: the object (None means no variables).
        what: how the error names the object, e.g. ``"init env"``.

    Raises:
        ActionError: 400 when ``values`` is not an object, or a name or value cannot be an
            environment variable (empty name, ``=`` in a name, NUL byte, lone surrogate).
    """
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ActionError(400, f"{what} must be a JSON object")
    env = {}
    for name, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if not _settable(name, text):
            raise ActionError(400, f"{what} entry {name!r} cannot be an environment variable")
        env[name] = text
    return env


def _settable(name: str, text: str) -> bool:
    if not name or "=" in name or "\x00" in name or "\x00" in text:
        return False
    try:
        os.fsencode(name)
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class ActionRunner:
    """One action: its entry point after a successful init, and the per-run ``__OW_*`` env.

    Args:
        action_dir: folder under which each init unpacks its code ("" = the system temp dir).
    """

    def __init__(self, action_dir: str = ""):
        self._action_dir = action_dir or None
        self._main: Callable[[Any], Any] | None = None
        self._init_digest: str | None = None
        self._init_failure: str | None = None
        self._saved_env: dict[str, str | None] = {}

    @property
    def initialized(self) -> bool:
        """True once an init succeeded."""
        return self._main is not None

    def initialized_with(self, value: Any) -> bool:
        """True when the action was initialised from exactly this init ``value``."""
        return self._init_digest is not None and self._init_digest == _digest(value)

    def init(self, value: Any) -> None:
        """Initialises the action from an OpenWhisk init ``value``.

        ``value`` is ``{"code": str, "main"?: str, "binary"?: bool, "env"?: {str: str},
        "name"?: str}``. ``env`` is put into the process environment before the code is
        imported.

        Raises:
            ActionError: 403 when already initialised or when there is no code; 400 for a
                malformed value; 502 when the code fails to load (see ``loader``).
        """
        if self.initialized:
            raise ActionError(403, REINIT)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ActionError(400, 'the init "value" must be a JSON object')
        code = value.get("code")
        if code is None or code == "":
            raise ActionError(403, NO_CODE)
        if not isinstance(code, str):
            raise ActionError(400, 'the init "code" must be a string')
        main = value.get("main") or "main"
        if not isinstance(main, str):
            raise ActionError(400, 'the init "main" must be a string')
        binary = value.get("binary", False)
        if binary is None:
            binary = False
        if not isinstance(binary, bool):
            raise ActionError(400, 'the init "binary" must be true or false')
        os.environ.update(environment(value.get("env"), "init env"))
        folder = Path(tempfile.mkdtemp(prefix="action-", dir=self._action_dir))
        if binary:
            loader.unpack_zip(code, folder)
        else:
            loader.write_source(code, folder)
        self._main = loader.load_main(folder, main)
        self._init_digest = _digest(value)

    def init_failed(self, message: str) -> None:
        """Records why an init at start-up failed, so that every run reports it (502)."""
        self._init_failure = message

    def _swap_env(self, env: dict[str, str]) -> None:
        # The previous activation's variables go away (or get their container value back)
        # so that a run never sees another activation's api_key or deadline.
        for name, old in self._saved_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self._saved_env = {name: os.environ.get(name) for name in env}
        os.environ.update(env)

    def run(self, value: Any, activation: dict) -> str:
        """Runs the action's entry point on ``value`` and returns its result as JSON text.

        Every key of ``activation`` (``namespace``, ``action_name``, ``activation_id``,
        ``deadline`` in epoch ms as string or number...) is set as ``__OW_<KEY>`` for the run.

        Raises:
            ActionError: 502 before a successful init, when the code raises (message of the
                exception; traceback on stderr), or when the result is not a JSON object or
                array; 404 when ``value`` is not an object or array; 400 when an activation
                field cannot be an environment variable.
        """
        if not self.initialized:
            raise ActionError(502, self._init_failure or NOT_INITIALIZED)
        if not isinstance(value, (dict, list)):
            raise ActionError(404, BAD_ARGUMENT)
        env = environment({f"__OW_{key.upper()}": v for key, v in activation.items()}, "activation")
        self._swap_env(env)
        try:
            result = self._main(value)
        except (Exception, SystemExit) as exc:
            traceback.print_exc()
            raise ActionError(502, str(exc) or type(exc).__name__) from None
        if not isinstance(result, (dict, list)):
            raise ActionError(502, BAD_RESULT)
        try:
            return json.dumps(result, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ActionError(502, f"The action returned a result that is not JSON: {exc}") from None
