"""Batches (issue 18): items imported with `batch=NAME`, progress and exports per batch, over the
client and the HTTP API, the admin page, the CLI, and the migration that adds the column; on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from feedback_helpers import PASSWORD, completions_jsonl, seed
from sqlalchemy import inspect, select, text

from rlhfkit.cli import main
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.client import FeedbackClient, FeedbackError
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.models import Base, Item, Project
from rlhfkit.feedback.schemas import JudgmentIn
from rlhfkit.feedback.settings import ServeConfig

TABLES = ("users", "projects", "members", "items", "candidates", "assignments", "judgments")


def _j(text: str) -> int:
    """Which candidate of its item a completions_jsonl text is ("answer {i}.{j} ...")."""
    return int(text.split()[1].split(".")[1])


def _label(client: FeedbackClient, pid: int, n: int) -> list[str]:
    """Rank the next n items /next hands this labeler (candidate 0 best); their prompt ids."""
    done = []
    for _ in range(n):
        item = client.next_item(pid)
        assert item is not None
        ranks = {c["id"]: 1 if _j(c["text"]) == 0 else 2 for c in item["candidates"]}
        client.submit(pid, item["item_id"], ranks)
        done.append(item["prompt_id"])
    return done


def _batch_rows(progress: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(b["batch"], b["items"], b["complete"], b["judgments"]) for b in progress["batches"]]


def test_two_batches_progress_and_exports_over_the_api(config: ServeConfig, db: Database) -> None:
    world = seed(db, items=2, overlap=2)  # p0, p1: imported without a batch
    pid = world.project_a
    with LiveServer(config, db) as server:
        owner = FeedbackClient(server.url, api_key=world.keys["owner"])
        r1, r2 = completions_jsonl(3, prefix="r1-"), completions_jsonl(2, prefix="r2-")
        assert owner.import_jsonl(pid, r1, batch="r1") == {"added": 3, "skipped": 0}
        assert owner.import_jsonl(pid, r2, batch="r2") == {"added": 2, "skipped": 0}
        assert owner.import_jsonl(pid, r1, batch="r1") == {"added": 0, "skipped": 3}  # the same again: harmless
        with pytest.raises(FeedbackError) as e:  # an item is in one batch; all or nothing
            owner.import_jsonl(pid, r1 + completions_jsonl(1, prefix="r3-"), batch="r3")
        assert e.value.status == 422 and "'r1-0' was already imported in batch 'r1', not in batch 'r3'" in str(e.value)
        with pytest.raises(FeedbackError) as e:
            owner.import_jsonl(pid, completions_jsonl(1, prefix="x"), batch="round 2")
        assert e.value.status == 422 and "batch: 'round 2' is not a batch name" in str(e.value)
        with db.session() as s:
            assert s.scalar(select(Item.id).where(Item.key.in_(["r3-0", "x0"]))) is None

        ann = FeedbackClient(server.url, api_key=world.keys["ann"])
        bob = FeedbackClient(server.url, api_key=world.keys["bob"])
        assert _label(ann, pid, 7) == ["p0", "p1", "r1-0", "r1-1", "r1-2", "r2-0", "r2-1"]  # import order
        assert _label(bob, pid, 5)[2:] == ["r1-0", "r1-1", "r1-2"]  # r1 complete, r2 half-way

        everything = owner.progress(pid)
        assert everything["items_total"] == 7 and everything["judgments"] == 12
        assert _batch_rows(everything) == [(None, 2, 2, 4), ("r1", 3, 3, 6), ("r2", 2, 0, 2)]
        r2_only = owner.progress(pid, batch="r2")
        assert (r2_only["items_total"], r2_only["items_complete"], r2_only["judgments"]) == (2, 0, 2)
        assert r2_only["judgments_needed"] == 4 and _batch_rows(r2_only) == [("r2", 2, 0, 2)]
        by_name = {lab["username"]: lab for lab in r2_only["labelers"]}
        assert (by_name["ann"]["submitted"], by_name["bob"]["submitted"], by_name["bob"]["remaining"]) == (2, 0, 2)

        r1_judgments = owner.export(pid, "judgments", batch="r1")
        assert sorted({r["prompt_id"] for r in r1_judgments}) == ["r1-0", "r1-1", "r1-2"] and len(r1_judgments) == 6
        assert "batch" not in r1_judgments[0]  # the formats are strict: records do not name their batch
        both = owner.export(pid, "judgments", batch=["r1", "r2"])
        assert (
            len(both) == 8
            and owner.call("GET", f"/api/projects/{pid}/export/judgments", params={"batch": "r1,r2"}) == both
        )
        assert len(owner.export(pid, "judgments")) == 12
        assert [c["prompt_id"] for c in owner.export(pid, "completions", batch="r2")] == ["r2-0", "r2-1"]
        pairs = owner.export(pid, "pairs", batch="r1")
        assert len(owner.export(pid, "pairs")) == 7 * 2  # pairs carry no prompt_id: the count tells r1's apart
        assert len(pairs) == 3 * 2 and all(_j(p["chosen"]) == 0 for p in pairs)  # candidate 0 over the 2 others
        assert owner.agreement(pid, batch="r1")["judgments"] == 6
        r = owner.request("GET", f"/api/projects/{pid}/export/pairs", params={"batch": "r1"})
        assert f'filename="{pid}-r1-pairs.jsonl"' in r.headers["content-disposition"]
        for call in (lambda: owner.export(pid, "pairs", batch="r9"), lambda: owner.progress(pid, batch=["r1", "r9"])):
            with pytest.raises(FeedbackError) as e:
                call()
            assert e.value.status == 404 and "batch 'r9': no item of project" in str(e.value)
            assert "its batches: r1, r2" in str(e.value)
        with pytest.raises(FeedbackError) as e:
            owner.export(pid, "judgments", batch="r1,../x")
        assert e.value.status == 422
        for c in (owner, ann, bob):
            c.close()


def test_the_admin_page_imports_into_a_batch_and_shows_each_batch(config: ServeConfig, db: Database) -> None:
    world = seed(db, items=2, overlap=2)
    pid = world.project_a
    client = TestClient(create_app(config, db), follow_redirects=False)
    csrf = client.post("/api/login", json={"username": "alice", "password": PASSWORD}).json()["csrf_token"]
    page = client.get(f"/p/{pid}/admin").text
    assert 'name="batch"' in page and 'id="batches"' not in page  # no batch yet: no table
    upload = completions_jsonl(3, prefix="w1-").encode()
    r = client.post(
        f"/p/{pid}/admin/import", data={"csrf_token": csrf, "batch": "week-1"}, files={"file": ("w.jsonl", upload)}
    )
    assert r.status_code == 303, r.text
    r = client.post(
        f"/p/{pid}/admin/import", data={"csrf_token": csrf, "batch": "week 2"}, files={"file": ("w.jsonl", upload)}
    )
    assert r.status_code == 422 and "is not a batch name" in r.text
    page = client.get(f"/p/{pid}/admin").text
    table = page[page.index('id="batches"') : page.index("</table>", page.index('id="batches"'))]
    assert "(no batch)" in table and "<td>week-1</td>" in table
    assert f"/api/projects/{pid}/export/pairs?batch=week-1" in table


def _rows(db: Database) -> dict[str, int]:
    with db.engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def test_the_batch_migration_keeps_every_row_both_ways(db: Database) -> None:
    """0004 down and up on a populated database: every item, candidate and judgment kept (a
    batch-mode rebuild of `items` on SQLite would cascade-delete them), the schema as the models say."""
    world = seed(db, items=3, overlap=2)
    pid = world.project_a
    with db.session(write=True) as s:
        project = s.get(Project, pid)
        service.import_items(
            s, project, service.parse_upload("r.jsonl", completions_jsonl(2, prefix="r").encode(), "ranking"), "r1"
        )
        ann = service.get_user(s, "ann")
        for _ in range(4):
            item = service.next_assignment(s, project, ann, service.timedelta(hours=1))
            ranking = {c_id: 1 for c_id, _idx, _text in item.candidates}
            service.submit(
                s, project, ann, item.item_id, JudgmentIn(ranking=ranking, client_token=f"token-{item.item_id:04}")
            )
    rows = _rows(db)
    assert rows["judgments"] == 4

    db.downgrade("0003")
    assert _rows(db) == rows
    with db.engine.connect() as conn:
        assert "batch" not in {c["name"] for c in inspect(conn).get_columns("items")}
        assert "ix_items_project_batch" not in {i["name"] for i in inspect(conn).get_indexes("items")}

    db.migrate()
    assert _rows(db) == rows
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    with db.session() as s:
        assert set(s.scalars(select(Item.batch))) == {None}  # a downgrade forgets the batches, nothing else
        assert service.progress(s, s.get(Project, pid))["judgments"] == 4


def test_cli_import_export_and_aggregate_by_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/fb.db"
    db_arg = f"db_url={url}"
    monkeypatch.setenv("RLHFKIT_PASSWORD", PASSWORD)
    files = {}
    for name in ("a", "b"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(completions_jsonl(2, prefix=f"{name}-"))

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    assert cli("serve", "create-project", "Tea", "overlap=1", db_arg)[0] == 0
    assert cli("serve", "add-user", "ann", "project=Tea", db_arg)[0] == 0
    assert cli("serve", "import", "Tea", str(files["a"]), "batch=round-1", db_arg)[1] == (
        "imported 2 items into 'Tea' batch 'round-1' (0 already there)\n"
    )
    assert cli("serve", "import", "Tea", str(files["b"]), "batch=round-2", db_arg)[0] == 0
    code, _, err = cli("serve", "import", "Tea", str(files["b"]), "batch=round/3", db_arg)
    assert code != 0 and "batch=: 'round/3' is not a batch name" in err

    db = Database(url)
    with db.session(write=True) as s:
        project, ann = service.find_project(s, "Tea"), service.get_user(s, "ann")
        while (item := service.next_assignment(s, project, ann, service.timedelta(hours=1))) is not None:
            ranking = {c_id: idx + 1 for c_id, idx, _text in item.candidates}
            service.submit(
                s, project, ann, item.item_id, JudgmentIn(ranking=ranking, client_token=f"token-{item.item_id:04}")
            )
    db.dispose()

    out = tmp_path / "r2.jsonl"
    assert (
        cli("serve", "export", "Tea", "judgments", str(out), "batch=round-2", db_arg)[1]
        == f"wrote 2 records to {out}\n"
    )
    assert [json.loads(line)["prompt_id"] for line in out.read_text().splitlines()] == ["b-0", "b-1"]
    assert "wrote 4 records" in cli("serve", "export", "Tea", "judgments", str(out), "batch=round-1,round-2", db_arg)[1]
    code, _, err = cli("serve", "export", "Tea", "judgments", str(out), "batch=round-9", db_arg)
    assert code != 0 and "batch 'round-9': no item" in err

    code, stdout, _ = cli("aggregate", db_arg, "project=Tea", "batch=round-1", f"output_dir={tmp_path / 'agg'}")
    assert code == 0 and "2 judgments on 2 items" in stdout
    consensus = [json.loads(line) for line in (tmp_path / "agg" / "consensus.jsonl").read_text().splitlines()]
    assert [c["prompt_id"] for c in consensus] == ["a-0", "a-1"]
    code, _, err = cli("aggregate", f"rankings={out}", f"completions={files['a']}", "batch=round-1")
    assert code != 0 and "rankings files do not name batches" in err
