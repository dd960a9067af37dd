"""The chat page ("playground") over HTTP, on both databases, with a tiny model built from a
config: multi-turn context, 👍/👎, two answers and a pick, who may see what, bad input, a server
without a model, and the exports (thumbs as KTO records, picks as pairs) that training reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import PASSWORD, XSS

from rlhfkit.data.formats import read_records
from rlhfkit.feedback import chat, service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.playground import fingerprint
from rlhfkit.feedback.schemas import UserIn
from rlhfkit.feedback.settings import ServeConfig
from testutil import make_test_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = ["User: How do I make tea?\nAssistant: Boil water and steep the leaves.", "User: Hi\nAssistant: Hello!"]
    return make_test_model("gpt2", tmp_path_factory.mktemp("chat") / "policy", texts=texts * 4)


class Site:
    """A served app whose chat page talks to `model` ("" = none), with users owner, ann, eve."""

    def __init__(self, config: ServeConfig, model: str) -> None:
        config = config.model_copy(update={"chat_model": model, "chat_max_new_tokens": 6})
        self.db = Database(config.db_url)
        self.app = create_app(config, self.db)
        self.clients: dict[str, TestClient] = {}
        self.csrf: dict[str, str] = {}
        with self.db.session(write=True) as s:
            for name in ("owner", "ann", "eve"):
                service.create_user(s, UserIn(username=name, password=PASSWORD, is_owner=name == "owner"))
        for name in ("owner", "ann", "eve"):
            client = TestClient(self.app, follow_redirects=False)
            r = client.post("/api/login", json={"username": name, "password": PASSWORD})
            self.clients[name], self.csrf[name] = client, r.json()["csrf_token"]

    def call(self, user: str, method: str, url: str, **kw: Any) -> Any:
        return self.clients[user].request(method, url, headers={"X-CSRF-Token": self.csrf[user]}, **kw)


@pytest.fixture
def site(config: ServeConfig, tiny_model: Path) -> Iterator[Site]:
    s = Site(config, str(tiny_model))
    yield s
    s.db.dispose()


def test_a_conversation_thumbs_and_a_pick_become_training_data(site: Site, tiny_model: Path, tmp_path: Path) -> None:
    r = site.call("ann", "POST", "/api/chat", json={"content": f"How do I make tea? {XSS}"})
    assert r.status_code == 201, r.text
    conv = r.json()
    cid, answer = conv["id"], conv["messages"][1]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert (answer["model"], answer["fingerprint"]) == (str(tiny_model), fingerprint(tiny_model))
    assert (
        site.call("ann", "PUT", f"/api/chat/{cid}/messages/{answer['id']}/thumbs", json={"up": True}).status_code == 200
    )

    # The second turn asks for two answers; the conversation waits for the pick.
    r = site.call("ann", "POST", f"/api/chat/{cid}/messages", json={"content": "And with milk?", "two": True})
    assert r.status_code == 200, r.text
    pair = r.json()["messages"][3]
    assert pair["content"] is None and len(pair["candidates"]) == 2 and r.json()["waiting_pick"] == pair["id"]
    refused = site.call("ann", "POST", f"/api/chat/{cid}/messages", json={"content": "Hello?"})
    assert refused.status_code == 409 and "pick the better" in refused.json()["error"]
    assert (
        site.call("ann", "PUT", f"/api/chat/{cid}/messages/{pair['id']}/thumbs", json={"up": False}).status_code == 409
    )
    assert site.call("ann", "PUT", f"/api/chat/{cid}/messages/{pair['id']}/pick", json={"choice": 2}).status_code == 422
    picked = site.call("ann", "PUT", f"/api/chat/{cid}/messages/{pair['id']}/pick", json={"choice": 1})
    assert picked.status_code == 200 and picked.json()["messages"][3]["content"] == pair["candidates"][1]
    again = site.call("ann", "PUT", f"/api/chat/{cid}/messages/{pair['id']}/pick", json={"choice": 0})
    assert again.status_code == 409  # final: the conversation goes on from the picked answer

    # The third turn's context is the whole conversation, the picked answer included.
    with site.db.session() as s:
        stored = chat.own_conversation(s, service.get_user(s, "ann"), cid)
        context = chat.context(stored, "Thanks!")
    assert [m["role"] for m in context] == ["user", "assistant", "user", "assistant", "user"]
    assert context[3]["content"] == pair["candidates"][1] and context[-1]["content"] == "Thanks!"
    third = site.call("ann", "POST", f"/api/chat/{cid}/messages", json={"content": "Thanks!"})
    assert third.status_code == 200 and len(third.json()["messages"]) == 6
    down = third.json()["messages"][5]["id"]
    assert site.call("ann", "PUT", f"/api/chat/{cid}/messages/{down}/thumbs", json={"up": False}).status_code == 200

    listed = site.call("ann", "GET", "/api/chat").json()
    assert [(c["id"], c["turns"]) for c in listed["conversations"]] == [(cid, 3)]
    assert site.call("ann", "GET", "/api/chat/export/thumbs").status_code == 403  # the site owner's
    thumbs = [json.loads(x) for x in site.call("owner", "GET", "/api/chat/export/thumbs").text.splitlines()]
    assert [(len(t["prompt"]), t["label"], t["user"]) for t in thumbs] == [(1, True, "ann"), (5, False, "ann")]
    assert thumbs[0]["prompt"][0]["content"].endswith(XSS)
    pairs = [json.loads(x) for x in site.call("owner", "GET", "/api/chat/export/pairs").text.splitlines()]
    a, b = pair["candidates"]
    # Two identical samples (a tiny model can write them) prefer nothing: no pair.
    assert [(p["chosen"], p["rejected"], len(p["prompt"]), p["user"]) for p in pairs] == (
        [(b, a, 3, "ann")] if a.strip() != b.strip() else []
    )
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        site.call("owner", "GET", "/api/chat/export/pairs").text
        + site.call("owner", "GET", "/api/chat/export/thumbs").text
    )
    assert all(p.user == "ann" for p in read_records(path, "pairs"))  # what `rlhfkit rm` and `dpo` read
    path = tmp_path / "kto.jsonl"
    path.write_text(site.call("owner", "GET", "/api/chat/export/thumbs").text)
    assert [u.label for u in read_records(path, "pairs", pair_unpaired=False)] == [True, False]  # `rlhfkit kto`


def test_only_its_user_sees_a_conversation(site: Site) -> None:
    conv = site.call("ann", "POST", "/api/chat", json={"content": "A secret question", "two": True}).json()
    cid, mid = conv["id"], conv["messages"][1]["id"]
    for user in ("eve", "owner"):  # the site owner too: conversations are private
        assert site.call(user, "GET", f"/api/chat/{cid}").status_code == 404
        assert site.call(user, "GET", f"/chat/{cid}").status_code == 404
        assert site.call(user, "POST", f"/api/chat/{cid}/messages", json={"content": "hi"}).status_code == 404
        assert site.call(user, "PUT", f"/api/chat/{cid}/messages/{mid}/pick", json={"choice": 0}).status_code == 404
        form = {"csrf_token": site.csrf[user], "choice": "0"}
        assert site.clients[user].post(f"/chat/{cid}/messages/{mid}/pick", data=form).status_code == 404
        assert site.call(user, "GET", "/api/chat").json()["conversations"] == []
        assert "A secret question" not in site.call(user, "GET", "/chat").text
    anon = TestClient(site.app, follow_redirects=False)
    assert anon.get(f"/api/chat/{cid}").status_code == 401 and anon.get(f"/chat/{cid}").status_code == 303
    # A form post without its CSRF token is refused, and nothing is stored.
    assert site.clients["ann"].post(f"/chat/{cid}/messages/{mid}/pick", data={"choice": "0"}).status_code == 403
    assert site.call("ann", "GET", f"/api/chat/{cid}").json()["waiting_pick"] == mid


def test_the_chat_page_without_javascript(site: Site) -> None:
    client, csrf = site.clients["ann"], site.csrf["ann"]
    r = client.post("/chat", data={"csrf_token": csrf, "content": f"Tea? {XSS}"})
    assert r.status_code == 303, r.text
    page = client.get(r.headers["location"])
    assert page.status_code == 200 and XSS not in page.text and "Tea? &lt;script&gt;" in page.text
    cid = int(r.headers["location"].rsplit("/", 1)[1])
    mid = int(page.text.split(f"/chat/{cid}/messages/")[1].split("/")[0])
    assert client.post(f"/chat/{cid}/messages/{mid}/thumbs", data={"csrf_token": csrf, "up": "1"}).status_code == 303
    assert 'aria-pressed="true"' in client.get(f"/chat/{cid}").text
    assert client.post(f"/chat/{cid}/messages/{mid}/thumbs", data={"csrf_token": csrf, "up": "x"}).status_code == 422
    blank = client.post(f"/chat/{cid}", data={"csrf_token": csrf, "content": "   "})
    assert blank.status_code == 422 and "write a message first" in blank.text


def test_without_a_model_the_page_says_so(config: ServeConfig, tmp_path: Path) -> None:
    site = Site(config, "")
    page = site.clients["ann"].get("/chat")
    assert page.status_code == 200 and 'id="no-model"' in page.text and "chat_model=PATH" in page.text
    r = site.call("ann", "POST", "/api/chat", json={"content": "Hello?"})
    assert r.status_code == 503 and "no chat model is configured" in r.json()["error"]
    form = site.clients["ann"].post("/chat", data={"csrf_token": site.csrf["ann"], "content": "Keep me"})
    assert form.status_code == 422 and "Keep me</textarea>" in form.text  # what was typed is not lost
    site.db.dispose()
    missing = Site(config.model_copy(update={"db_url": f"sqlite:///{tmp_path}/m.db"}), str(tmp_path / "nowhere"))
    r = missing.call("ann", "POST", "/api/chat", json={"content": "Hello?"})
    assert r.status_code == 503 and "no model there" in r.json()["error"]
    missing.db.dispose()


def test_other_requests_stay_fast_while_the_model_writes(tiny_model: Path, tmp_path: Path) -> None:
    """The model loads and writes in the thread pool: requests that arrive meanwhile are answered
    at once, not after the answer (on the event loop they would all wait for it)."""
    import threading
    import time

    import httpx

    from rlhfkit.feedback.live import LiveServer

    config = ServeConfig(
        db_url=f"sqlite:///{tmp_path}/f.db",
        secret_key_file=str(tmp_path / "secret"),
        chat_model=str(tiny_model),
        chat_max_new_tokens=200,
        chat_max_prompt_tokens=32,
        chat_temperature=2.0,  # a flat distribution: EOS rarely ends the answer early
    )
    db = Database(config.db_url)
    db.migrate()
    with db.session(write=True) as s:
        key = service.create_api_key(s, service.create_user(s, UserIn(username="ann", password=PASSWORD)), "t")
    headers = {"Authorization": f"Bearer {key}"}
    with LiveServer(config, db) as server:
        done: dict[str, float] = {}

        def talk() -> None:
            start = time.perf_counter()
            r = httpx.post(
                f"{server.url}/api/chat", json={"content": "Tell me a long story."}, headers=headers, timeout=120
            )
            assert r.status_code == 201, r.text
            done["chat"] = time.perf_counter() - start

        writer = threading.Thread(target=talk)
        writer.start()
        latencies = []
        while writer.is_alive():
            start = time.perf_counter()
            assert httpx.get(f"{server.url}/api/me", headers=headers, timeout=60).status_code == 200
            latencies.append(time.perf_counter() - start)
        writer.join()
    db.dispose()
    typical = sorted(latencies)[len(latencies) // 2]
    print(f"chat answer in {done['chat']:.2f} s; {len(latencies)} requests meanwhile, median {typical:.3f} s")
    # On the event loop every request would wait for the whole answer: a few at most, each as slow.
    assert len(latencies) >= 3 and typical < done["chat"] / 4, (done, latencies)


def test_an_answer_to_a_conversation_that_moved_on_is_refused(config: ServeConfig) -> None:
    """Two tabs send at once: the second answer was written for a conversation that has changed
    since, so it is refused (409) instead of being stored out of place."""
    from rlhfkit.feedback.playground import Answer

    site = Site(config, "")
    answer = Answer(["Hello!"], "policy", "0123456789abcdef")
    with site.db.session(write=True) as s:
        ann = service.get_user(s, "ann")
        cid = chat.add_turn(s, ann, None, 0, "Hi", answer).id
    with site.db.session(write=True) as s:
        chat.add_turn(s, service.get_user(s, "ann"), cid, 2, "First tab", answer)
    with pytest.raises(service.Conflict, match="changed meanwhile"), site.db.session(write=True) as s:
        chat.add_turn(s, service.get_user(s, "ann"), cid, 2, "Second tab", answer)
    with site.db.session() as s:
        messages = chat.own_conversation(s, service.get_user(s, "ann"), cid).messages
        assert [m.content for m in messages] == ["Hi", "Hello!", "First tab", "Hello!"]
    site.db.dispose()


def test_a_personal_chat_model_is_asked_as_the_signed_in_user(config: ServeConfig, tiny_model: Path) -> None:
    """With chat_personal the model sees the `User: NAME` line a personalised policy was trained with
    (data.chat.with_user), for whoever is signed in; without it, the conversation alone."""
    from rlhfkit.data.chat import render_prompt, with_user
    from rlhfkit.data.formats import Message
    from rlhfkit.feedback.playground import Playground
    from rlhfkit.models.loading import load_tokenizer

    conversation = [{"role": "user", "content": "How do I make tea?"}]
    plain = Playground(config.model_copy(update={"chat_model": str(tiny_model)}))
    personal = Playground(config.model_copy(update={"chat_model": str(tiny_model), "chat_personal": True}))
    tokenizer = load_tokenizer(str(tiny_model))
    asked = with_user([Message(role="user", content="How do I make tea?")], "ann")
    assert personal.prompt(conversation, "ann") == render_prompt(tokenizer, asked)
    assert "ann" in personal.prompt(conversation, "ann") and "eve" in personal.prompt(conversation, "eve")
    assert plain.prompt(conversation, "ann") == render_prompt(tokenizer, "How do I make tea?")
    assert "ann" not in plain.prompt(conversation, "ann")
    # and over HTTP, a personal chat model answers (the messages rebuilt as the route stores them)
    site = Site(config.model_copy(update={"chat_personal": True}), str(tiny_model))
    try:
        r = site.call("ann", "POST", "/api/chat", json={"content": "How do I make tea?"})
        assert r.status_code in (200, 201), r.text
    finally:
        site.db.dispose()


def test_the_python_client_chats_rates_picks_and_exports(config: ServeConfig, tiny_model: Path) -> None:
    """FeedbackClient's chat methods against a real server (uvicorn, a tiny model): a conversation
    over two turns with a 👍 and a pick, someone else's conversation a 404, the owner's exports,
    and the server's refusals as FeedbackError with its message."""
    from rlhfkit.feedback.client import FeedbackClient, FeedbackError
    from rlhfkit.feedback.live import LiveServer

    config = config.model_copy(update={"chat_model": str(tiny_model), "chat_max_new_tokens": 6})
    db = Database(config.db_url)
    db.migrate()
    with db.session(write=True) as s:
        for name in ("owner", "ann", "eve"):
            service.create_user(s, UserIn(username=name, password=PASSWORD, is_owner=name == "owner"))
    with (
        LiveServer(config, db) as server,
        FeedbackClient.login(server.url, "ann", PASSWORD) as ann,
        FeedbackClient.login(server.url, "eve", PASSWORD) as eve,
        FeedbackClient.login(server.url, "owner", PASSWORD) as owner,
    ):
        conv = ann.start_chat(f"How do I make tea? {XSS}")
        cid, answer = conv["id"], conv["messages"][1]
        assert answer["role"] == "assistant" and answer["model"] == str(tiny_model)
        assert ann.rate_answer(cid, answer["id"], up=True)["messages"][1]["thumbs"] is True
        conv = ann.send_message(cid, "And with milk?", two=True)
        pair = conv["messages"][3]
        assert conv["waiting_pick"] == pair["id"] and len(pair["candidates"]) == 2
        with pytest.raises(FeedbackError) as e:
            ann.send_message(cid, "Hello?")
        assert e.value.status == 409 and "pick the better" in e.value.message
        with pytest.raises(FeedbackError) as e:
            ann.start_chat("   ")
        assert e.value.status == 422 and "write a message first" in e.value.message
        picked = ann.pick_answer(cid, pair["id"], 1)
        assert picked["waiting_pick"] is None and picked["messages"][3]["content"] == pair["candidates"][1]
        assert ann.conversation(cid) == picked
        listed = ann.conversations()
        assert listed["model"] == str(tiny_model) and [(c["id"], c["turns"]) for c in listed["conversations"]] == [
            (cid, 2)
        ]

        for refused, status in (
            (lambda: eve.conversation(cid), 404),  # a conversation is its user's alone
            (lambda: eve.rate_answer(cid, answer["id"], up=False), 404),
            (lambda: ann.export_chat("thumbs"), 403),  # the site owner's
            (lambda: owner.export_chat("nope"), 404),
        ):
            with pytest.raises(FeedbackError) as e:
                refused()
            assert e.value.status == status, e.value
        thumbs = owner.export_chat("thumbs")
        assert [(len(t["prompt"]), t["label"], t["user"]) for t in thumbs] == [(1, True, "ann")]
        assert thumbs[0]["prompt"][0]["content"].endswith(XSS)
        a, b = pair["candidates"]
        assert [(p["chosen"], p["rejected"], p["user"]) for p in owner.export_chat("pairs")] == (
            [(b, a, "ann")] if a.strip() != b.strip() else []
        )
    db.dispose()
