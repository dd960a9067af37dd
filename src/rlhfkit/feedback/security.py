"""Passwords, tokens and CSRF: small functions around argon2, secrets and HMAC.

- Passwords: argon2id (slow on purpose, so a stolen database does not give the passwords away),
  with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): ~60 ms here, so logins stay quick.
  New passwords must pass `password_problem` (length, not the username, not a common one).
- Session tokens and API keys: 256-bit random strings; the database keeps only their SHA-256,
  which is enough for a random key (no brute force is possible) and cheap on every request.
- CSRF: the token is HMAC(secret, session token). It is bound to one login session, so a token
  copied from another session, or replayed after logout, is refused; and nothing is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from rlhfkit.config import atomic_write_text

_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
MIN_PASSWORD = 10
SECRET_ENV = "RLHFKIT_SECRET_KEY"

# Passwords (lowercased) that guessing tools try first and that pass the length rule, and the words
# that, with digits or symbols around them, make up most of the rest ("Password123!", "qwerty2024").
_COMMON_PASSWORDS = """1234567890 0123456789 0987654321 9876543210 12345678910 123456789a a123456789 1234567890a
    1q2w3e4r5t 1q2w3e4r5t6y 1qaz2wsx3edc zaq12wsxcde3 qwertyuiop qwertyuiop123 asdfghjkl1
    zxcvbnm123 qwerty123456 qwe123qwe123 abcdefghij abcd123456 abc1234567 1111111111 0000000000
    iloveyou123 iloveyou12 princess123 football123 baseball123 sunshine123 superman123 starwars123
    trustno1trustno1 passwordpassword letmeinnow welcome123 welcome1234 changeme123 administrator
    adminadmin admin12345 qwertyqwerty michael123 jennifer123 charlie123 whatever123 computer123
    internet123 monkey1234 dragon1234 shadow1234 master1234 chocolate1 butterfly1 basketball
    basketball1 footballfootball pokemon123 minecraft1 minecraft123 liverpool1 chelsea123"""
_COMMON_WORDS = """password passwort passw0rd p@ssword p@ssw0rd qwerty qwertz azerty letmein welcome admin
    administrator changeme iloveyou trustno monkey dragon football baseball princess sunshine
    master shadow superman starwars whatever secret login abc qwertyuiop asdf zxcvbnm"""
COMMON_PASSWORDS, COMMON_WORDS = frozenset(_COMMON_PASSWORDS.split()), frozenset(_COMMON_WORDS.split())


def password_problem(password: str, username: str) -> str | None:
    """Why `password` is too weak for `username`, or None.

    Argon2 only slows down guessing; a password on every guessing list falls anyway. So: at least
    MIN_PASSWORD characters, not the username (nor containing it), not one of the most common
    passwords, not a common word with digits or symbols around it, not one character repeated.
    """
    advice = "choose a longer passphrase, e.g. three or four random words"
    lowered, name = password.lower(), username.lower()
    if len(password) < MIN_PASSWORD:
        return f"must have at least {MIN_PASSWORD} characters; {advice}"
    if name and (name in lowered or lowered in name):
        return f"must not contain the username; {advice}"
    core = re.sub(r"^[\W\d_]+|[\W\d_]+$", "", lowered)
    if lowered in COMMON_PASSWORDS or core in COMMON_WORDS or len(set(lowered)) < 4:
        return f"is one of the most commonly used passwords; {advice}"
    return None


def hash_password(password: str) -> str:
    """The argon2 hash. Callers check `password_problem` first: only they know the username."""
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
