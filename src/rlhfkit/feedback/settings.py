"""`rlhfkit serve` settings and where the site's data lives by default.

Kept apart from app.py (which imports FastAPI) so that `rlhfkit serve --help` and the admin
commands can read the settings without loading the web framework.

The database and the secret default to one fixed folder, $RLHFKIT_HOME, else
$XDG_DATA_HOME/rlhfkit, else ~/.local/share/rlhfkit. A default relative to the current folder
meant that running a command from another folder silently started a new, empty site.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from rlhfkit.config import StrictModel

HOME_ENV = "RLHFKIT_HOME"
DB_FILE, SECRET_FILE = "feedback.db", "feedback.secret"


def data_dir() -> Path:
    """The folder for the default SQLite database and secret (an absolute path, for clear messages)."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share").absolute() / "rlhfkit"


def default_db_path() -> Path:
    return data_dir() / DB_FILE


def default_db_url() -> str:
    return f"sqlite:///{default_db_path()}"


def display_url(url: str) -> str:
    """The URL with its password replaced by ***: what may be printed or logged."""
    from sqlalchemy.engine import make_url  # not at the top: --help needs no SQLAlchemy
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"


class ServeConfig(StrictModel):
    """`rlhfkit serve` settings; each is also a KEY=VALUE flag (e.g. port=8080)."""

    db_url: str = Field(
        default_factory=default_db_url,
        description=f"SQLite file or postgresql://user@host/db (default: in ${HOME_ENV})",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535)
    secret_key_file: str = Field(
        default_factory=lambda: str(data_dir() / SECRET_FILE),
        description="made on first start; $RLHFKIT_SECRET_KEY overrides it",
    )
    lease_minutes: int = Field(60, ge=1, description="how long a handed-out item is held for its labeler")
    session_days: int = Field(14, ge=1, description="browser login lifetime, however active")
    session_idle_hours: float = Field(12, gt=0, description="a browser login ends after this long without requests")
    secure_cookies: Literal["auto"] | bool = Field(
        "auto", description="auto: Secure cookies when the request came over HTTPS; true/false forces"
    )
    trusted_proxies: str = Field(
        "", description="reverse proxies (IPs or networks, comma-separated) whose X-Forwarded-For/-Proto count"
    )
    login_max_failures: int = Field(5, ge=1, description="failed logins per username before backoff")
    login_max_failures_per_ip: int = Field(30, ge=1, description="failed logins per client address before backoff")
    login_backoff_seconds: float = Field(1.0, gt=0, description="first wait after too many failures; doubles")
    login_backoff_max_seconds: float = Field(900, gt=0, description="longest wait between login attempts")
    password_hash_concurrency: int = Field(2, ge=1, description="password checks at once (argon2: CPU, 19 MiB)")
    password_hash_wait_seconds: float = Field(3.0, gt=0, description="longest a login waits for a check, then 503")
    max_body_kb: int = Field(512, ge=16, description="largest request body, except imports")
    max_upload_mb: int = Field(50, ge=1, description="largest JSONL import")
    log_level: str = Field("warning", description="uvicorn log level")
    chat_model: str = Field(
        "", description="policy folder the chat page (/chat) talks to, loaded on first use; empty: no chat"
    )
    chat_personal: bool = Field(
        False,
        description="the chat model answers each signed-in user as that user (a `User: NAME` line, as "
        "a personalised policy was trained: rlhfkit rm personalize=true, prompts with a user)",
    )
    chat_max_new_tokens: int = Field(128, ge=1, le=4096, description="longest chat answer, in tokens")
    chat_temperature: float = Field(0.8, gt=0, description="chat sampling temperature")
    chat_top_p: float = Field(0.95, gt=0, le=1, description="chat nucleus sampling; 1 = off")
    chat_max_prompt_tokens: int = Field(
        1024, ge=16, description="longest conversation the model sees; a longer one keeps its end"
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes (about one per CPU core; login throttling counts per process)",
    )
