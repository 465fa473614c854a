"""Torpor's node data plane: action runtime, redirection client, GPU server and invoker."""
