"""Settings of the invoker (``torpor invoker``), the node agent that runs activations."""
from __future__ import annotations

import socket
from dataclasses import dataclass

from runtime.settings import setting


@dataclass
class InvokerSettings:
    """Configuration of one node's invoker; every field is also a flag and an env var."""

    redis_url: str = setting("redis://127.0.0.1:6379/0", "TORPOR_REDIS_URL", "Redis holding the cluster state")
    node_id: str = setting(socket.gethostname(), "TORPOR_NODE_ID", "this node's id in Redis (torpor:node:{id})")
    gpu_socket: str = setting(".state/gpu.sock", "TORPOR_GPU_SOCKET",
                              "Unix socket of this node's GPU server (given to action runtimes)")
    api_host: str = setting("http://127.0.0.1:3233", "TORPOR_API_HOST",
                            "controller URL given to actions as __OW_API_HOST")
    pool_size: int = setting(64, "TORPOR_INVOKER_POOL_SIZE", "activations run at once on this node")
    max_containers_per_action: int = setting(4, "TORPOR_INVOKER_MAX_CONTAINERS",
                                             "warm runtime processes kept per action at most")
    max_containers: int = setting(128, "TORPOR_INVOKER_NODE_CONTAINERS",
                                  "runtime processes on this node at most, all actions together (each holds "
                                  "~60-80 MB); the least recently used idle one is stopped to make room")
    idle_timeout_s: float = setting(600.0, "TORPOR_INVOKER_IDLE_TIMEOUT",
                                    "an unused runtime process is stopped after this long", "s")
    container_start_timeout_s: float = setting(30.0, "TORPOR_INVOKER_START_TIMEOUT",
                                               "time a new runtime process has to open its port", "s")
    shutdown_grace_s: float = setting(5.0, "TORPOR_INVOKER_SHUTDOWN_GRACE",
                                      "on stop, time running activations get to finish before re-queueing", "s")
    http_host: str = setting("127.0.0.1", "TORPOR_INVOKER_HOST", "address of the /healthz and /readyz server")
    http_port: int = setting(0, "TORPOR_INVOKER_PORT", "port of the /healthz and /readyz server; 0: no server")
    profiles: str = setting("", "TORPOR_CONTROLLER_PROFILES",
                            "the controller's predictor profiles, for re-dispatching an activation whose GPU "
                            "server went away as the controller would dispatch it")
    gpu_kind: str = setting("", "TORPOR_CONTROLLER_GPU_KIND", "GPU type of those profiles (empty: any type)")
    device_slots: int = setting(0, "TORPOR_DEVICE_SLOTS",
                                "activations booked on one device at once at most, as the controller's (0: no limit)")
    node_secret: str = setting("", "TORPOR_NODE_SECRET",
                               "secret shared with this node's GPU server: signs the token each action gets "
                               "(empty: actions get no token, and the GPU server must run with --insecure-no-auth)")
    max_payload_bytes: int = setting(1048576, "TORPOR_MAX_PAYLOAD_BYTES",
                                     "largest activation parameters, the controller's limit too; given to "
                                     "action runtimes, whose /run refuses more", "bytes")
