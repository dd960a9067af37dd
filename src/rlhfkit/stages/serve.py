"""`rlhfkit serve`: the human-feedback web app, and the admin commands around it.

    rlhfkit serve [KEY=VALUE ...]             run the server (e.g. port=8080 db_url=postgresql://...)
    rlhfkit serve init                        create or upgrade the database
    rlhfkit serve create-owner USERNAME       the first user; password from $RLHFKIT_PASSWORD or asked
    rlhfkit serve add-user USERNAME [--project NAME] [--role labeler|admin] [--no-password]
    rlhfkit serve add-users FILE.csv [--passwords-out FILE]   many at once: username,role,project[,password]
    rlhfkit serve add-member USERNAME PROJECT [--role labeler|admin]   an existing user joins a project
    rlhfkit serve create-project NAME [--task ranking|pairwise|demonstration] [--overlap N]
                                              [--guidelines FILE.md]
    rlhfkit serve import PROJECT FILE.jsonl   completions from `rlhfkit generate` (or prompts); in a pairwise
                                              project K > 2 completions become their C(K,2) pairs
    rlhfkit serve export PROJECT KIND OUT.jsonl [--margin]
    rlhfkit serve api-key USERNAME [--name NAME]   prints a new API key for scripts

Every command also takes `--config FILE.yaml` and KEY=VALUE settings (db_url=... above all).
Without db_url the database is feedback.db in $RLHFKIT_HOME (default ~/.local/share/rlhfkit),
whatever folder you run from; each admin command names it on stderr.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhfkit.config import describe_fields, load_config
from rlhfkit.errors import UserError
from rlhfkit.feedback.settings import DB_FILE, SECRET_FILE, ServeConfig, default_db_path, display_url

Config = ServeConfig
PASSWORD_ENV = "RLHFKIT_PASSWORD"


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


def _run(config: ServeConfig, args: argparse.Namespace) -> None:
    import uvicorn

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
    """Run one admin command in one transaction."""
    with _database(config) as db:
        return db.transact(work)


def _init(config: ServeConfig, args: argparse.Namespace) -> None:

    _in_db(config, lambda s: None)
    print(f"database ready: {display_url(config.db_url)}")


def _user(config: ServeConfig, args: argparse.Namespace, owner: bool) -> None:
    from pydantic import ValidationError

    from rlhfkit.feedback import service
    from rlhfkit.feedback.schemas import MemberIn, UserIn

    password = None if getattr(args, "no_password", False) else _password(args.username)
    try:
        data = UserIn(username=args.username, password=password, is_owner=owner)
    except ValidationError as e:
        raise UserError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None

    def work(s: Any) -> None:
        service.create_user(s, data)
        if getattr(args, "project", None):
            service.set_member(
                s, service.find_project(s, args.project), MemberIn(username=args.username, role=args.role)
            )

    _in_db(config, work)
    print(f"created {'owner' if owner else 'user'} {args.username}")


def _add_users(config: ServeConfig, args: argparse.Namespace) -> None:
    """Users from a CSV file in one transaction. Passwords generated for lines without one are
    shown once: on stdout, or in --passwords-out, created 0600 and never overwritten (it would
    hold the only copy)."""
    from rlhfkit.feedback import service

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets save CSV with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    out = None
    if args.passwords_out:
        try:
            out = os.open(args.passwords_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise UserError(f"--passwords-out {args.passwords_out}: {e.strerror} (it is never overwritten)") from None
    try:
        added = _in_db(config, lambda s: service.add_users(s, text, str(path)))
    except BaseException:
        if out is not None:
            os.close(out)
            os.unlink(args.passwords_out)
        raise
    listing = "".join(f"{name},{password}\n" for name, password in added.passwords.items())
    print(f"created {added.users} users ({added.memberships} project memberships)")
    if out is not None:
        with os.fdopen(out, "w", encoding="utf-8") as f:
            f.write("username,password\n" + listing)
        print(f"{len(added.passwords)} generated passwords are in {args.passwords_out}")
    elif added.passwords:
        print("generated passwords (shown only now; users can change theirs on their Account page):")
        print(listing, end="")


def _add_member(config: ServeConfig, args: argparse.Namespace) -> None:
    from rlhfkit.feedback import service
    from rlhfkit.feedback.schemas import MemberIn

    data = MemberIn(username=args.username, role=args.role)
    _in_db(config, lambda s: service.set_member(s, service.find_project(s, args.project), data))
    print(f"{args.username} is now {args.role} of {args.project!r}")


def _create_project(config: ServeConfig, args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from rlhfkit.feedback import service
    from rlhfkit.feedback.schemas import ProjectIn

    guidelines = ""
    if args.guidelines:
        try:
            guidelines = Path(args.guidelines).read_text(encoding="utf-8-sig")  # a BOM would hide the first heading
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{args.guidelines}: cannot read the guidelines ({e})") from None
    try:
        data = ProjectIn(name=args.name, task=args.task, overlap=args.overlap, guidelines=guidelines)
    except ValidationError as e:
        raise UserError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    project_id = _in_db(config, lambda s: service.create_project(s, data).id)
    print(f"created project {args.name!r} (id {project_id})")


def _import(config: ServeConfig, args: argparse.Namespace) -> None:
    from rlhfkit.feedback import service

    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    data = path.read_bytes()
    with _database(config) as db:
        with db.session() as s:
            task = service.find_project(s, args.project).task
        records = service.parse_upload(str(path), data, task)  # before the write transaction: see import_items
        result = db.transact(lambda s: service.import_items(s, service.find_project(s, args.project), records))
    print(f"imported {result['added']} items into {args.project!r} ({result['skipped']} already there)")


def _export(config: ServeConfig, args: argparse.Namespace) -> None:
    from rlhfkit.config import atomic_write_text
    from rlhfkit.feedback import service

    rows = _in_db(config, lambda s: service.export(s, service.find_project(s, args.project), args.kind, args.margin))
    atomic_write_text(args.out, "".join(service.jsonl_line(r) for r in rows))
    print(f"wrote {len(rows)} records to {args.out}")


def _api_key(config: ServeConfig, args: argparse.Namespace) -> None:
    from rlhfkit.feedback import service

    key = _in_db(config, lambda s: service.create_api_key(s, service.get_user(s, args.username), args.name))
    print(key)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[ServeConfig, argparse.Namespace], None]]]:
    parser = argparse.ArgumentParser(
        prog="rlhfkit serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    actions: dict[str, Callable[[ServeConfig, argparse.Namespace], None]] = {"run": _run, "init": _init}
    sub.add_parser("run", help="run the server (the default)")
    sub.add_parser("init", help="create or upgrade the database")
    p = sub.add_parser("create-owner", help="create the site owner (the first user)")
    p.add_argument("username")
    actions["create-owner"] = lambda c, a: _user(c, a, owner=True)
    p = sub.add_parser("add-user", help="create a user, optionally adding them to a project")
    p.add_argument("username")
    p.add_argument("--project")
    p.add_argument("--role", choices=["labeler", "admin"], default="labeler")
    p.add_argument("--no-password", action="store_true", help="a script user: API keys only")
    actions["add-user"] = lambda c, a: _user(c, a, owner=False)
    p = sub.add_parser("add-users", help="create users from a CSV file: username,role,project[,password]")
    p.add_argument("file", help="CSV; a user on several lines joins several projects; no password: one is made")
    p.add_argument("--passwords-out", help="write generated passwords to this new file (mode 0600), not stdout")
    actions["add-users"] = _add_users
    p = sub.add_parser("add-member", help="add an existing user to a project (or change their role)")
    p.add_argument("username")
    p.add_argument("project")
    p.add_argument("--role", choices=["labeler", "admin"], default="labeler")
    actions["add-member"] = _add_member
    p = sub.add_parser("create-project", help="create a project")
    p.add_argument("name")
    p.add_argument("--task", choices=["ranking", "pairwise", "demonstration"], default="ranking")
    p.add_argument("--overlap", type=int, default=3, help="N: labelers per item")
    p.add_argument("--guidelines", help="a Markdown file")
    actions["create-project"] = _create_project
    p = sub.add_parser("import", help="import completions (or prompts) JSONL into a project")
    p.add_argument("project")
    p.add_argument("file")
    actions["import"] = _import
    p = sub.add_parser("export", help="export a project's data as JSONL")
    p.add_argument("project")
    p.add_argument("kind", help="judgments, pairs, labeler_pairs, consensus, kto, demonstrations, completions")
    p.add_argument("out")
    p.add_argument("--margin", action="store_true", help="pairs: add the consensus margin")
    actions["export"] = _export
    p = sub.add_parser("api-key", help="print a new API key for a user")
    p.add_argument("username")
    p.add_argument("--name", default="cli")
    actions["api-key"] = _api_key
    for sp in [parser, *sub.choices.values()]:
        sp.add_argument("--config", "-c", default=None, help="YAML file with the settings below")
        sp.epilog = "settings (KEY=VALUE):\n" + "\n".join(
            f"  {name} = {default}  {desc}" for name, _t, default, desc in describe_fields(ServeConfig)
        )
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser, actions


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


def cli(argv: list[str]) -> int:
    parser, actions = _parser()
    flags = [a for a in argv if "=" not in a or a.startswith("-")]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args(flags)
    config = load_config(ServeConfig, args.config, overrides)
    _refuse_stray_database(config)
    actions[args.command or "run"](config, args)
    return 0
