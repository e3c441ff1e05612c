"""Secrets and signatures of webhook deliveries (https://www.standardwebhooks.com).

A secret is ``whsec_`` + base64 of 32 random bytes; the HMAC-SHA256 key is those bytes. A delivery
carries ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature:
v1,<base64 HMAC of "{id}.{timestamp}.{body}">``.

The server has to sign, so it keeps the secret itself (unlike API keys, stored as hashes): the
database holds it encrypted with AES-256-GCM under the webhook key (``LETHE_WEBHOOK_SECRET_KEY``, or
``$LETHE_HOME/webhook-secret.key``), with the webhook's id as associated data, so a database dump or
backup alone does not reveal the secrets and a ciphertext copied to another row does not decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service import digests
from service.settings import Settings

SECRET_PREFIX = "whsec_"
KEY_FILE = "webhook-secret.key"
_NONCE_BYTES = 12
_CIPHER_VERSION = "v1:"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value for one delivery."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


class SecretBox:
    """Encrypts webhook secrets for the database (AES-256-GCM; the key is SHA-256 of the setting)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(hashlib.sha256(key).digest())

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        if settings.webhook_secret_key is not None:
            return cls(settings.webhook_secret_key.get_secret_value().encode("utf-8"))
        return cls(digests.load_file_key(settings.resolved_home / KEY_FILE))

    def seal(self, secret: str, *, webhook_id: str) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode("utf-8"), webhook_id.encode("utf-8"))
        return _CIPHER_VERSION + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, ciphertext: str, *, webhook_id: str) -> str:
        """The secret; ``cryptography.exceptions.InvalidTag`` under another key or row."""
        raw = base64.b64decode(ciphertext.removeprefix(_CIPHER_VERSION))
        nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        return self._aead.decrypt(nonce, sealed, webhook_id.encode("utf-8")).decode("utf-8")
