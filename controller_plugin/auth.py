"""HTTP Basic authentication with OpenWhisk ``UUID:KEY`` credentials, each bound to one namespace.

Keys are compared in constant time, and no function here puts a key into an exception
message, so credentials cannot leak into logs or error answers.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass

# OpenWhisk's EntityName rule: a word character, then up to 255 of [\w@ .&-], no trailing space.
ENTITY_NAME = re.compile(r"\A(?:\w|\w[\w@ .&-]{0,254}[\w@.&-])\Z", re.ASCII)  # OpenWhisk: ASCII word characters


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: its ``uuid`` (the subject) and the one ``namespace`` it owns."""

    uuid: str
    namespace: str


@dataclass(frozen=True)
class _Credential:
    uuid: bytes
    key: bytes
    namespace: str


class CredentialError(ValueError):
    """The credential setting is malformed; the message names the entry by position only."""


class Authenticator:
    """Checks ``Authorization: Basic`` headers against a fixed set of credentials.

    Args:
        spec: comma-separated entries ``UUID:KEY`` or ``UUID:KEY=NAMESPACE`` (keys may not
            contain ``=``).
        default_namespace: namespace of entries given without ``=NAMESPACE``.

    Raises:
        CredentialError: an entry lacks ``:``, has an empty part, or names an invalid namespace.
    """

    def __init__(self, spec: str, default_namespace: str):
        self._credentials: list[_Credential] = []
        for position, entry in enumerate((e.strip() for e in spec.split(",")), start=1):
            if not entry:
                continue
            pair, sep, namespace = entry.rpartition("=")
            if not sep:
                pair, namespace = entry, default_namespace
            uuid, colon, key = pair.partition(":")
            if not colon or not uuid or not key:
                raise CredentialError(f"credential entry {position} is not UUID:KEY[=NAMESPACE]")
            if not ENTITY_NAME.match(namespace):
                raise CredentialError(f"credential entry {position} names an invalid namespace {namespace!r}")
            self._credentials.append(_Credential(uuid.encode(), key.encode(), namespace))
        if not self._credentials:
            raise CredentialError("no credentials configured")

    def authenticate(self, header: str | None) -> Identity | None:
        """The identity whose credentials the ``Authorization`` header carries, or None.

        Every configured credential is compared (in constant time) whatever the outcome, so
        the time taken does not reveal which part of a guess was right.
        """
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        uuid, colon, key = decoded.partition(b":")
        if not colon:
            return None
        found: _Credential | None = None
        for credential in self._credentials:
            same_uuid = hmac.compare_digest(uuid, credential.uuid)
            same_key = hmac.compare_digest(key, credential.key)
            if same_uuid and same_key and found is None:
                found = credential
        if found is None:
            return None
        return Identity(uuid=found.uuid.decode(), namespace=found.namespace)
