"""Settings of the controller (``torpor controller``), Torpor's OpenWhisk-compatible control plane."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.settings import setting

# The well-known key of OpenWhisk's local development "guest" namespace (ansible/files/auth.guest):
# wsk, the openwhisk npm client and every tutorial ship it, so a local stack works out of the box.
GUEST_AUTH = "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP"


@dataclass
class ControllerSettings:
    """Configuration of the controller; every field is also a flag and an env var."""

    host: str = setting("127.0.0.1", "TORPOR_CONTROLLER_HOST", "address the REST API listens on")
    port: int = setting(3233, "TORPOR_CONTROLLER_PORT", "port the REST API listens on")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "TORPOR_REDIS_URL", "Redis holding the cluster state")
    auth: str = setting(GUEST_AUTH, "TORPOR_AUTH",
                        "accepted credentials: comma-separated UUID:KEY or UUID:KEY=NAMESPACE entries")
    namespace: str = setting("guest", "TORPOR_NAMESPACE", "namespace of credentials given without =NAMESPACE")
    threads: int = setting(32, "TORPOR_CONTROLLER_THREADS",
                           "request threads of the gunicorn gthread worker (each blocking invoke holds one)")
    keepalive_s: int = setting(75, "TORPOR_CONTROLLER_KEEPALIVE_S",
                               "how long an idle client connection stays open; longer than clients keep "
                               "idle connections for reuse, or a request sent as the server closes one is "
                               "lost with it (gunicorn's default, 2 s, lost 1 of 2,546 in a node run)", "s")
    max_payload_bytes: int = setting(1048576, "TORPOR_MAX_PAYLOAD_BYTES",
                                     "largest request body (invoke parameters)", "bytes")
    max_action_bytes: int = setting(48 * 1024 * 1024, "TORPOR_MAX_ACTION_BYTES",
                                    "largest action create/update body (code included)", "bytes")
    concurrent_limit: int = setting(100, "TORPOR_CONCURRENT_LIMIT",
                                    "activations of one namespace in flight at once before 429")
    invocations_per_minute: int = setting(120, "TORPOR_INVOCATIONS_PER_MINUTE",
                                          "invocations of one namespace per clock minute before 429")
    max_blocking_wait_ms: int = setting(60000, "TORPOR_MAX_BLOCKING_WAIT_MS",
                                        "longest a blocking invoke waits before answering 202", "ms")
    blocking_margin_ms: int = setting(5000, "TORPOR_BLOCKING_MARGIN_MS",
                                      "allowance for queueing and start-up, added to the action timeout "
                                      "for the message deadline and the blocking wait", "ms")
    kinds: str = setting("python:3,python:3.10,python:3.11,python:3.12,python:3.13", "TORPOR_ACTION_KINDS",
                         "accepted exec kinds, comma-separated (python:default means python:3; "
                         "an exec with an image is blackbox)")
    requeue_interval_ms: int = setting(1000, "TORPOR_REQUEUE_INTERVAL_MS",
                                       "how often the work of dead nodes is re-queued; 0: never", "ms")
    node_dead_after_ms: int = setting(10000, "TORPOR_NODE_DEAD_AFTER_MS",
                                      "a node without its alive key and unseen this long is dead", "ms")
    max_attempts: int = setting(3, "TORPOR_MAX_ATTEMPTS",
                                "dispatches of one activation before it fails as a whisk internal error")
    profiles: str = setting("", "TORPOR_CONTROLLER_PROFILES",
                            "bench/swap.py result whose models (bytes, served_warm_ms) seed the latency "
                            "predictor of node choice (empty: every model predicted at the default)")
    gpu_kind: str = setting("", "TORPOR_CONTROLLER_GPU_KIND",
                            "GPU type the profiles were measured on (empty: any type)")
    device_slots: int = setting(0, "TORPOR_DEVICE_SLOTS",
                                "activations booked on one device at once at most (0: no limit)")
