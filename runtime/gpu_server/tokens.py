"""Capability tokens of the GPU server's callers, signed with the node secret.

The invoker and the GPU server of a node share one secret (``TORPOR_NODE_SECRET``). The
invoker gives every action container a *function token* naming the action and the models of
its ``model`` annotation; the GPU server lets a function token infer and prefetch those
models only. The node's own agents (invoker, ``torpor model register --gpu-socket``) use the
*admin token*, which allows every op. Nothing is stored on the server: a token carries its
claims and their signature, so tokens stay valid across GPU-server restarts
(``docs/faults.md``, case 11).

A token is ``base64url(claims JSON) "." base64url(HMAC-SHA256(secret, first part))``.
This module needs neither torch nor numpy: the invoker imports it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re

ADMIN_CLAIMS = {"admin": True}
MAX_SCOPE_CHARS = 150  # as runtime.remote.action_scope


class TokenError(Exception):
    """A token is malformed or its signature does not match the node secret."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, body: str) -> str:
    return _b64(hmac.new(secret.encode(), body.encode("ascii"), hashlib.sha256).digest())


def issue(secret: str, claims: dict) -> str:
    """A token carrying ``claims`` (a JSON object), signed with ``secret``.

    Raises:
        ValueError: ``secret`` is empty.
    """
    if not secret:
        raise ValueError("a token needs a non-empty node secret")
    body = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    return f"{body}.{_sign(secret, body)}"


def function_token(secret: str, namespace: str, action: str, models: list[str]) -> str:
    """The token of action ``namespace/action``: infer and prefetch of ``models`` only."""
    return issue(secret, {"ns": namespace, "action": action, "models": sorted(set(models))})


def admin_token(secret: str) -> str:
    """The token of the node's own agents: every op."""
    return issue(secret, ADMIN_CLAIMS)


def program_prefix(namespace: str, action: str) -> str:
    """The start of the names of programs that action ``namespace/action`` registers itself
    (``runtime.remote``: ``{namespace}.{action}.{label}-{digest}``); its token may use them."""
    scope = ".".join(re.sub(r"[^A-Za-z0-9_-]", "_", p) for p in (namespace, action) if p)
    return scope[:MAX_SCOPE_CHARS] + "."


def allows(claims: dict, model: str) -> bool:
    """Whether a token with ``claims`` (from :func:`verify`) may use ``model``."""
    if claims.get("admin"):
        return True
    return model in claims["models"] or model.startswith(program_prefix(claims["ns"], claims["action"]))


def verify(secret: str, token: str) -> dict:
    """The claims of ``token`` when ``secret`` signed it.

    The signature is compared in constant time; error messages never contain the token.

    Raises:
        TokenError: not two base64url parts, a wrong signature, or claims that are not a
            JSON object holding either ``admin: true`` or ``ns``, ``action`` and ``models``.
    """
    body, dot, signature = token.partition(".")
    if not token.isascii() or not dot or not body or not signature:
        raise TokenError("the token is not of the form CLAIMS.SIGNATURE")
    if not hmac.compare_digest(signature.encode("ascii"), _sign(secret, body).encode("ascii")):
        raise TokenError("the token's signature does not match this node's secret")
    try:
        claims = json.loads(_unb64(body))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise TokenError("the token's claims are not base64url JSON") from None
    if claims == ADMIN_CLAIMS:
        return claims
    if not (isinstance(claims, dict) and isinstance(claims.get("ns"), str) and isinstance(claims.get("action"), str)
            and isinstance(claims.get("models"), list) and all(isinstance(m, str) for m in claims["models"])):
        raise TokenError("the token's claims name no action and models")
    return claims
