"""Settings of the action runtime process (``torpor runtime``)."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.settings import setting

# Room for the activation envelope (namespace, ids, deadline, api_key...) and JSON escaping
# around the parameters: an HTTP body may be this much larger than the payload limit.
ENVELOPE_BYTES = 64 * 1024


@dataclass
class RuntimeSettings:
    """How one action runtime serves the OpenWhisk ``/init`` + ``/run`` or Knative ``/`` contract.

    Raises:
        ValueError: unknown platform, or a port, limit or timeout that is not positive.
    """

    port: int = setting(8080, "PORT", "TCP port to listen on (the Knative PORT variable)", flag="--port")
    host: str = setting("0.0.0.0", "TORPOR_RUNTIME_HOST", "address to listen on")
    platform: str = setting("openwhisk", "__OW_RUNTIME_PLATFORM",
                            "'openwhisk' (/init, /run) or 'knative' (adds the single entry point POST /)")
    max_payload_bytes: int = setting(1024 * 1024, "TORPOR_MAX_PAYLOAD_BYTES",
                                     "largest activation parameters accepted by /run", "bytes")
    max_code_bytes: int = setting(48 * 1024 * 1024, "TORPOR_MAX_CODE_BYTES",
                                  "largest action code (base64 zip included) accepted by /init", "bytes")
    parent_pid: int = setting(0, "TORPOR_RUNTIME_PARENT_PID",
                              "stop (with the whole process group) once this process, the invoker that started "
                              "the runtime, is gone; 0: never")
    worker_timeout: int = setting(600, "TORPOR_RUNTIME_WORKER_TIMEOUT",
                                  "gunicorn kills a worker silent this long; the invoker enforces the "
                                  "action's own timeout, so keep this above the 5 min maximum", "s")
    action_dir: str = setting("", "TORPOR_ACTION_DIR",
                              "folder under which the action's code is unpacked (empty: the system temp dir)")
    action_code: str = setting("", "__OW_ACTION_CODE",
                               "Knative dedicated image: the action's code, initialised at start; /init is then refused")
    action_main: str = setting("main", "__OW_ACTION_MAIN", "Knative dedicated image: the entry point's name")
    action_binary: bool = setting(False, "__OW_ACTION_BINARY",
                                  "Knative dedicated image: the code is a base64 zip")
    action_name: str = setting("", "__OW_ACTION_NAME", "Knative dedicated image: the action's name")

    def __post_init__(self) -> None:
        self.platform = self.platform.strip().lower()
        if self.platform not in ("openwhisk", "knative"):
            raise ValueError(f"platform must be 'openwhisk' or 'knative', not {self.platform!r}")
        for name in ("port", "max_payload_bytes", "max_code_bytes", "worker_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    @property
    def knative(self) -> bool:
        """True when the Knative single entry point ``POST /`` is served."""
        return self.platform == "knative"

    @property
    def run_body_limit(self) -> int:
        """Largest ``/run`` HTTP body accepted, in bytes: the payload limit plus the envelope."""
        return self.max_payload_bytes + ENVELOPE_BYTES

    @property
    def init_body_limit(self) -> int:
        """Largest ``/init`` HTTP body accepted, in bytes: the code limit plus the envelope."""
        return self.max_code_bytes + ENVELOPE_BYTES
