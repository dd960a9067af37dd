"""`rlhfkit serve` admin commands and `rlhfkit aggregate`, end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from feedback_helpers import XSS

from rlhfkit.cli import main
from rlhfkit.data.formats import Completions, read_records, write_records
from rlhfkit.feedback import service
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.settings import ServeConfig

PASSWORD = "labeler-pass-1"
SRC = Path(__file__).resolve().parents[2] / "src"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_commands_labeling_and_aggregate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"db_url=sqlite:///{tmp_path}/fb.db"
    monkeypatch.setenv("RLHFKIT_PASSWORD", PASSWORD)
    monkeypatch.setenv("RLHFKIT_SECRET_KEY", "test-secret")
    completions = [
        Completions(prompt_id=f"q{i}", prompt=f"Question {i} {XSS}", completions=["best", "middle", "worst"])
        for i in range(3)
    ]
    comp_file = write_records(tmp_path / "completions.jsonl", completions)
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text("# Rank by helpfulness\n")

    assert cli(capsys, "serve", "create-owner", "root", db)[1] == "created owner root\n"
    code, out, _ = cli(capsys, "serve", "create-project", "Tea", "overlap=3", f"guidelines={guidelines}", db)
    assert code == 0 and "created project 'Tea'" in out
    assert (
        cli(capsys, "serve", "import", "Tea", str(comp_file), db)[1]
        == "imported 3 items into 'Tea' (0 already there)\n"
    )
    assert "(3 already there)" in cli(capsys, "serve", "import", "Tea", str(comp_file), db)[1]
    for name in ("ann", "bob"):
        assert cli(capsys, "serve", "add-user", name, "project=Tea", db)[0] == 0
    assert cli(capsys, "serve", "add-user", "bot", "project=Tea", "no_password=true", db)[0] == 0
    key = cli(capsys, "serve", "api-key", "bot", db)[1].strip()
    assert key.startswith("rk_")

    # Three labelers rank every item: two agree (best > middle > worst), the bot ties the top two.
    config = ServeConfig(db_url=db.split("=", 1)[1], secret_key_file=str(tmp_path / "unused"))
    with LiveServer(config) as server:
        clients = [
            FeedbackClient.login(server.url, "ann", PASSWORD),
            FeedbackClient.login(server.url, "bob", PASSWORD),
            FeedbackClient(server.url, api_key=key),
        ]
        for client in clients:
            guidelines_seen = client.project(1)["guidelines"]
            assert guidelines_seen.startswith("# Rank by helpfulness")
            while (item := client.next_item(1)) is not None:
                is_bot = client.csrf is None  # the API-key client
                rank = {"best": 1, "middle": 1, "worst": 2} if is_bot else {"best": 1, "middle": 2, "worst": 3}
                client.submit(1, item["item_id"], {c["id"]: rank[c["text"]] for c in item["candidates"]})
            client.close()

    export = tmp_path / "judgments.jsonl"
    assert cli(capsys, "serve", "export", "Tea", "judgments", str(export), db)[1] == f"wrote 9 records to {export}\n"
    rankings = read_records(export, "rankings")
    assert {(r.labeler, tuple(r.ranking)) for r in rankings} == {
        ("ann", (1, 2, 3)),
        ("bob", (1, 2, 3)),
        ("bot", (1, 1, 2)),
    }

    from_db, from_files = tmp_path / "agg-db", tmp_path / "agg-files"
    code, out, _ = cli(capsys, "aggregate", db, "project=Tea", f"output_dir={from_db}")
    assert code == 0 and "9 judgments on 3 items" in out
    code, _, _ = cli(capsys, "aggregate", f"rankings={export}", f"completions={comp_file}", f"output_dir={from_files}")
    assert code == 0
    for name in ("consensus.jsonl", "pairs.jsonl", "kto.jsonl", "agreement.json"):
        assert (from_db / name).read_text() == (from_files / name).read_text()
    pairs = read_records(from_db / "pairs.jsonl", "pairs")
    assert [(p.chosen, p.rejected) for p in pairs[:3]] == [
        ("best", "middle"),
        ("best", "worst"),
        ("middle", "worst"),
    ]
    assert pairs[0].margin < pairs[1].margin  # the bot's tie makes best-vs-middle the weakest preference
    report = json.loads((from_db / "agreement.json").read_text())
    assert report["pairwise_agreement_strict"] == 1.0 and report["pairwise_agreement"] == pytest.approx(7 / 9)
    assert report["labelers"]["ann"]["agreement_strict"] == 1.0


def test_cli_errors_are_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"db_url=sqlite:///{tmp_path}/fb.db"
    monkeypatch.setenv("RLHFKIT_PASSWORD", "short")
    code, _, err = cli(capsys, "serve", "create-owner", "root", db)
    assert code == 2 and "password" in err and "at least 10" in err
    code, _, err = cli(capsys, "serve", "import", "Nope", str(tmp_path / "missing.jsonl"), db)
    assert code == 2 and "missing.jsonl: file not found" in err
    (tmp_path / "c.jsonl").write_text('{"prompt_id": "a", "prompt": "x", "completions": ["y", "z"]}\n')
    code, _, err = cli(capsys, "serve", "import", "Nope", str(tmp_path / "c.jsonl"), db)
    assert code == 2 and "no project named 'Nope'" in err
    assert cli(capsys, "serve", "create-project", "Tea", db)[0] == 0
    code, _, err = cli(capsys, "serve", "create-project", "Tea", db)
    assert code == 2 and "already exists" in err
    code, _, err = cli(capsys, "serve", "init", "db_url=mysql://x/y")
    assert code == 2 and "only SQLite and PostgreSQL" in err
    code, _, err = cli(capsys, "serve", "init", "prot=80")
    assert code == 2 and "prot" in err
    code, _, err = cli(capsys, "aggregate", f"output_dir={tmp_path}")
    assert code == 2 and "rankings= and completions=" in err
    code, _, err = cli(capsys, "aggregate", db, "project=Tea", f"output_dir={tmp_path}/o")
    assert code == 2 and "no judgments" in err


def test_serve_sub_commands_speak_the_cli_dialect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin commands are registry commands: main arguments by position, settings as KEY=VALUE,
    a `--flag` refused with the spelling it meant, choices from the one list of tasks and roles."""
    monkeypatch.setenv("RLHFKIT_HOME", str(tmp_path))
    monkeypatch.setenv("RLHFKIT_PASSWORD", PASSWORD)
    code, _, err = cli(capsys, "serve", "add-user", "bot", "--no-password")
    assert code == 2 and "unknown flag --no-password; settings are KEY=VALUE, e.g. no_password=true" in err
    code, _, err = cli(capsys, "serve", "create-project", "Tea", "--overlap=2")
    assert code == 2 and "e.g. overlap=2" in err
    code, _, err = cli(capsys, "serve", "create-prjoect", "Tea")
    assert code == 2 and "unknown command `serve create-prjoect`; one of: run, init, create-owner" in err
    code, _, err = cli(capsys, "serve", "create-project", "Tea", "task=ranked")
    assert code == 2 and "task: Input should be 'ranking', 'pairwise', 'demonstration', 'rating' or 'thumbs'" in err
    code, _, err = cli(capsys, "serve", "create-owner", "root", "password=typed-on-the-command-line")
    assert code == 2 and "password" in err  # passwords never go where `ps` shows them
    assert cli(capsys, "serve", "create-project", "Tea", "overlap=2", "task=pairwise")[0] == 0
    code, _, err = cli(capsys, "serve", "add-member", "nobody", "Tea", "role=boss")
    assert code == 2 and "role: Input should be 'admin' or 'labeler'" in err
    assert cli(capsys, "serve", "add-user", "ann", "project=Tea", "role=admin")[1] == "created user ann\n"
    code, out, _ = cli(capsys, "serve", "add-member", "ann", "Tea")
    assert code == 0 and out == "ann is now labeler of 'Tea'\n"
    assert main(["serve", "add-user", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhfkit serve add-user [USERNAME]")
    assert "{admin|labeler} = 'labeler'" in out and "no_password" in out
    assert main(["serve", "--help"]) == 0
    assert "add-member" in capsys.readouterr().out  # the sub-commands are listed under the server's settings


def test_the_serve_cli_does_not_load_the_ml_stack(tmp_path: Path) -> None:
    """`rlhfkit serve --help` and the admin commands must be quick: torch, transformers and choix
    (scipy) take seconds to import and none of them is needed to manage the site."""
    code = """
import sys
from rlhfkit.cli import main
import rlhfkit.stages.serve
try:
    main(["serve", "--help"])
except SystemExit:
    pass
print("help:", sorted(m for m in ("torch", "transformers", "choix", "scipy", "fastapi") if m in sys.modules))
main(["serve", "init", "db_url=sqlite:///" + sys.argv[1]])
print("admin:", sorted(m for m in ("torch", "transformers", "choix", "scipy", "fastapi", "rlhfkit.feedback.app")
                      if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, f"{tmp_path}/fb.db"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PYTHONPATH": str(SRC), "RLHFKIT_HOME": str(tmp_path)},
    ).stdout
    assert "help: []" in out and "admin: []" in out, out


def test_one_default_database_whatever_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without db_url every command uses $RLHFKIT_HOME/feedback.db, from any folder, and says so."""
    home, one, two = tmp_path / "home", tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    monkeypatch.setenv("RLHFKIT_HOME", str(home))
    monkeypatch.chdir(one)
    code, _, err = cli(capsys, "serve", "create-project", "Tea")
    assert code == 0 and f"database: sqlite:///{home}/feedback.db" in err
    monkeypatch.chdir(two)
    code, out, err = cli(capsys, "serve", "add-member", "nobody", "Tea")
    assert code == 2 and "no user named 'nobody'" in err  # the project was found: same database
    assert f"database: sqlite:///{home}/feedback.db" in err
    assert not list(one.iterdir()) and not list(two.iterdir())
    assert main(["serve", "--help"]) == 0
    assert f"db_url                      str = 'sqlite:///{home}/feedback.db'" in capsys.readouterr().out


def test_an_old_database_in_the_current_folder_is_not_silently_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLHFKIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "serve", "create-project", "Tea", "db_url=sqlite:///feedback.db")[0] == 0
    code, _, err = cli(capsys, "serve", "create-project", "Coffee")
    assert code == 2 and "feedback.db exists, but the default database is" in err
    assert "db_url=sqlite:///feedback.db" in err
    assert not (tmp_path / "home" / "feedback.db").exists()


def test_admin_commands_name_the_database_without_its_password(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = db_url.replace("postgres@", "postgres:hunter2-secret@")  # trust auth: the password is ignored
    code, out, err = cli(capsys, "serve", "create-project", "Tea", f"db_url={url}")
    assert code == 0
    shown = url.replace(":hunter2-secret@", ":***@")
    assert f"database: {shown}" in err
    code, out, err = cli(capsys, "serve", "init", f"db_url={url}")
    assert code == 0 and "hunter2" not in out + err


def test_aggregate_reads_the_default_database_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLHFKIT_HOME", str(tmp_path / "home"))
    code, _, err = cli(capsys, "aggregate", "project=Tea", f"output_dir={tmp_path}/o")
    assert code == 2 and f"sqlite:///{tmp_path}/home/feedback.db: no such database" in err
    assert cli(capsys, "serve", "create-project", "Tea")[0] == 0
    code, _, err = cli(capsys, "aggregate", "project=Tea", f"output_dir={tmp_path}/o")
    assert code == 2 and "no judgments" in err  # found the project in $RLHFKIT_HOME/feedback.db


def test_cli_imports_and_guidelines_with_a_byte_order_mark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    db = f"db_url={db_url}"
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_bytes(b"\xef\xbb\xbf# Be kind\n")
    assert cli(capsys, "serve", "create-project", "Tea", f"guidelines={guidelines}", db)[0] == 0
    comp = tmp_path / "c.jsonl"
    record = {"prompt_id": "a", "prompt": "x", "completions": ["y", "z"]}
    comp.write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode())
    code, out, err = cli(capsys, "serve", "import", "Tea", str(comp), db)
    assert code == 0 and out == "imported 1 items into 'Tea' (0 already there)\n", err
    database = Database(db_url)
    with database.session() as s:
        assert service.find_project(s, "Tea").guidelines == "# Be kind\n"  # the heading is still a heading
    database.dispose()


def test_add_users_from_a_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    db = f"db_url={db_url}"
    for name in ("Tea", "Coffee"):
        assert cli(capsys, "serve", "create-project", name, db)[0] == 0
    users = tmp_path / "users.csv"
    users.write_bytes(
        b"\xef\xbb\xbfusername,role,project,password\n"  # as a spreadsheet saves it: BOM and header
        b"ann,labeler,Tea,tulip-harbor-quartz-9\n"
        b"bob, admin ,Tea\n"
        b"bob,labeler,Coffee\n"
        b"\n"
        b"carl,,\n"
    )
    code, out, err = cli(capsys, "serve", "add-users", str(users), db)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == [
        "created 3 users (3 project memberships)",
        "generated passwords (shown only now; users can change theirs on their Account page):",
    ]
    generated = dict(line.split(",") for line in lines[2:])
    assert sorted(generated) == ["bob", "carl"] and all(len(p) >= 16 for p in generated.values())
    database = Database(db_url)
    with database.session() as s:
        for name, password in [("ann", "tulip-harbor-quartz-9"), *generated.items()]:
            service.check_password(s, name, password)
        roles = {
            (p.name, m.user.username, m.role)
            for p in (service.find_project(s, "Tea"), service.find_project(s, "Coffee"))
            for m in service.members(s, p)
        }
    assert roles == {("Tea", "ann", "labeler"), ("Tea", "bob", "admin"), ("Coffee", "bob", "labeler")}

    # Every bad line is named, all in one run and in order, and nothing of the file is stored.
    users.write_text(
        "dave,labeler,Tea\n"
        "erin,boss,Tea\n"
        "ann,labeler,Tea\n"
        "fay,labeler,Nope\n"
        "gus,labeler\n"
        "hal,labeler,Tea,short\n"
        "bad name,labeler,Tea\n"
    )
    code, out, err = cli(capsys, "serve", "add-users", str(users), db)
    assert code == 2 and out == ""
    assert err.split("error: ", 1)[1].splitlines() == [
        f"{users}:2: role: Input should be 'admin' or 'labeler'",
        f"{users}:3: a user named 'ann' already exists (`add-member` adds an existing user to a project)",
        f"{users}:4: no project named 'Nope'",
        f"{users}:5: expected username,role,project[,password]; got 2 fields",
        f"{users}:6: password: must have at least 10 characters; choose a longer passphrase, e.g. three or four "
        "random words",
        f"{users}:7: username: String should match pattern '^[A-Za-z0-9_.@-]{{1,64}}$'",
    ]
    with database.session() as s:
        assert {u.username for u in service.all_users(s)} == {"ann", "bob", "carl"}  # no dave

    # --passwords-out: a new file only its owner can read; never overwritten.
    users.write_text("dave,labeler,Tea\nerin,admin,Coffee,velvet-compass-lantern\n")
    secret = tmp_path / "passwords.csv"
    code, out, err = cli(capsys, "serve", "add-users", str(users), f"passwords_out={secret}", db)
    assert code == 0 and out == f"created 2 users (2 project memberships)\n1 generated passwords are in {secret}\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    header, dave = secret.read_text().splitlines()
    assert header == "username,password" and dave.startswith("dave,")
    with database.session() as s:
        service.check_password(s, "dave", dave.split(",", 1)[1])
    database.dispose()
    users.write_text("fay,labeler,Tea\n")
    code, _, err = cli(capsys, "serve", "add-users", str(users), f"passwords_out={secret}", db)
    assert code == 2 and "never overwritten" in err and secret.read_text().startswith("username,password\ndave,")
