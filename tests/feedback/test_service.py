"""The service rules against a real database, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from feedback_helpers import XSS, completions_jsonl, seed
from sqlalchemy import func, select, text, update

from rlhfkit.data.formats import Completions, Demonstration, Ranking, read_records
from rlhfkit.feedback import service
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Assignment, Base, Item, Judgment, Project, User
from rlhfkit.feedback.schemas import JudgmentIn, MemberIn, ProjectIn, UserIn
from rlhfkit.labels.pairs import rankings_to_pairs

LEASE = timedelta(minutes=60)


def _user(db: Database, name: str) -> User:
    with db.session() as s:
        return service.get_user(s, name)


def _next(db: Database, project_id: int, name: str) -> Assignment | None:
    def work(s):  # type: ignore[no-untyped-def]
        a = service.next_assignment(s, s.get(Project, project_id), service.get_user(s, name), LEASE)
        return None if a is None else service.item_view(a, s.get(Project, project_id))

    return db.transact(work)


def _submit(db: Database, project_id: int, name: str, item_id: int, **fields):  # type: ignore[no-untyped-def]
    data = JudgmentIn(**({"client_token": f"tok-{name}-{item_id}"} | fields))

    def work(s):  # type: ignore[no-untyped-def]
        j, created = service.submit(s, s.get(Project, project_id), service.get_user(s, name), item_id, data)
        return service.judgment_view(j), created

    return db.transact(work)


def test_migrations_build_exactly_the_models(db: Database) -> None:
    db.migrate()  # a second run is a no-op
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if db.is_sqlite:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_import_is_all_or_nothing_and_idempotent(db: Database) -> None:
    with db.session(write=True) as s:
        p = service.create_project(s, ProjectIn(name="imp", overlap=2))
        pairwise = service.create_project(s, ProjectIn(name="pw", task="pairwise"))
        assert service.import_items(s, p, service.parse_upload("c.jsonl", completions_jsonl(3).encode(), p.task)) == {
            "added": 3,
            "skipped": 0,
        }
    with db.session(write=True) as s:
        p = service.find_project(s, "imp")
        again = service.parse_upload("c.jsonl", completions_jsonl(3).encode(), p.task)
        assert service.import_items(s, p, again) == {"added": 0, "skipped": 3}
    bad = completions_jsonl(5, prefix="new").splitlines()
    bad[3] = '{"prompt_id": "x", "prompt": "only one", "completions": ["a"]}'
    with pytest.raises(service.Invalid, match=r"upload\.jsonl:4: completions: need at least 2"):
        service.parse_upload("upload.jsonl", "\n".join(bad).encode(), "ranking")
    changed = json.loads(completions_jsonl(1).splitlines()[0]) | {"completions": ["other", "texts"]}
    with pytest.raises(service.Invalid, match="different content"), db.session(write=True) as s:
        p = service.find_project(s, "imp")
        records = service.parse_upload(
            "c.jsonl", (completions_jsonl(2, prefix="z") + json.dumps(changed)).encode(), "ranking"
        )
        service.import_items(s, p, records)
    # parse_upload splits K > 2 completions into pairs for a pairwise project; records that skip it
    # are still refused.
    three = Completions(prompt_id="x", prompt="p", completions=["a", "b", "c"])
    with pytest.raises(service.Invalid, match="exactly 2 completions"), db.session(write=True) as s:
        service.import_items(s, s.get(Project, pairwise.id), [three])
    with db.session() as s:  # the failed imports left nothing behind
        assert s.scalar(select(func.count()).select_from(Item)) == 3


def test_dispatcher_is_blind_resumable_and_respects_overlap(db: Database) -> None:
    world = seed(db, items=3, overlap=2)
    pid = world.project_a
    first = _next(db, pid, "ann")
    assert first is not None and first["prompt_id"] == "p0"
    assert _next(db, pid, "ann") == first  # a reload resumes the same item, same shuffled order
    with db.session() as s:  # the shuffled order is a permutation of the item's candidates
        assert sorted(c["id"] for c in first["candidates"]) == sorted(
            c.id for c in s.get(Item, first["item_id"]).candidates
        )
    assert _next(db, pid, "bob")["prompt_id"] == "p0"  # second place of p0
    assert _next(db, pid, "alice")["prompt_id"] == "p1"  # p0's two places are held by live leases
    _submit(db, pid, "ann", first["item_id"], ranking={c["id"]: 1 for c in first["candidates"]})
    seen = {first["prompt_id"]}
    while (item := _next(db, pid, "ann")) is not None:
        assert item["prompt_id"] not in seen  # never the same item twice
        seen.add(item["prompt_id"])
        _submit(db, pid, "ann", item["item_id"], unusable=True)
    assert seen == {"p0", "p1", "p2"}
    with db.session() as s:  # an outsider's project is untouched
        assert (
            s.scalar(select(func.count()).select_from(Assignment).join(Item).where(Item.project_id == world.project_b))
            == 0
        )


def test_expired_lease_frees_the_place(db: Database) -> None:
    world = seed(db, items=1, overlap=1)
    held = _next(db, world.project_a, "ann")
    assert _next(db, world.project_a, "bob") is None
    with db.session(write=True) as s:
        s.execute(update(Assignment).values(leased_until=Assignment.created_at - timedelta(minutes=1)))
    assert _next(db, world.project_a, "bob")["item_id"] == held["item_id"]


def test_submit_is_idempotent_and_never_exceeds_n(db: Database) -> None:
    world = seed(db, items=1, overlap=2)
    pid = world.project_a
    item = _next(db, pid, "ann")
    ranking = {c["id"]: i + 1 for i, c in enumerate(item["candidates"])}
    first, created = _submit(db, pid, "ann", item["item_id"], ranking=ranking)
    again, created_again = _submit(db, pid, "ann", item["item_id"], ranking=ranking)
    assert created and not created_again and again == first
    with pytest.raises(service.Conflict, match="already submitted"):
        _submit(db, pid, "ann", item["item_id"], ranking=ranking, client_token="another-token")
    # Two more labelers hold the item (as after an expired lease was handed on): only one fits.
    with db.session(write=True) as s:
        for name in ("bob", "alice"):
            s.add(
                Assignment(
                    item_id=item["item_id"],
                    user_id=world.users[name],
                    display_order=[],
                    leased_until=service.utcnow() + LEASE,
                )
            )
    _submit(db, pid, "bob", item["item_id"], ranking=ranking)
    with pytest.raises(service.Conflict, match="already has its 2 judgments"):
        _submit(db, pid, "alice", item["item_id"], ranking=ranking)
    with db.session() as s:
        assert s.scalar(select(Item.n_judgments).where(Item.id == item["item_id"])) == 2
        assert s.scalar(select(func.count()).select_from(Judgment)) == 2


def test_raw_judgments_export_round_trips_exactly(db: Database, tmp_path: Path) -> None:
    world = seed(db, items=4, overlap=2)
    pid = world.project_a
    expected: list[Ranking] = []
    plans = {  # per labeler: (ranks by candidate idx, unusable, comment) for each item in turn
        "ann": [
            ([1, 1, 2], False, None),
            ([2, 1, 3], False, "B clearly best ✓"),
            (None, True, XSS),
            ([1, 1, 1], True, None),
        ],
        "bob": [
            ([3, 2, 1], False, "'); DROP TABLE judgments; --"),
            ([1, 2, 2], False, None),
            ([1, 1, 1], False, None),
            ([2, 1, 1], True, "all poor"),
        ],
    }
    for name, plan in plans.items():
        for ranks, unusable, comment in plan:
            item = _next(db, pid, name)
            with db.session() as s:
                idx_of = {c.id: c.idx for c in s.get(Item, item["item_id"]).candidates}
            by_id = None if ranks is None else {cid: ranks[idx] for cid, idx in idx_of.items()}
            _submit(db, pid, name, item["item_id"], ranking=by_id, unusable=unusable, comment=comment)
            expected.append(
                Ranking(
                    prompt_id=item["prompt_id"],
                    labeler=name,
                    ranking=ranks if ranks is not None else [1, 1, 1],
                    unusable=unusable,
                    comment=comment,
                )
            )
    with db.session() as s:
        project = s.get(Project, pid)
        rows = service.export(s, project, "judgments")
        completions_rows = service.export(s, project, "completions")
        labeler_pairs = service.export(s, project, "labeler_pairs")
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    back = read_records(path, "rankings")
    key = lambda r: (r.prompt_id, r.labeler)  # noqa: E731
    assert sorted(back, key=key) == sorted(expected, key=key)
    comp_path = tmp_path / "completions.jsonl"
    comp_path.write_text("".join(json.dumps(r) + "\n" for r in completions_rows))
    completions = read_records(comp_path, "completions")
    assert [p.to_json() for p in rankings_to_pairs(back, completions)] == labeler_pairs


def test_demonstrations_and_pairwise(db: Database) -> None:
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username="writer"))
        demo = service.create_project(s, ProjectIn(name="demo", task="demonstration", overlap=1))
        pw = service.create_project(s, ProjectIn(name="pw", task="pairwise", overlap=1))
        for p in (demo, pw):
            service.set_member(s, p, MemberIn(username="writer"))
        prompts = '{"id": "d1", "prompt": "Say hi"}\n{"id": "d2", "prompt": [{"role": "user", "content": "Hey"}]}\n'
        service.import_items(s, demo, service.parse_upload("p.jsonl", prompts.encode(), "demonstration"))
        service.import_items(s, pw, service.parse_upload("c.jsonl", completions_jsonl(1, k=2).encode(), "pairwise"))
        demo_id, pw_id = demo.id, pw.id
    item = _next(db, demo_id, "writer")
    with pytest.raises(service.Invalid, match="written response, not a ranking"):
        _submit(db, demo_id, "writer", item["item_id"], ranking={1: 1})
    with pytest.raises(service.Invalid, match="write the ideal response"):
        _submit(db, demo_id, "writer", item["item_id"], response="   ")
    _submit(db, demo_id, "writer", item["item_id"], response="Hi! <b>there</b>")
    item2 = _next(db, demo_id, "writer")
    _submit(db, demo_id, "writer", item2["item_id"], response="Hello, how can I help?")
    with db.session() as s:
        demos = [Demonstration.model_validate(r) for r in service.export(s, s.get(Project, demo_id), "demonstrations")]
    assert [d.response for d in demos] == ["Hi! <b>there</b>", "Hello, how can I help?"]
    assert demos[1].prompt[0].content == "Hey"  # conversations survive as conversations

    pair = _next(db, pw_id, "writer")
    with db.session(write=True) as s:
        a = service.assignment_for(s, s.get(Project, pw_id), service.get_user(s, "writer"), pair["item_id"])
        choice = service.pairwise_choice(a, "b")  # B is the second candidate *as shown*
        assert choice == {pair["candidates"][0]["id"]: 2, pair["candidates"][1]["id"]: 1}
        with pytest.raises(service.Invalid, match="not one of"):
            service.pairwise_choice(a, "c")
    _submit(db, pw_id, "writer", pair["item_id"], ranking=choice)
    with db.session() as s:
        (row,) = service.export(s, s.get(Project, pw_id), "judgments")
        idx_of = {c.id: c.idx for c in s.get(Item, pair["item_id"]).candidates}
    assert row["ranking"] == [choice[cid] for cid in sorted(idx_of, key=idx_of.get)]
