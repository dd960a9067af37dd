"""Fixtures for the feedback tests: a real database, SQLite file or a fresh PostgreSQL database
(created and dropped per test; unreachable PostgreSQL fails the run when CI=true)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from rlhfkit.feedback.db import Database
from rlhfkit.feedback.settings import ServeConfig

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required on CI but unreachable at 127.0.0.1:5432: {e}")
        pytest.skip(f"PostgreSQL unreachable at 127.0.0.1:5432: {e}")


def _url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that falls back to the default database ($RLHFKIT_HOME) never touches the real one."""
    monkeypatch.setenv("RLHFKIT_HOME", str(tmp_path / "rlhfkit-home"))


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated database to copy: CREATE DATABASE ... TEMPLATE is faster than migrating anew."""
    admin = _admin()
    name = f"rlhfkit_tmpl_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        template = Database(_url(name))
        template.migrate()
        template.dispose()
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database per test: a SQLite file, or a uniquely named PostgreSQL database that is
    dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/feedback.db"
        return
    template = request.getfixturevalue("pg_template")
    admin = _admin()
    name = f"rlhfkit_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _url(name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def config(db_url: str, tmp_path: Path) -> ServeConfig:
    return ServeConfig(db_url=db_url, secret_key_file=str(tmp_path / "secret"))
