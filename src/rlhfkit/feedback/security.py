"""Passwords, tokens and CSRF: small functions around argon2, secrets and HMAC.

- Passwords: argon2id (slow on purpose, so a stolen database does not give the passwords away),
  with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): ~60 ms here, so logins stay quick.
  New passwords must pass `password_problem` (length, not the username, not a common one).
- Logins: `LoginThrottle` slows down password guessing (per username and per client address,
  exponential backoff), and `HashingGate` bounds how many argon2 checks run at once, so a flood
  of logins can neither use up the CPU and memory the labelers need nor be answered faster for
  unknown usernames (those are checked against a dummy hash, which takes as long).
- Session tokens and API keys: 256-bit random strings; the database keeps only their SHA-256,
  which is enough for a random key (no brute force is possible) and cheap on every request.
- CSRF: the token is HMAC(secret, session token). It is bound to one login session, so a token
  copied from another session, or replayed after logout, is refused; and nothing is stored.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.concurrency import run_in_threadpool

from rlhfkit.config import atomic_write_text

T = TypeVar("T")
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


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether `password` matches. With no hash (an unknown user, an API-only user) a dummy hash
    is checked instead and False returned, so the answer takes as long and reveals nothing."""
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
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


# ---------------------------------------------------------------- login throttling


@dataclass
class _Failures:
    count: int
    last: float  # time.monotonic() of the latest failure


class LoginThrottle:
    """Failed logins per username and per client address, with exponential backoff.

    After `max_failures` failures for one username (or `max_address_failures` from one address),
    each further attempt must wait `backoff` seconds after the latest failure, doubling with every
    further failure up to `max_backoff`. While waiting, even the right password is refused: the
    answer must not depend on the password, or the lock would tell a guesser when they are right.
    A success clears the username's count (not the address's: one valid account must not let
    an address guess others); counts are forgotten after 4 x `max_backoff` without failures.

    In memory, for one process: a restart forgets the counts, and with several server processes
    each keeps its own (so a guesser gets that many times the attempts). At most `max_entries`
    usernames and addresses are tracked; the least recently failed are dropped beyond that.
    """

    def __init__(
        self,
        max_failures: int,
        max_address_failures: int,
        backoff: float,
        max_backoff: float,
        max_entries: int = 100_000,
    ):
        self.max_failures, self.max_address_failures = max_failures, max_address_failures
        self.backoff, self.max_backoff, self.max_entries = backoff, max_backoff, max_entries
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def _keys(self, username: str, address: str) -> tuple[tuple[str, int], ...]:
        return (f"user:{username}", self.max_failures), (f"addr:{address}", self.max_address_failures)

    def _current(self, key: str, now: float) -> _Failures | None:
        entry = self._failures.get(key)
        if entry is not None and now - entry.last > 4 * self.max_backoff:
            del self._failures[key]
            return None
        return entry

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until this username may try again from this address (0: now)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key, limit in self._keys(username, address):
                entry = self._current(key, now)
                if entry is not None and entry.count >= limit:
                    delay = min(self.backoff * 2 ** min(entry.count - limit, 60), self.max_backoff)
                    wait = max(wait, entry.last + delay - now)
        return wait

    def failed(self, username: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key, _ in self._keys(username, address):
                entry = self._current(key, now) or _Failures(0, now)
                entry.count, entry.last = entry.count + 1, now
                self._failures[key] = entry
                self._failures.move_to_end(key)
            while len(self._failures) > self.max_entries:
                self._failures.popitem(last=False)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(f"user:{username}", None)


class HashingBusy(Exception):
    """Every password-hashing slot stayed taken for the whole wait."""


class HashingGate:
    """At most `slots` password checks at once; others wait up to `wait` seconds, then HashingBusy.

    Each argon2 check takes ~60 ms of CPU and 19 MiB. Unbounded, 40 parallel logins took the
    labelers' requests from 16 ms to 4 s, and the memory they grew stayed with the process. The
    waiting happens in the event loop (not in a worker thread), so waiting logins hold no thread
    that the labelers' requests need.
    """

    def __init__(self, slots: int, wait: float):
        self._limiter = anyio.CapacityLimiter(slots)
        self.wait = wait

    async def run(self, fn: Callable[[], T]) -> T:
        acquired = False
        with anyio.move_on_after(self.wait):
            await self._limiter.acquire()
            acquired = True
        if not acquired:
            raise HashingBusy()
        try:
            return await run_in_threadpool(fn)
        finally:
            self._limiter.release()


def retry_after_header(seconds: float) -> dict[str, str]:
    """The Retry-After header (whole seconds, at least 1) for a wait of `seconds`."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
