"""`rlhfkit serve` settings.

Kept apart from app.py (which imports FastAPI) so that `rlhfkit serve --help` and the admin
commands can read the settings without loading the web framework.
"""

from __future__ import annotations

from pydantic import Field

from rlhfkit.config import StrictModel


class ServeConfig(StrictModel):
    """`rlhfkit serve` settings; each is also a KEY=VALUE flag (e.g. port=8080)."""

    db_url: str = Field("sqlite:///feedback.db", description="SQLite file or postgresql://user@host/db")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535)
    secret_key_file: str = Field("feedback.secret", description="made on first start; $RLHFKIT_SECRET_KEY overrides it")
    lease_minutes: int = Field(60, ge=1, description="how long a handed-out item is held for its labeler")
    session_days: int = Field(14, ge=1, description="browser login lifetime")
    secure_cookies: bool = Field(False, description="set true when served over HTTPS")
    max_body_kb: int = Field(512, ge=16, description="largest request body, except imports")
    max_upload_mb: int = Field(50, ge=1, description="largest JSONL import")
    log_level: str = Field("warning", description="uvicorn log level")
