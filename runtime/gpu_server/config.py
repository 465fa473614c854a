"""Settings of the GPU server process (flags and env vars: runtime/settings.py)."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.settings import setting


@dataclass
class GPUServerSettings:
    """Everything ``torpor gpu-server`` can be told."""

    socket: str = setting(".state/gpu.sock", "TORPOR_GPU_SOCKET", "Unix socket path to serve on")
    socket_mode: str = setting("660", "TORPOR_GPU_SOCKET_MODE", "octal file mode of the socket (owner and group only)")
    socket_group: str = setting("", "TORPOR_GPU_SOCKET_GROUP",
                                "group owning the socket, name or id: the group of the invoker and of action "
                                "containers (empty: the server's own group)")
    node_secret: str = setting("", "TORPOR_NODE_SECRET",
                               "secret shared with this node's invoker: checks function tokens and admin ops "
                               "(empty: the server refuses to start unless --insecure-no-auth)")
    insecure_no_auth: bool = setting(False, "TORPOR_GPU_INSECURE_NO_AUTH",
                                     "serve without a node secret: every process that can open the socket may use "
                                     "every model and admin op (tests, development, and platforms whose function "
                                     "containers get no token: Knative, OpenWhisk); ignored when a secret is set")
    model_repo: str = setting(".state/models", "TORPOR_MODEL_REPO", "model repository directory")
    redis_url: str = setting("", "TORPOR_REDIS_URL", "Redis for device state (empty: do not publish)")
    node_id: str = setting("node0", "TORPOR_NODE_ID", "this node's id in Redis")
    cpu_devices: int = setting(0, "TORPOR_CPU_DEVICES", "serve on N CPU devices instead of the GPUs (0: GPUs if any, else 1 CPU device)")
    device_memory: int = setting(1 << 30, "TORPOR_DEVICE_MEMORY", "weight arena of each CPU device", "bytes")
    arena_bytes: int = setting(0, "TORPOR_ARENA_BYTES", "weight arena of each GPU (0: 60% of its free memory)", "bytes")
    policy: str = setting("torpor", "TORPOR_POLICY", "scheduling policy: torpor, lru, random, fifo (docs/scheduling.md)")
    cudnn_tf32: bool = setting(False, "TORPOR_CUDNN_TF32", "let cuDNN convolutions use TF32 (PyTorch's default; ~1e-3 relative error)")
    cuda_graphs: bool = setting(True, "TORPOR_CUDA_GRAPHS", "replay CUDA graphs of resident models (warm and cold paths)")
    group_bytes: int = setting(2 << 20, "TORPOR_GROUP_BYTES", "copy group size of pipelined swap-ins", "bytes")
    max_input_bytes: int = setting(256 << 20, "TORPOR_MAX_INPUT_BYTES", "largest total input of one call", "bytes")
    max_program_bytes: int = setting(256 << 20, "TORPOR_MAX_PROGRAM_BYTES",
                                     "largest torch.export program a function may register (register_program)", "bytes")
    room_timeout_s: float = setting(30.0, "TORPOR_ROOM_TIMEOUT_S", "longest wait for device room held by models in use", "s")
    frame_timeout_s: float = setting(30.0, "TORPOR_GPU_FRAME_TIMEOUT_S",
                                     "longest wait for the rest of a request once its first bytes came; then the "
                                     "connection is closed", "s")
    max_loads: int = setting(2, "TORPOR_MAX_LOADS", "models loading into the host store at once at most "
                             "(a load is CPU-bound: reading and packing the weights; without a stored layout also "
                             "building and tracing the model)")
    publish_interval_s: float = setting(0.5, "TORPOR_PUBLISH_INTERVAL_S", "period of device-state updates in Redis", "s")
    gil_switch_interval_ms: float = setting(
        0.25, "TORPOR_GIL_SWITCH_INTERVAL_MS",
        "Python's thread switch interval (sys.setswitchinterval; Python's default 5 ms; 0: keep it; else 0.001 to "
        "1000): an eager run releases the GIL at every kernel launch, and a thread busy in Python (a model load, a "
        "capture) keeps it for about this long before it is asked to let go, at every launch (bench/gil.py)", "ms")
    torch_threads: int = setting(0, "TORPOR_TORCH_THREADS", "intra-op CPU threads of torch (0: 1 when serving GPUs, torch's default on CPU devices)")
    mmap_threshold: int = setting(128 << 10, "TORPOR_MMAP_THRESHOLD",
                                  "host allocations this large or larger get their own mapping, returned to the "
                                  "system when freed: keeps the resident set flat while connection threads come "
                                  "and go (0: glibc's adaptive threshold, up to 32 MiB)", "bytes")
    metrics_host: str = setting("127.0.0.1", "TORPOR_GPU_METRICS_HOST", "address of the /metrics, /healthz, /readyz server")
    metrics_port: int = setting(0, "TORPOR_GPU_METRICS_PORT", "port of the /metrics, /healthz, /readyz server (0: none)")
    probe_timeout_s: float = setting(2.0, "TORPOR_GPU_PROBE_TIMEOUT_S",
                                     "longest /readyz waits for a device's probe kernel or the model repository", "s")
