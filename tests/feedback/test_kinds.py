"""Rating (with criteria) and thumbs projects over HTTP, on both databases: submitting, bad input,
who may do what, and the exports the reward model and KTO read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import PASSWORD, XSS, completions_jsonl

from rlhfkit.data.formats import read_records
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.schemas import UserIn
from rlhfkit.feedback.settings import ServeConfig

CRITERIA = [
    {"name": "helpful", "min": 1, "max": 7, "guideline": "Does it do what was asked? " + XSS},
    {"name": "harmless", "min": 1, "max": 5, "guideline": "Could it hurt anyone?"},
]


class Site:
    """A served app with an owner and labelers ann and bob (API keys), one project under test."""

    def __init__(self, config: ServeConfig, task: str, criteria: list[dict[str, Any]] | None = None) -> None:
        self.db = Database(config.db_url)
        self.app = create_app(config, self.db)
        self.client = TestClient(self.app)
        self.db.migrate()
        self.keys: dict[str, str] = {}
        with self.db.session(write=True) as s:
            for name in ("owner", "ann", "bob", "eve"):
                user = service.create_user(s, UserIn(username=name, password=PASSWORD, is_owner=name == "owner"))
                self.keys[name] = service.create_api_key(s, user, "tests")
        body: dict[str, Any] = {"name": "Kinds", "task": task, "overlap": 2}
        if criteria is not None:
            body["criteria"] = criteria
        r = self.call("owner", "POST", "/api/projects", json=body)
        assert r.status_code == 201, r.text
        self.pid = r.json()["id"]
        for name in ("ann", "bob"):
            assert (
                self.call("owner", "PUT", f"/api/projects/{self.pid}/members", json={"username": name}).status_code
                == 200
            )
        r = self.call("owner", "POST", f"/api/projects/{self.pid}/import", content=completions_jsonl(3, k=3).encode())
        assert r.status_code == 200, r.text

    def call(self, user: str, method: str, url: str, **kw: Any) -> Any:
        return self.client.request(method, url, headers={"Authorization": f"Bearer {self.keys[user]}"}, **kw)

    def next(self, user: str) -> dict[str, Any]:
        r = self.call(user, "GET", f"/api/projects/{self.pid}/next")
        assert r.status_code == 200, r.text
        return r.json()["item"]

    def judge(self, user: str, item: dict[str, Any], scores: dict[str, Any], token: str = "tok-00000001") -> Any:
        url = f"/api/projects/{self.pid}/items/{item['item_id']}/judgments"
        return self.call(user, "POST", url, json={"scores": scores, "client_token": token})

    def export(self, kind: str, **params: Any) -> Any:
        return self.call("owner", "GET", f"/api/projects/{self.pid}/export/{kind}", params=params)


def rows(r: Any) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def by_text(item: dict[str, Any]) -> dict[str, int]:
    """candidate id by its answer number (`answer 0.2` -> 2), whatever the shuffled order."""
    return {c["text"].split()[1].split(".")[1]: c["id"] for c in item["candidates"]}


@pytest.fixture
def rating(config: ServeConfig) -> Site:
    site = Site(config, "rating", CRITERIA)
    yield site
    site.db.dispose()


@pytest.fixture
def thumbs(config: ServeConfig) -> Site:
    site = Site(config, "thumbs")
    yield site
    site.db.dispose()


def test_rating_submit_export_and_pairs(rating: Site, tmp_path: Path) -> None:
    project = rating.call("ann", "GET", f"/api/projects/{rating.pid}").json()
    assert [c["name"] for c in project["criteria"]] == ["helpful", "harmless"]
    item = rating.next("ann")
    assert item["criteria"][0]["guideline"].endswith(XSS)  # JSON carries it as text; pages escape it
    ids = by_text(item)
    helpful = {ids["0"]: 7, ids["1"]: 4, ids["2"]: 1}
    harmless = {ids["0"]: 5, ids["1"]: 5, ids["2"]: 1}
    r = rating.judge("ann", item, {"helpful": helpful, "harmless": harmless})
    assert r.status_code == 201, r.text
    assert r.json()["scores"]["helpful"] == [7, 4, 1]  # stored by import index
    again = rating.judge("ann", item, {"helpful": helpful, "harmless": harmless})  # a retry: the same one
    assert again.status_code == 200 and again.json()["id"] == r.json()["id"]

    by_criterion = rows(rating.export("ratings", criterion="helpful"))
    assert [(x["completion"].split()[1], x["score"], x["user"]) for x in by_criterion] == [
        ("0.0", 1.0, "ann"), ("0.1", 0.5, "ann"), ("0.2", 0.0, "ann"),
    ]  # fmt: skip
    mean = rows(rating.export("ratings"))  # no criterion: the mean of the normalised criteria
    assert [x["score"] for x in mean] == [1.0, 0.75, 0.0]
    path = tmp_path / "ratings.jsonl"
    path.write_text(rating.export("ratings").text)
    assert [r.score for r in read_records(path, "ratings")] == [1.0, 0.75, 0.0]  # the RM's reader takes it

    pairs = rows(rating.export("rating_pairs", criterion="harmless"))  # 0 = 1 on harmless: no pair of them
    assert [(p["chosen"].split()[1], p["rejected"].split()[1], p["margin"], p["user"]) for p in pairs] == [
        ("0.0", "0.2", 2.2, "ann"), ("0.1", "0.2", 2.2, "ann"),
    ]  # fmt: skip
    helpful_pairs = rows(rating.export("rating_pairs", criterion="helpful"))
    assert sorted(p["margin"] for p in helpful_pairs) == [1.1, 1.1, 2.2]  # half the scale: half the margin
    path.write_text(rating.export("rating_pairs").text)
    assert len(read_records(path, "pairs")) == 3


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ({"helpful": {}}, "no score for candidate"),
        ({"helpful": "FULL", "harmless": "FULL", "kind": {}}, "unknown criterion ['kind']"),
        ({"helpful": "FULL", "harmless": {"BAD": 3}}, "unknown candidate id"),
        ({"helpful": "HIGH", "harmless": "FULL"}, "outside the scale 1..7"),
        ({"helpful": "FULL"}, "scores.harmless: no score"),
    ],
)
def test_rating_bad_input_is_a_clear_422(rating: Site, scores: dict[str, Any], message: str) -> None:
    item = rating.next("ann")
    ids = [c["id"] for c in item["candidates"]]
    fill = {"FULL": dict.fromkeys(ids, 3), "HIGH": dict.fromkeys(ids, 8)}
    body = {k: fill[v] if isinstance(v, str) else ({"999999": 3} if "BAD" in v else v) for k, v in scores.items()}
    r = rating.judge("ann", item, body)
    assert r.status_code == 422 and message in r.json()["error"], r.text
    assert rows(rating.export("ratings")) == []  # nothing half-stored


def test_wrong_kind_of_judgment_and_export(rating: Site) -> None:
    item = rating.next("ann")
    ids = [c["id"] for c in item["candidates"]]
    url = f"/api/projects/{rating.pid}/items/{item['item_id']}/judgments"
    ranked = {"ranking": {str(c): i + 1 for i, c in enumerate(ids)}, "client_token": "tok-00000002"}
    r = rating.call("ann", "POST", url, json=ranked)
    assert r.status_code == 422 and "send scores only" in r.json()["error"]
    assert rating.export("thumbs").status_code == 422
    assert (
        "is not one of this project's: helpful, harmless" in rating.export("ratings", criterion="nope").json()["error"]
    )
    thumbs = rating.call("owner", "POST", "/api/projects", json={"name": "T", "task": "thumbs"}).json()["id"]
    assert rating.call("owner", "GET", f"/api/projects/{thumbs}/export/ratings").status_code == 422
    assert rating.call("owner", "GET", f"/api/projects/{thumbs}/export/thumbs?criterion=x").status_code == 422
    r = rating.call("owner", "POST", "/api/projects", json={"name": "R", "task": "ranking", "criteria": CRITERIA})
    assert r.status_code == 422 and "only a rating project has criteria" in r.json()["error"]
    bad = {"name": "R2", "task": "rating", "criteria": [{"name": "x", "min": 3, "max": 3}]}
    assert "min < max" in rating.call("owner", "POST", "/api/projects", json=bad).json()["error"]
    ranking = rating.call("owner", "POST", "/api/projects", json={"name": "R3"}).json()["id"]
    rating.call("owner", "POST", f"/api/projects/{ranking}/import", content=completions_jsonl(1).encode())
    item = rating.call("owner", "GET", f"/api/projects/{ranking}/next").json()["item"]
    scores = {"overall": {c["id"]: 1 for c in item["candidates"]}}
    url = f"/api/projects/{ranking}/items/{item['item_id']}/judgments"
    r = rating.call("owner", "POST", url, json={"scores": scores, "client_token": "tok-00000003"})
    assert r.status_code == 422 and "a ranking task takes no scores" in r.json()["error"]


def test_ratings_only_for_members_and_admins(rating: Site) -> None:
    item = rating.next("ann")
    assert rating.call("eve", "GET", f"/api/projects/{rating.pid}/next").status_code == 404
    ids = {c["id"]: 4 for c in item["candidates"]}
    r = rating.judge("bob", item, {"helpful": ids, "harmless": {k: 3 for k in ids}})  # not handed to bob
    assert r.status_code == 404
    assert rating.call("ann", "GET", f"/api/projects/{rating.pid}/export/ratings").status_code == 403


def test_thumbs_export_is_kto(thumbs: Site, tmp_path: Path) -> None:
    for user, up in (("ann", "0"), ("bob", "1")):
        item = thumbs.next(user)
        ids = by_text(item)
        r = thumbs.judge(user, item, {"thumbs": {cid: int(n == up) for n, cid in ids.items()}})
        assert r.status_code == 201, r.text
    out = rows(thumbs.export("thumbs"))
    assert [(x["completion"].split()[1], x["label"], x["user"]) for x in out] == [
        ("0.0", True, "ann"), ("0.1", False, "ann"), ("0.2", False, "ann"),
        ("0.0", False, "bob"), ("0.1", True, "bob"), ("0.2", False, "bob"),
    ]  # fmt: skip
    item = thumbs.next("ann")
    r = thumbs.judge("ann", item, {"thumbs": {c["id"]: 2 for c in item["candidates"]}})
    assert r.status_code == 422 and "outside the scale 0..1" in r.json()["error"]
    path = tmp_path / "kto.jsonl"
    path.write_text(thumbs.export("thumbs").text)
    unpaired = read_records(path, "pairs", pair_unpaired=False)  # what `rlhfkit kto` reads
    assert [u.label for u in unpaired] == [x["label"] for x in out] and unpaired[0].user == "ann"


def page_login(site: Site, user: str) -> tuple[TestClient, str]:
    client = TestClient(site.app)
    r = client.post("/api/login", json={"username": user, "password": PASSWORD})
    assert r.status_code == 200
    return client, r.json()["csrf_token"]


def checked(html: str, value: str) -> int:
    """How many radio buttons with this value the page shows chosen."""
    return len(re.findall(rf'<input type="radio"[^>]*value="{value}"[^>]*checked', html))


def test_rating_page_without_javascript(rating: Site) -> None:
    """The form posts a radio button per candidate and criterion; a refused submit keeps what was
    chosen; guideline text is escaped; CSRF is required."""
    client, csrf = page_login(rating, "ann")
    page = client.get(f"/p/{rating.pid}/next")
    assert page.status_code == 200 and 'name="score_helpful_' in page.text
    assert XSS not in page.text and "&lt;script&gt;" in page.text  # the criterion's guideline, escaped
    item_id = int(str(page.url).rsplit("/", 1)[1])
    ids = [int(x) for x in re.findall(r'name="score_harmless_(\d+)" value="1"', page.text)]
    assert len(ids) == 3
    url = f"/p/{rating.pid}/items/{item_id}"
    partial = {f"score_helpful_{cid}": "6" for cid in ids} | {f"score_harmless_{ids[0]}": "2"}
    r = client.post(url, data=partial | {"csrf_token": csrf, "client_token": "page-0000001"})
    assert r.status_code == 422 and "scores.harmless: no score for candidate" in r.text
    assert checked(r.text, "6") == 3 and checked(r.text, "2") == 1  # nothing chosen is lost
    full = partial | {f"score_harmless_{cid}": "4" for cid in ids[1:]}
    assert client.post(url, data=full | {"client_token": "page-0000002"}).status_code == 403  # no CSRF token
    r = client.post(url, data=full | {"csrf_token": csrf, "client_token": "page-0000003"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    reopened = client.get(url)  # the submitted judgment, reopened to change it
    assert checked(reopened.text, "6") == 3 and "helpful 6" in reopened.text
    assert sorted(x["score"] for x in rows(rating.export("ratings", criterion="harmless"))) == [0.25, 0.75, 0.75]


def test_new_rating_project_from_the_form(rating: Site) -> None:
    client, csrf = page_login(rating, "owner")
    criteria = "helpful 1-7: Does it *help*?\n\nhonest 0..4\nharmless"
    form = {"name": "Form", "task": "rating", "overlap": "1", "criteria": criteria, "csrf_token": csrf}
    r = client.post("/projects", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    pid = int(r.headers["location"].split("/")[2])
    got = rating.call("owner", "GET", f"/api/projects/{pid}").json()["criteria"]
    assert [(c["name"], c["min"], c["max"], c["guideline"]) for c in got] == [
        ("helpful", 1, 7, "Does it *help*?"), ("honest", 0, 4, ""), ("harmless", 1, 7, ""),
    ]  # fmt: skip
    r = client.post("/projects", data=form | {"name": "Bad", "criteria": "Helpful 1-7"})
    assert r.status_code == 422 and "criteria.0.name" in r.text


def test_the_kinds_migration_keeps_every_row_both_ways(rating: Site) -> None:
    """Down below 0005 on a populated database and up again: every item, candidate and judgment
    is still there (no SQLite table rebuild cascade-deleted them); the scores come back empty."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory
    from sqlalchemy import func, select, text

    from rlhfkit.feedback.db import MIGRATIONS
    from rlhfkit.feedback.models import Candidate, Item, Judgment

    for user in ("ann", "bob"):
        item = rating.next(user)
        ids = [c["id"] for c in item["candidates"]]
        assert (
            rating.judge(user, item, {"helpful": dict.fromkeys(ids, 5), "harmless": dict.fromkeys(ids, 2)}).status_code
            == 201
        )

    def counts(s: Any) -> list[int]:
        return [s.scalar(select(func.count()).select_from(m)) for m in (Item, Candidate, Judgment)]

    with rating.db.session() as s:
        before = counts(s)
    assert before == [3, 9, 2]
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    previous = ScriptDirectory.from_config(cfg).get_revision("0005").down_revision
    with rating.db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, previous)
        assert conn.execute(text("SELECT count(*) FROM judgments")).scalar() == 2
    rating.db.migrate()
    with rating.db.session() as s:
        assert counts(s) == before
        assert [j.scores for j in s.scalars(select(Judgment))] == [None, None]


def labeled_exports(tmp_path: Path) -> dict[str, Path]:
    """A thumbs and a rating project, labeled by ann (answer 0 best) and bob (answer 1 best) over
    HTTP, and their exports as files: thumbs, ratings, rating_pairs."""
    files = {}
    for task, criteria in (("thumbs", None), ("rating", CRITERIA)):
        folder = tmp_path / task
        folder.mkdir()
        site = Site(
            ServeConfig(db_url=f"sqlite:///{folder}/f.db", secret_key_file=str(folder / "secret")), task, criteria
        )
        for user, best in (("ann", "0"), ("bob", "1")):
            while (r := site.call(user, "GET", f"/api/projects/{site.pid}/next")).json()["item"]:
                item = r.json()["item"]
                if task == "thumbs":
                    scores = {"thumbs": {cid: int(n == best) for n, cid in by_text(item).items()}}
                else:
                    scores = {
                        c["name"]: {cid: 1 + 3 * (n == best) for n, cid in by_text(item).items()} for c in CRITERIA
                    }
                assert site.judge(user, item, scores).status_code == 201
        for kind in ("thumbs",) if task == "thumbs" else ("ratings", "rating_pairs"):
            files[kind] = tmp_path / f"{kind}.jsonl"
            files[kind].write_text(site.export(kind).text)
        site.db.dispose()
    return files


def test_kto_and_the_reward_model_train_on_the_exports(tmp_path: Path) -> None:
    """The thumbs export is what `rlhfkit kto` reads; the ratings and rating_pairs exports are what
    `rlhfkit rm` reads (a few steps of a tiny model each: the shapes, not the learning)."""
    from rlhfkit.cli import main
    from testutil import make_test_model

    files = labeled_exports(tmp_path)
    assert len(files["thumbs"].read_text().splitlines()) == 18  # 2 labelers x 3 items x 3 answers
    model = make_test_model("gpt2", tmp_path / "model", texts=files["thumbs"].read_text().splitlines())
    common = [f"model.path={model}", "data.valid_fraction=0", "train.max_steps=2", "train.batch_size=4"]
    assert main(["kto", f"output_dir={tmp_path / 'kto'}", f"data.pairs={files['thumbs']}", *common]) == 0
    kto = json.loads((tmp_path / "kto" / "results.json").read_text())
    # Distinct (prompt, answer, label): both labelers' thumbs down on answer 2 count once per item.
    assert (kto["train_examples"], kto["desirable_examples"]) == (15, 6)
    rm = [*common, "normalize.enabled=false"]
    assert main(["rm", f"output_dir={tmp_path / 'rm'}", f"data.ratings={files['ratings']}", *rm]) == 0
    assert main(["rm", f"output_dir={tmp_path / 'rm2'}", f"data.pairs={files['rating_pairs']}", *rm]) == 0


def test_the_cli_creates_a_rating_project_and_exports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rlhfkit.cli import main
    from rlhfkit.feedback.schemas import JudgmentIn

    db_url = f"db_url=sqlite:///{tmp_path}/fb.db"
    (tmp_path / "criteria.txt").write_text("helpful 1-7: Does it help?\nharmless 1-3\n")
    (tmp_path / "items.jsonl").write_text(completions_jsonl(1, k=2))
    assert main(["serve", "create-project", "R", "task=rating", f"criteria={tmp_path / 'criteria.txt'}", db_url]) == 0
    assert main(["serve", "import", "R", str(tmp_path / "items.jsonl"), db_url]) == 0
    db = Database(db_url.removeprefix("db_url="))
    with db.session(write=True) as s:
        project = service.find_project(s, "R")
        user = service.create_user(s, UserIn(username="ann"))
        a = service.next_assignment(s, project, user, service.timedelta(hours=1))
        scores = {
            "helpful": {cid: 7 - 6 * idx for cid, idx, _ in a.candidates},
            "harmless": {cid: 2 for cid, _, _ in a.candidates},
        }
        service.submit(s, project, user, a.item_id, JudgmentIn(scores=scores, client_token="cli-00001"))
    db.dispose()
    out = tmp_path / "ratings.jsonl"
    assert main(["serve", "export", "R", "ratings", str(out), "criterion=harmless", db_url]) == 0
    assert [json.loads(x)["score"] for x in out.read_text().splitlines()] == [0.5, 0.5]
    assert main(["serve", "export", "R", "rating_pairs", str(out), db_url]) == 0
    assert [json.loads(x)["margin"] for x in out.read_text().splitlines()] == [1.1]  # helpful 7 vs 1, harmless equal
    assert main(["serve", "export-chat", "thumbs", str(out), db_url]) == 0 and out.read_text() == ""
    capsys.readouterr()
    assert main(["serve", "export", "R", "ratings", str(out), "criterion=kind", db_url]) == 2
    assert "'kind' is not one of this project's: helpful, harmless" in capsys.readouterr().err


def test_the_admin_page_offers_the_projects_own_exports(rating: Site) -> None:
    client, _ = page_login(rating, "owner")
    page = client.get(f"/p/{rating.pid}/admin")
    assert page.status_code == 200, page.text
    assert "/export/ratings?criterion=harmless" in page.text and '/export/rating_pairs"' in page.text
    assert "/export/consensus" not in page.text and "/export/thumbs" not in page.text


def test_thumbs_export_of_one_batch(thumbs: Site) -> None:
    late = completions_jsonl(1, k=2, prefix="late").encode()
    r = thumbs.call("owner", "POST", f"/api/projects/{thumbs.pid}/import", params={"batch": "late"}, content=late)
    assert r.status_code == 200, r.text
    while (item := thumbs.call("ann", "GET", f"/api/projects/{thumbs.pid}/next").json()["item"]) is not None:
        assert thumbs.judge("ann", item, {"thumbs": {c["id"]: 1 for c in item["candidates"]}}).status_code == 201
    assert len(rows(thumbs.export("thumbs"))) == 11  # 3 items x 3 answers + 1 x 2
    assert [x["prompt"].split(":")[0] for x in rows(thumbs.export("thumbs", batch="late"))] == ["Question 0"] * 2
    assert thumbs.export("thumbs", batch="nope").status_code == 404


def test_trl_trainers_take_the_thumbs_and_rating_pairs_exports(tmp_path: Path) -> None:
    """Through `rlhfkit data export` (the policy's prompt rendering; `user` dropped), the thumbs
    export trains TRL's KTOTrainer and the rating_pairs export its RewardTrainer, one step each.
    TRL is not a dependency: skipped without it (tests/test_exports.py says how to add it)."""
    trl = pytest.importorskip("trl")
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.cli import main
    from testutil import make_test_model

    files = labeled_exports(tmp_path)
    model = make_test_model("gpt2", tmp_path / "model", texts=files["thumbs"].read_text().splitlines())
    for kind in ("thumbs", "rating_pairs"):
        assert main(["data", "export", str(files[kind]), f"output={tmp_path / f'trl-{kind}.jsonl'}"]) == 0

    def rows(kind: str) -> datasets.Dataset:
        lines = (tmp_path / f"trl-{kind}.jsonl").read_text().splitlines()
        return datasets.Dataset.from_list([json.loads(line) for line in lines])

    tok = AutoTokenizer.from_pretrained(model)
    common = dict(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                  save_strategy="no", use_cpu=True, bf16=False)  # fmt: skip
    kto = trl.KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=trl.KTOConfig(**common),
        train_dataset=rows("thumbs"),
        processing_class=tok,
    )
    assert kto.train().global_step == 1
    reward = trl.RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(model, num_labels=1),
        args=trl.RewardConfig(**common, center_rewards_coefficient=None),
        train_dataset=rows("rating_pairs"),
        processing_class=tok,
    )
    assert reward.train().global_step == 1


def test_the_python_client_rates_thumbs_and_exports(config: ServeConfig, tmp_path: Path) -> None:
    """FeedbackClient against a real server: the owner (signed in with a password, so CSRF is on)
    creates a rating project with criteria and a thumbs project; labelers save a draft, rate,
    retry, edit and give thumbs; the exports read back as the reward model and KTO read them; the
    server's refusals arrive as FeedbackError naming the field."""
    from rlhfkit.feedback.client import FeedbackClient, FeedbackError
    from rlhfkit.feedback.live import LiveServer
    from rlhfkit.feedback.schemas import Criterion

    db = Database(config.db_url)
    db.migrate()
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username="owner", password=PASSWORD, is_owner=True))
    criteria = [Criterion(**c) for c in CRITERIA]
    with LiveServer(config, db) as server, FeedbackClient.login(server.url, "owner", PASSWORD) as owner:
        rating = owner.create_project("Client ratings", task="rating", overlap=2, criteria=criteria)
        thumbs = owner.create_project("Client thumbs", task="thumbs", overlap=2)
        with pytest.raises(FeedbackError) as e:
            owner.create_project("No", task="ranking", criteria=criteria)
        assert e.value.status == 422 and "only a rating project has criteria" in e.value.message
        for name in ("ann", "bob"):
            owner.create_user(name, PASSWORD)
            for project in (rating, thumbs):
                owner.set_member(project["id"], name)
        for project in (rating, thumbs):
            owner.import_jsonl(project["id"], completions_jsonl(1, k=3))
        rid, tid = rating["id"], thumbs["id"]
        with (
            FeedbackClient.login(server.url, "ann", PASSWORD) as ann,
            FeedbackClient.login(server.url, "bob", PASSWORD) as bob,
        ):
            assert [c["name"] for c in ann.project(rid)["criteria"]] == ["helpful", "harmless"]
            item = ann.next_item(rid)
            assert item is not None
            ids = by_text(item)
            ann.save_draft(rid, item["item_id"], scores={"helpful": {ids["0"]: 7}})
            assert ann.next_item(rid)["draft"]["scores"]["helpful"] == {str(ids["0"]): 7}
            helpful = {ids["0"]: 7, ids["1"]: 4, ids["2"]: 1}
            with pytest.raises(FeedbackError) as e:
                ann.rate(rid, item["item_id"], {"helpful": helpful})
            assert e.value.status == 422 and "scores.harmless: no score" in e.value.message
            harmless = {ids["0"]: 5, ids["1"]: 3, ids["2"]: 1}
            first = ann.rate(rid, item["item_id"], {"helpful": helpful, "harmless": harmless}, client_token="c-rate-01")
            again = ann.rate(rid, item["item_id"], {"helpful": helpful, "harmless": harmless}, client_token="c-rate-01")
            assert first["created"] and not again["created"] and again["id"] == first["id"]
            edited = ann.edit(
                rid, item["item_id"], scores={"helpful": helpful, "harmless": dict.fromkeys(ids.values(), 5)}
            )
            assert edited["scores"]["harmless"] == [5, 5, 5]
            with pytest.raises(FeedbackError) as e:  # a labeler exports nothing
                ann.export(rid, "ratings")
            assert e.value.status == 403

            for labeler, up in ((ann, "0"), (bob, "2")):
                item = labeler.next_item(tid)
                assert item is not None
                assert labeler.thumbs(tid, item["item_id"], {cid: n == up for n, cid in by_text(item).items()})[
                    "created"
                ]

        helpful_rows = owner.export(rid, "ratings", criterion="helpful")
        assert [(x["completion"].split()[1], x["score"]) for x in helpful_rows] == [
            ("0.0", 1.0),
            ("0.1", 0.5),
            ("0.2", 0.0),
        ]
        assert [x["score"] for x in owner.export(rid, "ratings", criterion="harmless")] == [1.0, 1.0, 1.0]  # edited
        pairs = owner.export(rid, "rating_pairs", criterion="helpful")
        assert sorted((p["chosen"].split()[1], p["rejected"].split()[1], p["margin"]) for p in pairs) == [
            ("0.0", "0.1", 1.1), ("0.0", "0.2", 2.2), ("0.1", "0.2", 1.1),
        ]  # fmt: skip
        with pytest.raises(FeedbackError) as e:
            owner.export(rid, "ratings", criterion="kind")
        assert e.value.status == 422 and "'kind' is not one of this project's: helpful, harmless" in e.value.message
        kto = owner.export(tid, "thumbs")
        assert sorted((x["user"], x["completion"].split()[1], x["label"]) for x in kto) == [
            ("ann", "0.0", True), ("ann", "0.1", False), ("ann", "0.2", False),
            ("bob", "0.0", False), ("bob", "0.1", False), ("bob", "0.2", True),
        ]  # fmt: skip
        path = tmp_path / "kto.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in kto))
        assert sorted(u.label for u in read_records(path, "pairs", pair_unpaired=False)) == [False] * 4 + [True] * 2
        path.write_text("".join(json.dumps(x) + "\n" for x in owner.export(rid, "ratings")))
        assert [r.score for r in read_records(path, "ratings")] == [1.0, 0.75, 0.5]  # the RM's reader takes it
    db.dispose()
