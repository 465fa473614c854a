"""The per-node GPU server: host model store, per-device weight arenas, pipelined swap-in,
executors, and the Unix-socket protocol that action runtimes use (docs/gpu-server-protocol.md)."""
