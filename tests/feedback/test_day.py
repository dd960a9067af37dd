"""The annotator's day through the JSON API, on SQLite and PostgreSQL: skip, edit one's own
judgments (with a history), strength of preference, the admin's review (filters, an item's
judgments side by side, send back, exclude a labeler) and progress that matches /next."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import PASSWORD, XSS, World, seed
from sqlalchemy import select

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.client import FeedbackClient, FeedbackError
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.models import Assignment, Item, Judgment, Project
from rlhfkit.feedback.settings import ServeConfig

Clients = dict[str, TestClient]
MakeDay = Callable[..., tuple[World, Clients]]


@pytest.fixture
def make_day(config: ServeConfig) -> Iterator[MakeDay]:
    """`make_day(items=, overlap=, task=)`: a seeded app and an API-key client per user."""
    databases: list[Database] = []

    def make(items: int = 4, overlap: int = 1, task: str = "ranking") -> tuple[World, Clients]:
        db = Database(config.db_url)
        databases.append(db)
        app = create_app(config, db)
        world = seed(db, items=items, overlap=overlap, task=task)
        clients = {
            name: TestClient(app, headers={"Authorization": f"Bearer {key}"}, raise_server_exceptions=False)
            for name, key in world.keys.items()
        }
        return world, clients

    yield make
    for db in databases:
        db.dispose()


def next_item(c: TestClient, pid: int) -> dict[str, Any] | None:
    r = c.get(f"/api/projects/{pid}/next")
    assert r.status_code == 200, r.text
    return r.json()["item"]


def submit(c: TestClient, pid: int, item: dict[str, Any], ranks: list[int] | None = None, **fields: Any) -> Any:
    """Rank the candidates in display order (`ranks[n]` for the n-th shown; default 1, 2, ...)."""
    cids = [cand["id"] for cand in item["candidates"]]
    ranking = dict(zip(cids, ranks or range(1, len(cids) + 1), strict=True))
    body = {"ranking": ranking, "client_token": secrets.token_hex(8)} | fields
    return c.post(f"/api/projects/{pid}/items/{item['item_id']}/judgments", json=body)


def keys(items: list[dict[str, Any]]) -> list[str]:
    return [i["prompt_id"] for i in items]


def labeler_row(c: TestClient, pid: int, name: str) -> dict[str, Any]:
    r = c.get(f"/api/projects/{pid}/progress")
    assert r.status_code == 200, r.text
    return next(row for row in r.json()["labelers"] if row["username"] == name)


def export(c: TestClient, pid: int, kind: str, margin: bool = False) -> list[dict[str, Any]]:
    r = c.get(f"/api/projects/{pid}/export/{kind}", params={"margin": margin})
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


# ---------------------------------------------------------------- skip


def test_a_skipped_item_frees_its_place_and_comes_back_only_when_put_back(make_day: MakeDay) -> None:
    world, c = make_day(items=4, overlap=1)
    A, ann, bob = world.project_a, c["ann"], c["bob"]
    first = next_item(ann, A)
    assert first["prompt_id"] == "p0"
    assert ann.post(f"/api/projects/{A}/items/{first['item_id']}/skip").status_code == 204
    assert ann.post(f"/api/projects/{A}/items/{first['item_id']}/skip").status_code == 204  # harmless twice
    second = next_item(ann, A)
    assert second["prompt_id"] == "p1"  # not p0 again
    assert next_item(bob, A)["prompt_id"] == "p0"  # its lease was released: bob gets it at once
    assert ann.get(f"/api/projects/{A}/items/{first['item_id']}").json()["skipped"] is True

    # Skip p1 too, then put it back: it comes after her unfinished item, in import order.
    assert ann.post(f"/api/projects/{A}/items/{second['item_id']}/skip").status_code == 204
    third = next_item(ann, A)
    assert third["prompt_id"] == "p2"
    history = ann.get(f"/api/projects/{A}/history").json()
    assert keys(history["skipped"]) == ["p1", "p0"]  # newest first
    assert ann.get(f"/api/projects/{A}").json()["progress"]["skipped"] == 2
    assert ann.delete(f"/api/projects/{A}/items/{second['item_id']}/skip").status_code == 204
    assert keys(ann.get(f"/api/projects/{A}/history").json()["skipped"]) == ["p0"]
    assert next_item(ann, A)["prompt_id"] == "p2"  # her open item first
    assert submit(ann, A, third).status_code == 201
    assert next_item(ann, A)["prompt_id"] == "p1"  # back again

    # What cannot be skipped or put back, with the reason.
    r = ann.post(f"/api/projects/{A}/items/{third['item_id']}/skip")
    assert r.status_code == 409 and "already submitted" in r.json()["error"]
    r = ann.delete(f"/api/projects/{A}/items/{third['item_id']}/skip")
    assert r.status_code == 409 and "not among the ones you skipped" in r.json()["error"]
    r = c["eve"].post(f"/api/projects/{A}/items/{third['item_id']}/skip")
    assert r.status_code == 404


# ---------------------------------------------------------------- edit, undo, history


def test_a_labeler_edits_their_own_judgment_and_nothing_is_lost(make_day: MakeDay) -> None:
    world, c = make_day(items=3, overlap=2)
    A, ann, bob, alice = world.project_a, c["ann"], c["bob"], c["alice"]
    item = next_item(ann, A)
    iid = item["item_id"]
    assert submit(ann, A, item, [1, 2, 3], comment="first").status_code == 201
    bob_item = next_item(bob, A)
    assert bob_item["item_id"] == iid and submit(bob, A, bob_item).status_code == 201

    cids = [cand["id"] for cand in item["candidates"]]
    edit = {"ranking": {str(cids[0]): 2, str(cids[1]): 1, str(cids[2]): 2}, "strength": 3, "client_token": "edit-1234"}
    r = ann.put(f"/api/projects/{A}/items/{iid}/judgment", json=edit)
    assert r.status_code == 200, r.text
    assert r.json()["strength"] == 3 and r.json()["edited_at"] and r.json()["comment"] is None
    again = ann.put(f"/api/projects/{A}/items/{iid}/judgment", json=edit)  # a retry: no second version
    assert again.status_code == 200 and again.json()["edited_at"] == r.json()["edited_at"]

    # The export has only the current judgment; the item's history keeps the first one.
    anns = [row for row in export(alice, A, "judgments") if row["labeler"] == "ann"]
    assert len(anns) == 1 and anns[0]["strength"] == 3 and "comment" not in anns[0]
    detail = alice.get(f"/api/projects/{A}/review/items/{iid}").json()
    assert [(h["username"], h["reason"], h["comment"]) for h in detail["history"]] == [("ann", "edited", "first")]
    assert detail["n_judgments"] == 2  # an edit is not another judgment

    # Her history: newest first, with the decision in the letters she saw.
    history = ann.get(f"/api/projects/{A}/history").json()
    assert history["total"] == 1 and history["judgments"][0]["item_id"] == iid
    assert history["judgments"][0]["decision"] == "B  ›  A = C (much better)"

    # Nobody edits another's judgment; an edit is checked like a submit.
    r = c["eve"].put(f"/api/projects/{A}/items/{iid}/judgment", json=edit | {"client_token": "eve-edit-1"})
    assert r.status_code == 404
    other = next_item(alice, A)  # alice has not judged this one: nothing of hers to change
    r = alice.put(f"/api/projects/{A}/items/{other['item_id']}/judgment", json=edit | {"client_token": "al-edit-1"})
    assert r.status_code == 404 and "no judgment of this item" in r.json()["error"]
    r = ann.put(f"/api/projects/{A}/items/{iid}/judgment", json=edit | {"strength": 5, "client_token": "edit-bad-1"})
    assert r.status_code == 422 and "strength" in r.json()["error"]
    r = ann.put(
        f"/api/projects/{A}/items/{iid}/judgment", json={"ranking": {str(cids[0]): 1}, "client_token": "edit-2345"}
    )
    assert r.status_code == 422 and "no rank for candidate" in r.json()["error"]

    # Once the project is locked, or the item sent back, her judgment can no longer change.
    assert c["owner"].patch(f"/api/projects/{A}", json={"locked": True}).status_code == 200
    r = ann.put(f"/api/projects/{A}/items/{iid}/judgment", json=edit | {"client_token": "edit-locked"})
    assert r.status_code == 409 and "locked" in r.json()["error"]
    assert next_item(ann, A) is None and ann.get(f"/api/projects/{A}").json()["progress"]["to_go"] == 0
    assert c["owner"].patch(f"/api/projects/{A}", json={"locked": False}).status_code == 200
    assert alice.post(f"/api/projects/{A}/review/items/{iid}/send-back").json() == {"judgments_set_aside": 2}
    r = ann.put(f"/api/projects/{A}/items/{iid}/judgment", json=edit | {"client_token": "edit-after"})
    assert r.status_code == 409 and "sent back for relabeling" in r.json()["error"]


def test_bob_cannot_change_anns_judgment(make_day: MakeDay) -> None:
    world, c = make_day(items=2, overlap=1)
    A = world.project_a
    item = next_item(c["ann"], A)
    assert submit(c["ann"], A, item).status_code == 201
    cids = [cand["id"] for cand in item["candidates"]]
    body = {"ranking": {str(cid): 1 for cid in cids}, "client_token": "bob-tries-1"}
    r = c["bob"].put(f"/api/projects/{A}/items/{item['item_id']}/judgment", json=body)
    assert r.status_code == 404
    assert [row["labeler"] for row in export(c["owner"], A, "judgments")] == ["ann"]
    assert export(c["owner"], A, "judgments")[0]["ranking"] != [1, 1, 1]


# ---------------------------------------------------------------- strength of preference


def test_strength_of_preference_becomes_the_margin_of_every_pair(make_day: MakeDay) -> None:
    world, c = make_day(items=2, overlap=1, task="pairwise")  # 3 candidates each -> 6 pair items
    A, ann, owner = world.project_a, c["ann"], c["owner"]
    stated = {}
    for strength in (3, 1, None):
        item = next_item(ann, A)
        fields = {} if strength is None else {"strength": strength}
        assert submit(ann, A, item, [1, 2], **fields).status_code == 201
        stated[item["prompt_id"]] = strength

    raw = {row["prompt_id"]: row.get("strength") for row in export(owner, A, "judgments")}
    assert raw == stated
    own = export(owner, A, "labeler_pairs", margin=True)
    assert sorted(p["margin"] for p in own) == [0.4, 1.1, 2.2]  # slightly, not said (= better), much
    cons = export(owner, A, "pairs", margin=True)
    assert len(cons) == 3 and all(isinstance(p["margin"], float) and p["margin"] > 0 for p in cons)
    much, slightly = (max(cons, key=lambda p: p["margin"]), min(cons, key=lambda p: p["margin"]))
    assert much["margin"] > 1.5 * slightly["margin"]
    assert all("margin" not in p for p in export(owner, A, "pairs"))  # only when asked for

    # A tie prefers nothing: a strength with it is refused, naming the field.
    item = next_item(ann, A)
    r = submit(ann, A, item, [1, 1], strength=2)
    assert r.status_code == 422 and r.json()["error"].startswith("strength:")
    r = submit(ann, A, item, [1, 2], strength=4)
    assert r.status_code == 422 and "strength" in r.json()["error"]
    assert submit(ann, A, item, [1, 1]).status_code == 201  # a tie without one is fine


# ---------------------------------------------------------------- review: list, detail, send back


def test_review_filters_and_an_items_judgments_side_by_side(make_day: MakeDay) -> None:
    world, c = make_day(items=30, overlap=2)
    A, ann, bob, alice = world.project_a, c["ann"], c["bob"], c["alice"]
    # p0: ann and bob agree; p1: they disagree completely, bob comments; p2: only ann; rest: nothing.
    for ranks_ann, ranks_bob, comment in (([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [3, 2, 1], "all wrong")):
        a_item, b_item = next_item(ann, A), next_item(bob, A)
        assert a_item["item_id"] == b_item["item_id"]
        order_a = [cand["id"] for cand in a_item["candidates"]]
        order_b = [cand["id"] for cand in b_item["candidates"]]
        # Same ranks per *candidate*, whatever order each was shown.
        by_cid = dict(zip(sorted(order_a), ranks_ann, strict=True))
        assert submit(ann, A, a_item, [by_cid[cid] for cid in order_a]).status_code == 201
        by_cid = dict(zip(sorted(order_b), ranks_bob, strict=True))
        body = {"comment": comment} if comment else {}
        assert submit(bob, A, b_item, [by_cid[cid] for cid in order_b], **body).status_code == 201
    assert submit(ann, A, next_item(ann, A)).status_code == 201

    def listing(**params: Any) -> dict[str, Any]:
        r = alice.get(f"/api/projects/{A}/review/items", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    everything = listing()
    assert everything["total"] == 30 and everything["pages"] == 2 and len(everything["items"]) == 25
    assert keys(listing(page=2)["items"]) == [f"p{i}" for i in range(25, 30)]
    by_key = {i["prompt_id"]: i for i in everything["items"]}
    assert by_key["p0"]["disagreement"] == 0.0 and by_key["p1"]["disagreement"] == 1.0
    assert by_key["p2"]["disagreement"] is None and by_key["p1"]["comments"] == 1
    assert keys(listing(status="complete")["items"]) == ["p0", "p1"]
    assert keys(listing(status="partial")["items"]) == ["p2"]
    assert listing(status="unlabeled")["total"] == 27
    assert keys(listing(min_disagreement=0.5)["items"]) == ["p1"]
    assert keys(listing(min_disagreement=0)["items"]) == ["p0", "p1"]
    assert keys(listing(has_comment=True)["items"]) == ["p1"]
    assert keys(listing(labeler="ann", status="partial")["items"]) == ["p2"]
    assert keys(listing(labeler="bob")["items"]) == ["p0", "p1"]
    for bad, field in ((dict(status="done"), "status"), (dict(min_disagreement=2), "min_disagreement")):
        r = alice.get(f"/api/projects/{A}/review/items", params=bad)
        assert r.status_code == 422 and field in r.json()["error"], r.text

    p1 = by_key["p1"]["item_id"]
    detail = alice.get(f"/api/projects/{A}/review/items/{p1}").json()
    assert detail["disagreement"] == 1.0 and detail["status"] == "complete"
    assert [(j["username"], j["ranking"], j["comment"]) for j in detail["judgments"]] == [
        ("ann", [1, 2, 3], None),
        ("bob", [3, 2, 1], "all wrong"),
    ]
    assert [cand["label"] for cand in detail["candidates"]] == ["A", "B", "C"]
    assert detail["judgments"][1]["decision"] == "C  ›  B  ›  A"

    # Send it back: the judgments move to the history, the item is offered again from zero.
    assert alice.post(f"/api/projects/{A}/review/items/{p1}/send-back").json() == {"judgments_set_aside": 2}
    detail = alice.get(f"/api/projects/{A}/review/items/{p1}").json()
    assert detail["judgments"] == [] and detail["status"] == "sent_back" and detail["n_judgments"] == 0
    assert sorted((h["username"], h["reason"]) for h in detail["history"]) == [
        ("ann", "sent_back"),
        ("bob", "sent_back"),
    ]
    assert keys(listing(status="sent_back")["items"]) == ["p1"]
    assert [r["prompt_id"] for r in export(alice, A, "judgments")] == ["p0", "p0", "p2"]
    assert next_item(bob, A)["item_id"] == p1  # offered again, to those who judged it too
    r = alice.post(f"/api/projects/{A}/review/items/999999/send-back")
    assert r.status_code == 404


def test_only_a_projects_admins_review(make_day: MakeDay) -> None:
    world, c = make_day(items=2, overlap=1)
    A = world.project_a
    item = next_item(c["ann"], A)
    assert submit(c["ann"], A, item).status_code == 201
    iid, ann_id = item["item_id"], world.users["ann"]
    calls = [
        ("GET", f"/api/projects/{A}/review/items", None),
        ("GET", f"/api/projects/{A}/review/items/{iid}", None),
        ("POST", f"/api/projects/{A}/review/items/{iid}/send-back", None),
        ("PUT", f"/api/projects/{A}/labelers/{ann_id}/excluded", {"excluded": True}),
    ]
    for method, path, body in calls:
        for name, status in (("ann", 403), ("bob", 403), ("eve", 404)):
            r = c[name].request(method, path, json=body)
            assert r.status_code == status, (name, method, path, r.text)
        assert TestClient(c["ann"].app).request(method, path, json=body).status_code == 401
    assert [r["labeler"] for r in export(c["owner"], A, "judgments")] == ["ann"]  # nothing changed
    for name in ("alice", "owner"):
        assert c[name].get(f"/api/projects/{A}/review/items/{iid}").status_code == 200


# ---------------------------------------------------------------- exclude a labeler, progress


def test_excluding_a_labeler_takes_their_judgments_out_and_back(make_day: MakeDay) -> None:
    world, c = make_day(items=3, overlap=2)
    A, ann, bob, alice = world.project_a, c["ann"], c["bob"], c["alice"]
    for _ in range(3):
        for who in (ann, bob):
            assert submit(who, A, next_item(who, A)).status_code == 201
    assert len(export(alice, A, "judgments")) == 6
    assert labeler_row(alice, A, "alice")["remaining"] == 0  # every item has its 2 judgments

    r = alice.put(f"/api/projects/{A}/labelers/{world.users['bob']}/excluded", json={"excluded": True})
    assert r.status_code == 200 and r.json() == {"excluded": True, "changed": 3}
    assert {row["labeler"] for row in export(alice, A, "judgments")} == {"ann"}
    assert alice.get(f"/api/projects/{A}/agreement").json()["judgments"] == 3
    row = labeler_row(alice, A, "bob")
    assert (row["submitted"], row["excluded"]) == (0, 3)
    progress = alice.get(f"/api/projects/{A}/progress").json()
    assert (progress["judgments"], progress["items_complete"]) == (3, 0)
    assert labeler_row(alice, A, "alice")["remaining"] == 3  # the places bob held are offered again

    r = alice.put(f"/api/projects/{A}/labelers/{world.users['bob']}/excluded", json={"excluded": False})
    assert r.json() == {"excluded": False, "changed": 3}
    assert len(export(alice, A, "judgments")) == 6
    assert labeler_row(alice, A, "bob")["submitted"] == 3 and labeler_row(alice, A, "alice")["remaining"] == 0
    r = alice.put(f"/api/projects/{A}/labelers/999999/excluded", json={"excluded": True})
    assert r.status_code == 404
    r = alice.put(f"/api/projects/{A}/labelers/{world.users['bob']}/excluded", json={"excluded": "yes"})
    assert r.status_code == 422 and "excluded" in r.json()["error"]


def test_remaining_is_exactly_what_next_hands_out(make_day: MakeDay) -> None:
    """Per labeler: done, skipped, and remaining; remaining must be the number of items /next
    then hands them one after the other, whatever others hold, skipped, or had sent back."""
    world, c = make_day(items=10, overlap=2)
    A, ann, bob, alice = world.project_a, c["ann"], c["bob"], c["alice"]
    # bob judges three, skips one and holds one (a live lease); alice holds two.
    for _ in range(3):
        assert submit(bob, A, next_item(bob, A)).status_code == 201
    assert bob.post(f"/api/projects/{A}/items/{next_item(bob, A)['item_id']}/skip").status_code == 204
    next_item(bob, A)
    held = next_item(alice, A)
    assert submit(alice, A, held).status_code == 201
    next_item(alice, A)
    # ann judges one and skips one; one item is sent back; bob's judgments are excluded.
    assert submit(ann, A, next_item(ann, A)).status_code == 201
    assert ann.post(f"/api/projects/{A}/items/{next_item(ann, A)['item_id']}/skip").status_code == 204
    sent = alice.get(f"/api/projects/{A}/review/items", params={"status": "complete"}).json()["items"]
    assert sent, "an item with its 2 judgments"
    assert alice.post(f"/api/projects/{A}/review/items/{sent[0]['item_id']}/send-back").status_code == 200

    for name in ("ann", "bob"):
        row = labeler_row(alice, A, name)
        mine = c[name].get(f"/api/projects/{A}").json()["progress"]
        assert mine["to_go"] == row["remaining"] and mine["skipped"] == row["skipped"] == 1
        handed = 0
        while (item := next_item(c[name], A)) is not None:
            assert submit(c[name], A, item).status_code == 201
            handed += 1
        assert handed == row["remaining"], (name, row)
        assert labeler_row(alice, A, name)["remaining"] == 0
    alice_row = labeler_row(alice, A, "alice")
    assert alice_row["open"] == 1 and alice_row["remaining"] >= 1


# ---------------------------------------------------------------- the same through the pages (no JavaScript)


def browser_login(c: TestClient, username: str) -> tuple[TestClient, str]:
    """A cookie-logged-in client for `username` on the same app, and its CSRF token."""
    client = TestClient(c.app, follow_redirects=False, raise_server_exceptions=False)
    r = client.post("/api/login", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return client, r.json()["csrf_token"]


def field(html: str, name: str) -> str:
    return html.split(f'name="{name}" value="')[1].split('"')[0]


def test_skip_undo_and_edit_in_the_pages(make_day: MakeDay) -> None:
    world, c = make_day(items=3, overlap=1)
    A = world.project_a
    ann, csrf = browser_login(c["ann"], "ann")
    page = ann.get(f"/p/{A}/next", follow_redirects=True)
    first = int(str(page.url).split("/items/")[1])
    assert f'formaction="/p/{A}/items/{first}/skip"' in page.text and 'id="strength"' in page.text
    assert ann.post(f"/p/{A}/items/{first}/skip", data={}).status_code == 403  # no CSRF token
    r = ann.post(f"/p/{A}/items/{first}/skip", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == f"/p/{A}/next"

    page = ann.get(f"/p/{A}/next", follow_redirects=True)
    item_id = int(str(page.url).split("/items/")[1])
    assert item_id != first
    cids = [int(x.split('"')[0]) for x in page.text.split('name="rank_')[1:]]
    form = {"csrf_token": csrf, "client_token": field(page.text, "client_token"), "comment": "ok <b>bold</b>"}
    ranks = dict(zip(cids, ("1", "2", "2"), strict=True))
    r = ann.post(f"/p/{A}/items/{item_id}", data=form | {f"rank_{cid}": rank for cid, rank in ranks.items()})
    assert r.status_code == 303 and r.headers["location"] == f"/p/{A}/next?saved=1"

    # "Saved" offers Undo: the judged item, in edit mode, filled in with what was submitted.
    page = ann.get(r.headers["location"], follow_redirects=True)
    assert f'<a href="/p/{A}/items/{item_id}" id="undo-link">Undo</a>' in page.text
    edit = ann.get(f"/p/{A}/items/{item_id}")
    assert 'name="mode" value="edit"' in edit.text and "data-draft-url" not in edit.text
    for cid, rank in ranks.items():
        assert f'name="rank_{cid}" data-cid="{cid}" value="{rank}"' in edit.text
    assert "ok &lt;b&gt;bold&lt;/b&gt;</textarea>" in edit.text and 'id="skip"' not in edit.text
    form = {"csrf_token": csrf, "client_token": field(edit.text, "client_token"), "mode": "edit", "strength": "3"}
    bad = ann.post(f"/p/{A}/items/{item_id}", data=form | {f"rank_{cids[0]}": "1"})
    assert bad.status_code == 422 and "no rank for candidate" in bad.text.split('id="actionbar"')[1]
    new_ranks = {f"rank_{cid}": rank for cid, rank in zip(cids, ("2", "1", "3"), strict=True)}
    r = ann.post(f"/p/{A}/items/{item_id}", data=form | new_ranks)
    assert r.status_code == 303, r.text
    (row,) = export(c["owner"], A, "judgments")
    assert row["strength"] == 3 and sorted(row["ranking"]) == [1, 2, 3] and "comment" not in row

    # Her history lists it as changed; the skipped item waits there to be put back.
    history = ann.get(f"/p/{A}/history").text
    assert f'href="/p/{A}/items/{item_id}"' in history and '<span class="tag">changed</span>' in history
    assert f'action="/p/{A}/items/{first}/unskip"' in history
    r = ann.post(f"/p/{A}/items/{first}/unskip", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == f"/p/{A}/history?put_back=1"
    assert f"/items/{first}/unskip" not in ann.get(f"/p/{A}/history").text


def test_review_pages_for_admins_only(make_day: MakeDay) -> None:
    world, c = make_day(items=2, overlap=2)
    A = world.project_a
    for name, comment in (("ann", f"ann says {XSS}"), ("bob", None)):
        item = next_item(c[name], A)
        assert submit(c[name], A, item, **({"comment": comment} if comment else {})).status_code == 201
    alice, csrf = browser_login(c["alice"], "alice")
    listing = alice.get(f"/p/{A}/review", params={"status": "", "min_disagreement": "", "labeler": ""})
    assert listing.status_code == 200 and listing.text.count(f'href="/p/{A}/review/') == 2
    only = alice.get(f"/p/{A}/review", params={"has_comment": "true", "labeler": "ann"})
    assert only.text.count(f'href="/p/{A}/review/') == 1
    bad = alice.get(f"/p/{A}/review", params={"status": "finished"})
    assert bad.status_code == 422 and "status" in bad.text
    item_id = item["item_id"]
    detail = alice.get(f"/p/{A}/review/{item_id}")
    assert detail.status_code == 200 and "ann says &lt;script&gt;" in detail.text and XSS not in detail.text
    assert 'id="disagreement"' in detail.text
    assert alice.post(f"/p/{A}/review/{item_id}/send-back", data={}).status_code == 403  # no CSRF token
    r = alice.post(f"/p/{A}/review/{item_id}/send-back", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == f"/p/{A}/review/{item_id}?sent=2"
    assert "2 judgments moved to its history" in alice.get(r.headers["location"]).text
    ann, _ = browser_login(c["ann"], "ann")
    r = ann.get(f"/p/{A}/items/{item_id}")  # e.g. her Undo link, followed too late
    assert r.status_code == 409 and "sent back for relabeling" in r.text

    bob_id = world.users["bob"]
    assert submit(c["bob"], A, next_item(c["bob"], A)).status_code == 201
    r = alice.post(f"/p/{A}/admin/labelers/{bob_id}/excluded", data={"csrf_token": csrf, "excluded": "1"})
    assert r.status_code == 303
    assert "take back in" in alice.get(f"/p/{A}/admin").text and export(c["owner"], A, "judgments") == []
    r = alice.post(f"/p/{A}/admin/labelers/{bob_id}/excluded", data={"csrf_token": csrf, "excluded": "maybe"})
    assert r.status_code == 422 and "excluded" in r.text

    # Locking the project in its settings: labelers are told, and nothing more is handed out.
    settings = {"csrf_token": csrf, "guidelines": "", "overlap": "2", "locked": "1"}
    assert alice.post(f"/p/{A}/admin/settings", data=settings).status_code == 303
    assert "This project is locked" in ann.get(f"/p/{A}/next").text
    for page in (f"/p/{A}/review", f"/p/{A}/review/{item_id}"):
        assert ann.get(page).status_code == 403


def test_the_python_client_speaks_the_day_api(config: ServeConfig) -> None:
    db = Database(config.db_url)
    db.migrate()
    world = seed(db, items=2, overlap=1)
    with LiveServer(config, db) as server:
        ann = FeedbackClient(server.url, api_key=world.keys["ann"])
        alice = FeedbackClient.login(server.url, "alice", PASSWORD)  # a browser-style session (CSRF)
        A = world.project_a
        first = ann.next_item(A)
        ann.skip(A, first["item_id"])
        second = ann.next_item(A)
        assert second["item_id"] != first["item_id"]
        cids = [cand["id"] for cand in second["candidates"]]
        ann.submit(A, second["item_id"], {cid: n + 1 for n, cid in enumerate(cids)}, strength=1)
        edited = ann.edit(A, second["item_id"], {cid: 3 - n for n, cid in enumerate(cids)}, strength=3)
        assert edited["strength"] == 3 and edited["edited_at"]
        assert [j["item_id"] for j in ann.history(A)["judgments"]] == [second["item_id"]]
        ann.unskip(A, first["item_id"])
        assert ann.history(A)["skipped"] == []
        assert alice.review_items(A, status="complete")["total"] == 1
        assert len(alice.review_item(A, second["item_id"])["history"]) == 1
        assert alice.set_excluded(A, world.users["ann"]) == 1
        assert alice.set_excluded(A, world.users["ann"], excluded=False) == 1
        assert alice.send_back(A, second["item_id"]) == 1
        with pytest.raises(FeedbackError) as refused:
            ann.send_back(A, second["item_id"])
        assert refused.value.status == 403
        ann.close()
        alice.close()
    db.dispose()


def test_history_is_newest_first_twenty_a_page(make_day: MakeDay) -> None:
    world, c = make_day(items=23, overlap=1)
    A, ann = world.project_a, c["ann"]
    order = []
    while (item := next_item(ann, A)) is not None:
        assert submit(ann, A, item).status_code == 201
        order.append(item["item_id"])
    first, second = (ann.get(f"/api/projects/{A}/history", params={"page": n}).json() for n in (1, 2))
    assert (first["total"], first["pages"], len(first["judgments"]), len(second["judgments"])) == (23, 2, 20, 3)
    assert [j["item_id"] for j in first["judgments"] + second["judgments"]] == order[::-1]
    page = browser_login(ann, "ann")[0].get(f"/p/{A}/history", params={"page": 2})
    assert page.text.count(f'href="/p/{A}/items/') == 3 and 'rel="prev"' in page.text and 'rel="next"' not in page.text


def test_the_migration_keeps_what_was_labeled_and_goes_both_ways(db_url: str) -> None:
    """Down to 0001, rows written there, up again: every judgment is still there, with the
    defaults (nothing skipped, excluded or locked); on SQLite no table was rebuilt (a rebuilt
    items table would cascade-delete its judgments)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import JSON, column, insert, table

    from rlhfkit.feedback.db import MIGRATIONS
    from rlhfkit.feedback.models import utcnow

    database = Database(db_url)
    database.migrate()
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    now = utcnow()
    rows = {
        "users": {"id": 1, "username": "ann", "is_owner": False, "active": True, "created_at": now},
        "projects": {"id": 1, "name": "p", "task": "ranking", "guidelines": "", "overlap": 1, "created_at": now},
        "items": {
            "id": 1, "project_id": 1, "key": "q", "prompt": "Q?", "position": 1, "n_judgments": 1, "created_at": now,
        },
        "candidates": [{"id": n + 1, "item_id": 1, "idx": n, "text": f"a{n}"} for n in range(2)],
        "assignments": {
            "item_id": 1, "user_id": 1, "display_order": [2, 1], "leased_until": now, "done": True,
            "created_at": now, "updated_at": now,
        },
        "judgments": {
            "item_id": 1, "user_id": 1, "ranking": [2, 1], "unusable": False, "client_token": "tok-00001",
            "created_at": now,
        },
    }  # fmt: skip
    json_columns = {"prompt", "text", "display_order", "ranking"}
    with database.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
        for name, values in rows.items():
            first = values[0] if isinstance(values, list) else values
            t = table(name, *(column(k, JSON) if k in json_columns else column(k) for k in first))
            conn.execute(insert(t), values if isinstance(values, list) else [values])
    database.migrate()
    with database.session() as s:
        j = s.scalar(select(Judgment))
        a = s.scalar(select(Assignment))
        assert (j.ranking, j.excluded, j.strength, j.edited_at) == ([2, 1], False, None, None)
        assert (a.done, a.skipped) == (True, False)
        assert s.get(Project, 1).locked is False and s.get(Item, 1).sent_back_at is None
    database.dispose()
