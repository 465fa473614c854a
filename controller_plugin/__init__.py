"""Torpor's control plane: the OpenWhisk-compatible REST API, the action registry and
activation records in Redis, and the choice of the node that runs each activation."""
