"""Passwords, tokens and CSRF: small functions around argon2, secrets and HMAC.

- Passwords: argon2id (slow on purpose, so a stolen database does not give the passwords away),
  with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): ~60 ms here, so logins stay quick.
- Session tokens and API keys: 256-bit random strings; the database keeps only their SHA-256,
  which is enough for a random key (no brute force is possible) and cheap on every request.
- CSRF: the token is HMAC(secret, session token). It is bound to one login session, so a token
  copied from another session, or replayed after logout, is refused; and nothing is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from rlhfkit.config import atomic_write_text

_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
MIN_PASSWORD = 8
SECRET_ENV = "RLHFKIT_SECRET_KEY"


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"password must have at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    if password_hash is None:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """(prefix, key). The prefix (stored in clear) finds the row; the key is shown once."""
    prefix = secrets.token_hex(6)
    return prefix, f"rk_{prefix}_{secrets.token_urlsafe(32)}"


def api_key_prefix(key: str) -> str | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "rk" or len(parts[1]) != 12:
        return None
    return parts[1]


def csrf_token(secret: bytes, session_token: str) -> str:
    return hmac.new(secret, f"csrf:{session_token}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, session_token: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(csrf_token(secret, session_token), str(token))


def load_secret(path: str | Path) -> bytes:
    """The server's secret: $RLHFKIT_SECRET_KEY, else a file made on first start (mode 0600),
    so restarts keep sessions valid and the secret never sits in a config file."""
    env = os.environ.get(SECRET_ENV)
    if env:
        return env.encode()
    path = Path(path)
    if not path.exists():
        atomic_write_text(path, secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip().encode()
