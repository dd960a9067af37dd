"""`rlhfkit serve`: the human-feedback web app, and the admin commands around it.

    rlhfkit serve [KEY=VALUE ...]             run the server (e.g. port=8080 db_url=postgresql://...)
    rlhfkit serve init                        create or upgrade the database
    rlhfkit serve create-owner USERNAME       the first user; password from $RLHFKIT_PASSWORD or asked
    rlhfkit serve add-user USERNAME [project=NAME] [role=labeler|admin] [no_password=true]
    rlhfkit serve add-users FILE.csv [passwords_out=FILE]   many at once: username,role,project[,password]
    rlhfkit serve add-member USERNAME PROJECT [role=labeler|admin]   an existing user joins a project
    rlhfkit serve create-project NAME [task=ranking|pairwise|demonstration] [overlap=N]
                                              [guidelines=FILE.md]
    rlhfkit serve import PROJECT FILE.jsonl [batch=NAME]   completions from `rlhfkit generate` (or prompts); in a
                                              pairwise project K > 2 completions become their C(K,2) pairs
    rlhfkit serve export PROJECT KIND OUT.jsonl [margin=true] [batch=NAME[,NAME...]]
    rlhfkit serve api-key USERNAME [name=NAME]   prints a new API key for scripts

Every command also takes `--config FILE.yaml` and the server's KEY=VALUE settings (db_url=... above
all), so one settings file serves them all. Without db_url the database is feedback.db in
$RLHFKIT_HOME (default ~/.local/share/rlhfkit), whatever folder you run from; each admin command
names it on stderr. Passwords never go on the command line (where `ps` would show them).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field

from rlhfkit.errors import UserError
from rlhfkit.feedback.choices import DEFAULT_ROLE, DEFAULT_TASK, Role, Task
from rlhfkit.feedback.settings import DB_FILE, SECRET_FILE, ServeConfig, default_db_path, display_url

Config = ServeConfig
PASSWORD_ENV = "RLHFKIT_PASSWORD"
EXPORT_KINDS = "judgments, pairs, labeler_pairs, consensus, kto, demonstrations, completions"


class InitConfig(ServeConfig):
    """`rlhfkit serve init`: create or upgrade the database."""


class CreateOwnerConfig(ServeConfig):
    """`rlhfkit serve create-owner USERNAME`: the site owner (the first user). The password comes
    from $RLHFKIT_PASSWORD, else one line of stdin, else it is asked twice at a terminal."""

    username: str = Field(description="the owner's login name")


class AddUserConfig(ServeConfig):
    """`rlhfkit serve add-user USERNAME`: a user, optionally joining a project. The password as
    for create-owner ($RLHFKIT_PASSWORD, stdin or asked), unless no_password=true."""

    username: str = Field(description="the login name")
    project: str | None = Field(None, description="a project to join")
    role: Role = Field(DEFAULT_ROLE, description="the role in that project")
    no_password: bool = Field(False, description="a script user: API keys only, no browser login")


class AddUsersConfig(ServeConfig):
    """`rlhfkit serve add-users FILE.csv`: many users at once, all or nothing. Lines are
    username,role,project[,password]; a user on several lines joins several projects; lines without
    a password get a generated one, shown once."""

    file: str = Field(description="the CSV file")
    passwords_out: str | None = Field(
        None, description="write generated passwords to this new file (mode 0600, never overwritten), not stdout"
    )


class AddMemberConfig(ServeConfig):
    """`rlhfkit serve add-member USERNAME PROJECT`: an existing user joins a project (or changes role)."""

    username: str = Field(description="an existing user")
    project: str = Field(description="the project's name")
    role: Role = Field(DEFAULT_ROLE, description="the role in that project")


class CreateProjectConfig(ServeConfig):
    """`rlhfkit serve create-project NAME`: a project to label in."""

    name: str = Field(description="the project's name")
    task: Task = Field(DEFAULT_TASK, description="what labelers do with each item")
    overlap: int = Field(3, description="N: labelers per item")
    guidelines: str | None = Field(None, description="a Markdown file, shown beside every task")


class ImportConfig(ServeConfig):
    """`rlhfkit serve import PROJECT FILE.jsonl`: completions (or prompts, for a demonstration
    project) into a project; items already there (in the same batch) are skipped."""

    project: str = Field(description="the project's name")
    file: str = Field(description="completions or prompts JSONL")
    batch: str | None = Field(None, description="tag the items with this batch (1-64 of A-Z a-z 0-9 . _ -)")


class ExportConfig(ServeConfig):
    """`rlhfkit serve export PROJECT KIND OUT.jsonl`: a project's data as JSONL."""

    project: str = Field(description="the project's name")
    kind: str = Field(description=EXPORT_KINDS)
    out: str = Field(description="the JSONL file to write")
    margin: bool = Field(False, description="pairs: add the consensus margin")
    batch: str | None = Field(None, description="only these batches' items (comma-separated names)")


class ApiKeyConfig(ServeConfig):
    """`rlhfkit serve api-key USERNAME`: print a new API key for a user's scripts."""

    username: str = Field(description="the user the key acts as")
    name: str = Field("cli", description="a name to tell the key apart on the Account page")


def _password(username: str) -> str:
    """$RLHFKIT_PASSWORD (scripts), else typed twice at a terminal, else one line of stdin."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {username}: ")
        if getpass.getpass("again: ") != first:
            raise UserError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


def _refuse_stray_database(config: ServeConfig) -> None:
    """Older versions kept feedback.db in the folder they ran from. Where such a file sits here
    and the default database does not exist yet, starting a new, empty site in the default
    place would look like the data had vanished: say what to do instead."""
    here = Path(DB_FILE)
    default = default_db_path()
    if "db_url" in config.model_fields_set or not here.is_file() or default.exists():
        return
    raise UserError(
        f"{here.absolute()} exists, but the default database is {default} (see README: where the "
        f"database lives). Use this one with db_url=sqlite:///{DB_FILE}, set $RLHFKIT_HOME to this "
        f"folder, or move {DB_FILE} and {SECRET_FILE} to {default.parent}"
    )


def run(config: ServeConfig) -> None:
    import uvicorn

    _refuse_stray_database(config)
    print(f"rlhfkit feedback on http://{config.host}:{config.port}  (database: {display_url(config.db_url)})")
    # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-* from 127.0.0.1; the app
    # itself honours them, from `trusted_proxies` only.
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "proxy_headers": False,
    }
    if config.workers == 1:
        from rlhfkit.feedback.app import create_app

        uvicorn.run(create_app(config), **options)
        return
    # Several processes, as one Python process serves about one core's worth of requests. The
    # database is migrated and the secret made here, once, before the workers start and race.
    from rlhfkit.feedback import workers
    from rlhfkit.feedback.db import Database
    from rlhfkit.feedback.security import load_secret

    db = Database(config.db_url)
    db.migrate()
    db.dispose()
    load_secret(config.secret_key_file)
    os.environ[workers.CONFIG_ENV] = config.model_dump_json()
    uvicorn.run(
        "rlhfkit.feedback.workers:app",
        factory=True,
        workers=config.workers,
        http="rlhfkit.feedback.workers:NoDelayProtocol",
        **options,
    )


@contextmanager
def _database(config: ServeConfig) -> Iterator[Any]:
    """The migrated database for an admin command; service errors become clean CLI errors.

    Which database it is goes to stderr first (stdout stays clean for scripts, e.g. `api-key`):
    a command run against the wrong database should be obvious at once, not after a day's labels.
    """
    from rlhfkit.feedback.db import Database
    from rlhfkit.feedback.service import ServiceError

    _refuse_stray_database(config)
    db = Database(config.db_url)
    print(f"database: {display_url(db.url)}", file=sys.stderr)
    try:
        db.migrate()
        yield db
    except ServiceError as e:
        raise UserError(e.message) from None
    finally:
        db.dispose()


def _in_db(config: ServeConfig, work: Callable[[Any], Any]) -> Any:
    """Run one admin command in one transaction (`transact`: see db.py for why)."""
    with _database(config) as db:
        return db.transact(work)


def run_init(config: InitConfig) -> None:
    _in_db(config, lambda s: None)
    print(f"database ready: {display_url(config.db_url)}")


def _create_user(
    config: ServeConfig,
    username: str,
    *,
    owner: bool,
    no_password: bool = False,
    project: str | None = None,
    role: Role = DEFAULT_ROLE,
) -> None:
    from rlhfkit.feedback import service
    from rlhfkit.feedback.schemas import MemberIn, UserIn

    _refuse_stray_database(config)  # before asking for a password that would not be used
    password = None if no_password else _password(username)

    def work(s: Any) -> None:
        service.create_user(s, service.checked(UserIn, username=username, password=password, is_owner=owner))
        if project:
            service.set_member(s, service.find_project(s, project), MemberIn(username=username, role=role))

    _in_db(config, work)
    print(f"created {'owner' if owner else 'user'} {username}")


def run_create_owner(config: CreateOwnerConfig) -> None:
    _create_user(config, config.username, owner=True)


def run_add_user(config: AddUserConfig) -> None:
    _create_user(
        config, config.username, owner=False, no_password=config.no_password, project=config.project, role=config.role
    )


def run_add_users(config: AddUsersConfig) -> None:
    """Users from a CSV file in one transaction. Passwords generated for lines without one are
    shown once: on stdout, or in passwords_out, created 0600 and never overwritten (it would
    hold the only copy)."""
    from rlhfkit.feedback import service

    path = Path(config.file)
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets save CSV with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    out = None
    if config.passwords_out:
        try:
            out = os.open(config.passwords_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise UserError(f"passwords_out={config.passwords_out}: {e.strerror} (it is never overwritten)") from None
    try:
        added = _in_db(config, lambda s: service.add_users(s, text, str(path)))
    except BaseException:
        if out is not None:
            os.close(out)
            os.unlink(config.passwords_out)  # type: ignore[arg-type]  (set whenever out is)
        raise
    listing = "".join(f"{name},{password}\n" for name, password in added.passwords.items())
    print(f"created {added.users} users ({added.memberships} project memberships)")
    if out is not None:
        with os.fdopen(out, "w", encoding="utf-8") as f:
            f.write("username,password\n" + listing)
        print(f"{len(added.passwords)} generated passwords are in {config.passwords_out}")
    elif added.passwords:
        print("generated passwords (shown only now; users can change theirs on their Account page):")
        print(listing, end="")


def run_add_member(config: AddMemberConfig) -> None:
    from rlhfkit.feedback import service
    from rlhfkit.feedback.schemas import MemberIn

    def work(s: Any) -> None:
        data = service.checked(MemberIn, username=config.username, role=config.role)
        service.set_member(s, service.find_project(s, config.project), data)

    _in_db(config, work)
    print(f"{config.username} is now {config.role} of {config.project!r}")


def run_create_project(config: CreateProjectConfig) -> None:
    from rlhfkit.feedback import service
    from rlhfkit.feedback.schemas import ProjectIn

    guidelines = ""
    if config.guidelines:
        try:
            # utf-8-sig: a BOM would hide the first heading
            guidelines = Path(config.guidelines).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{config.guidelines}: cannot read the guidelines ({e})") from None

    def work(s: Any) -> int:
        fields = {"name": config.name, "task": config.task, "overlap": config.overlap, "guidelines": guidelines}
        return service.create_project(s, service.checked(ProjectIn, **fields)).id

    project_id = _in_db(config, work)
    print(f"created project {config.name!r} (id {project_id})")


def run_import(config: ImportConfig) -> None:
    from rlhfkit.feedback import service

    path = Path(config.file)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    data = path.read_bytes()
    with _database(config) as db:
        batch = None if config.batch is None else service.batch_name(config.batch, "batch=")
        with db.session() as s:
            task = service.find_project(s, config.project).task
        records = service.parse_upload(str(path), data, task)  # before the write transaction: see import_items
        result = db.transact(lambda s: service.import_items(s, service.find_project(s, config.project), records, batch))
    into = f"{config.project!r}" + (f" batch {batch!r}" if batch else "")
    print(f"imported {result['added']} items into {into} ({result['skipped']} already there)")


def run_export(config: ExportConfig) -> None:
    from rlhfkit.config import atomic_write_text
    from rlhfkit.feedback import service

    def work(s: Any) -> list[dict[str, Any]]:
        batches = service.batch_names([config.batch] if config.batch is not None else None, "batch=")
        return service.export(s, service.find_project(s, config.project), config.kind, config.margin, batches)

    rows = _in_db(config, work)
    atomic_write_text(config.out, "".join(service.jsonl_line(r) for r in rows))
    print(f"wrote {len(rows)} records to {config.out}")


def run_api_key(config: ApiKeyConfig) -> None:
    from rlhfkit.feedback import service

    key = _in_db(config, lambda s: service.create_api_key(s, service.get_user(s, config.username), config.name))
    print(key)
