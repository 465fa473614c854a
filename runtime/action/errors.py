"""The runtime's error answers: an HTTP status with ``{"error": message}``, and the exact
messages OpenWhisk's runtime conformance suite expects."""
from __future__ import annotations

REINIT = "Cannot initialize the action more than once."
NO_CODE = "Missing main/no code to execute."
NOT_INITIALIZED = "The action has not been initialized."
BAD_ARGUMENT = "The action did not receive a dictionary or array as an argument."
BAD_RESULT = "The action did not return a dictionary or array."


class ActionError(Exception):
    """A request the runtime answers with HTTP ``status`` and the body ``{"error": message}``.

    Args:
        status: HTTP status code (400 malformed request, 403 refused init, 404 bad argument,
            413 over a size limit, 502 the action's code failed).
        message: the text of the ``error`` field.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
