"""Encryption of credentials at rest (mailbox passwords, profile secrets, OAuth client secrets).

Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) with the key from ``CONDUIT_SECRET_KEY``.
In development with no key set, a key is generated once and kept in the state folder (mode 0600);
production refuses to start without one (see ``Settings``).  Plain secrets only ever live in memory
as ``SecretStr`` and are never logged.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from shared.errors import InvalidInput
from shared.settings import Settings


class CredentialCipher:
    """Encrypts and decrypts credential secrets; several comma-separated keys allow rotation: the
    first encrypts, any decrypts, and ``rotate`` moves a secret to the first (`conduit secrets rotate`)."""

    def __init__(self, keys: str) -> None:
        try:
            fernets = [Fernet(k.strip().encode()) for k in keys.split(",") if k.strip()]
            self._fernet = MultiFernet(fernets)
        except (ValueError, TypeError) as exc:
            raise InvalidInput("CONDUIT_SECRET_KEY is not a valid Fernet key (32 url-safe base64 bytes)") from exc
        self._first = fernets[0]

    def encrypt(self, secret: SecretStr | str) -> bytes:
        plain = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        return self._fernet.encrypt(plain.encode())

    def decrypt(self, token: bytes) -> SecretStr:
        try:
            return SecretStr(self._fernet.decrypt(bytes(token)).decode())
        except InvalidToken as exc:
            raise InvalidInput("stored credentials cannot be decrypted with the current CONDUIT_SECRET_KEY") from exc

    def rotate(self, token: bytes) -> bytes:
        """``token``'s secret encrypted anew with the first key (its time stamp kept); InvalidInput
        when no key decrypts it.  The secret itself is never returned."""
        try:
            return self._fernet.rotate(bytes(token))
        except InvalidToken as exc:
            raise InvalidInput("stored credentials cannot be decrypted with the current CONDUIT_SECRET_KEY") from exc

    def is_current(self, token: bytes) -> bool:
        """Whether ``token`` is encrypted with the first key already (the others could then go)."""
        try:
            self._first.decrypt(bytes(token))
        except InvalidToken:
            return False
        return True


def load_cipher(settings: Settings) -> CredentialCipher:
    """The cipher for this process: the configured key, or the development key in the state folder."""
    if settings.secret_key is not None:
        return CredentialCipher(settings.secret_key.get_secret_value())
    return CredentialCipher(_development_key(settings.state_dir))


def _development_key(state_dir: Path) -> str:
    path = state_dir / "secret.key"
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key().decode()
    # O_EXCL: two processes starting at once must agree on one key, not overwrite each other's.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key
