"""Symmetric encryption for the few secrets the server must read back (signing secrets,
DKIM private keys), keyed by the server's secret key."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet


class SecretBox:
    def __init__(self, secret_key: str) -> None:
        self._secret = secret_key.encode()
        digest = hashlib.sha256(b"sendkit-secretbox:" + self._secret).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        return self._fernet.decrypt(token.encode()).decode()

    def mac(self, purpose: str, *parts: str) -> str:
        """A keyed token for links (activation, unsubscribe): URL-safe, unforgeable."""
        msg = "\x1f".join((purpose, *parts)).encode()
        raw = hmac.new(self._secret, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
