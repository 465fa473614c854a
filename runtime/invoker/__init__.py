"""The invoker: the node agent that takes activations off the node's Redis queue and runs them
in warm action-runtime processes (``torpor invoker``; see docs/invoker.md)."""
