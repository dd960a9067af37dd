"""A small synchronous client for the feedback JSON API (scripts, the benchmark, simulated labelers).

    with FeedbackClient.login("http://127.0.0.1:8000", "ann", "secret-pw") as c:
        while (item := c.next_item(project_id)) is not None:
            ranks = {cand["id"]: rank for cand, rank in zip(item["candidates"], [1, 2, 2])}
            c.submit(project_id, item["item_id"], ranks)

Or `FeedbackClient(url, api_key="rk_...")` for a script with an API key. `submit` retries network
failures with the same client_token, so a judgment is stored exactly once even when a response
is lost on the way back.

Rating and thumbs projects score each candidate instead of ranking them (`rate`, `thumbs`); the
chat page ("playground") has its JSON twin here too (`start_chat`, `send_message`, `rate_answer`,
`pick_answer`, `export_chat`):

    with FeedbackClient(url, api_key=key) as c:
        conv = c.start_chat("How do I make tea?")
        c.rate_answer(conv["id"], conv["messages"][-1]["id"], up=True)
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Literal

import httpx

from rlhfkit.feedback.choices import DEFAULT_ROLE, DEFAULT_TASK, Role, Task
from rlhfkit.feedback.schemas import Criterion

Batch = str | list[str] | None  # one batch's name, or several
# A rating or thumbs judgment: criterion name -> candidate id -> score (schemas.JudgmentIn.scores).
Scores = dict[str, dict[int, int]]


def _batch_params(batch: Batch) -> dict[str, list[str]]:
    """`?batch=a&batch=b`: progress, agreement and exports limited to those batches."""
    if batch is None:
        return {}
    return {"batch": [batch] if isinstance(batch, str) else list(batch)}


def judgment_body(
    ranking: dict[int, int] | None,
    unusable: bool,
    comment: str | None,
    response: str | None,
    strength: int | None,
    client_token: str | None = None,
    scores: Scores | None = None,
) -> dict[str, Any]:
    """The JSON of a judgment, new or edited (a ranking, or `scores` for a rating or thumbs
    project); the client token makes a retried request idempotent."""
    return {
        "ranking": ranking,
        "unusable": unusable,
        "comment": comment,
        "response": response,
        "strength": strength,
        "scores": scores,
        "client_token": client_token or secrets.token_urlsafe(16),
    }


class FeedbackError(Exception):
    """The server refused a request; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class FeedbackClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.csrf: str | None = None

    @classmethod
    def login(cls, base_url: str, username: str, password: str, timeout: float = 30.0) -> FeedbackClient:
        """Log in like a browser does (session cookie + CSRF token)."""
        client = cls(base_url, timeout=timeout)
        client.csrf = client.call("POST", "/api/login", json={"username": username, "password": password})["csrf_token"]
        return client

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; a 4xx/5xx answer raises FeedbackError with the server's message."""
        headers = kwargs.pop("headers", {})
        if self.csrf and method != "GET":
            headers["X-CSRF-Token"] = self.csrf
        r = self.http.request(method, path, headers=headers, **kwargs)
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise FeedbackError(r.status_code, message)
        return r

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded answer: JSON, a list of records for JSONL, None for an empty body."""
        r = self.request(method, path, **kwargs)
        if not r.content:
            return None
        if r.headers.get("content-type", "").startswith("application/x-ndjson"):
            return [json.loads(line) for line in r.text.splitlines() if line.strip()]
        return r.json()

    # ---- labeling

    def me(self) -> dict[str, Any]:
        return self.call("GET", "/api/me")

    def projects(self) -> list[dict[str, Any]]:
        return self.call("GET", "/api/projects")

    def project(self, project_id: int) -> dict[str, Any]:
        return self.call("GET", f"/api/projects/{project_id}")

    def next_item(self, project_id: int) -> dict[str, Any] | None:
        """The next item for this labeler (candidates in their shuffled order), or None if done."""
        return self.call("GET", f"/api/projects/{project_id}/next")["item"]

    def save_draft(
        self,
        project_id: int,
        item_id: int,
        ranks: dict[int, int | None] | None = None,
        unusable: bool = False,
        comment: str = "",
        response: str = "",
        scores: dict[str, dict[int, int | None]] | None = None,
    ) -> None:
        """Keep unfinished work (ranks, or a rating project's `scores` so far), unchecked."""
        body = {"ranks": ranks or {}, "unusable": unusable, "comment": comment, "response": response}
        self.call("PUT", f"/api/projects/{project_id}/items/{item_id}/draft", json=body | {"scores": scores or {}})

    def submit(
        self,
        project_id: int,
        item_id: int,
        ranking: dict[int, int] | None = None,
        *,
        unusable: bool = False,
        comment: str | None = None,
        response: str | None = None,
        strength: int | None = None,
        scores: Scores | None = None,
        client_token: str | None = None,
        retries: int = 3,
    ) -> dict[str, Any]:
        """Submit a judgment (ranking: candidate id -> rank, 1 = best, equal = tie; strength: how
        much better each rank is than the next, 1 slightly, 2 better, 3 much better; or, in a
        rating or thumbs project, `scores` instead: see `rate` and `thumbs`).

        Returns the stored judgment with "created": False when the server already had it.
        """
        body = judgment_body(ranking, unusable, comment, response, strength, client_token, scores)
        for attempt in range(retries):
            try:
                r = self.request("POST", f"/api/projects/{project_id}/items/{item_id}/judgments", json=body)
                return r.json() | {"created": r.status_code == 201}
            except httpx.TransportError:
                if attempt == retries - 1:
                    raise
        raise AssertionError("unreachable")

    def rate(
        self,
        project_id: int,
        item_id: int,
        scores: Scores,
        *,
        unusable: bool = False,
        comment: str | None = None,
        client_token: str | None = None,
    ) -> dict[str, Any]:
        """Score every candidate on every criterion of a rating project: `{criterion: {candidate
        id: score}}`, each score on that criterion's scale (`project(pid)["criteria"]`). A missing
        candidate or criterion, or a score off the scale, is a 422 that names it."""
        return self.submit(
            project_id, item_id, scores=scores, unusable=unusable, comment=comment, client_token=client_token
        )

    def thumbs(
        self,
        project_id: int,
        item_id: int,
        up: dict[int, bool],
        *,
        comment: str | None = None,
        client_token: str | None = None,
    ) -> dict[str, Any]:
        """👍 (True) or 👎 (False) for every candidate of a thumbs project's item (exported as KTO
        records: `export(pid, "thumbs")`)."""
        scores = {"thumbs": {cid: int(good) for cid, good in up.items()}}
        return self.submit(project_id, item_id, scores=scores, comment=comment, client_token=client_token)

    def skip(self, project_id: int, item_id: int) -> None:
        """Set an item aside: not offered to you again, its place free for others."""
        self.request("POST", f"/api/projects/{project_id}/items/{item_id}/skip")

    def unskip(self, project_id: int, item_id: int) -> None:
        """Put a skipped item back in your queue."""
        self.request("DELETE", f"/api/projects/{project_id}/items/{item_id}/skip")

    def edit(
        self,
        project_id: int,
        item_id: int,
        ranking: dict[int, int] | None = None,
        *,
        unusable: bool = False,
        comment: str | None = None,
        response: str | None = None,
        strength: int | None = None,
        scores: Scores | None = None,
    ) -> dict[str, Any]:
        """Replace your own judgment of an item, a ranking or a rating project's `scores` (the
        server keeps the earlier version)."""
        body = judgment_body(ranking, unusable, comment, response, strength, scores=scores)
        return self.call("PUT", f"/api/projects/{project_id}/items/{item_id}/judgment", json=body)

    def history(self, project_id: int, page: int = 1) -> dict[str, Any]:
        """Your judgments, newest first (a page of them), and the items you skipped."""
        return self.call("GET", f"/api/projects/{project_id}/history", params={"page": page})

    # ---- administration

    def review_items(self, project_id: int, **filters: Any) -> dict[str, Any]:
        """Items filtered by status, min_disagreement, has_comment, labeler; `page`."""
        return self.call("GET", f"/api/projects/{project_id}/review/items", params=filters)

    def review_item(self, project_id: int, item_id: int) -> dict[str, Any]:
        return self.call("GET", f"/api/projects/{project_id}/review/items/{item_id}")

    def send_back(self, project_id: int, item_id: int) -> int:
        """Send an item back for relabeling; returns how many judgments were set aside."""
        return self.call("POST", f"/api/projects/{project_id}/review/items/{item_id}/send-back")["judgments_set_aside"]

    def set_excluded(self, project_id: int, user_id: int, excluded: bool = True) -> int:
        """Leave a labeler's judgments out (or take them back in); returns how many changed."""
        body = {"excluded": excluded}
        return self.call("PUT", f"/api/projects/{project_id}/labelers/{user_id}/excluded", json=body)["changed"]

    def create_user(self, username: str, password: str | None = None, is_owner: bool = False) -> dict[str, Any]:
        return self.call("POST", "/api/users", json={"username": username, "password": password, "is_owner": is_owner})

    def create_api_key(self, name: str = "script") -> str:
        return self.call("POST", "/api/keys", json={"name": name})["key"]

    def create_project(
        self,
        name: str,
        task: Task = DEFAULT_TASK,
        overlap: int = 3,
        guidelines: str = "",
        criteria: list[Criterion] | None = None,
    ) -> dict[str, Any]:
        """A new project; a rating project scores on `criteria` (each its own scale and guideline;
        default one "overall" 1-7 scale), which only a rating project may have."""
        body: dict[str, Any] = {"name": name, "task": task, "overlap": overlap, "guidelines": guidelines}
        if criteria is not None:
            body["criteria"] = [c.model_dump() for c in criteria]
        return self.call("POST", "/api/projects", json=body)

    def set_member(self, project_id: int, username: str, role: Role = DEFAULT_ROLE) -> dict[str, Any]:
        return self.call("PUT", f"/api/projects/{project_id}/members", json={"username": username, "role": role})

    def import_jsonl(
        self, project_id: int, data: bytes | str | Path, filename: str | None = None, batch: str | None = None
    ) -> dict[str, int]:
        """Import a completions (or prompts) JSONL file or its bytes, its items tagged with `batch`."""
        if isinstance(data, Path):
            filename, data = filename or data.name, data.read_bytes()
        content = data.encode() if isinstance(data, str) else data
        return self.call(
            "POST",
            f"/api/projects/{project_id}/import",
            content=content,
            params={"filename": filename or "upload.jsonl"} | ({"batch": batch} if batch is not None else {}),
            headers={"Content-Type": "application/x-ndjson"},
        )

    def progress(self, project_id: int, batch: Batch = None) -> dict[str, Any]:
        """The project's progress, or only that of `batch` (a name or several); `batches` lists each."""
        return self.call("GET", f"/api/projects/{project_id}/progress", params=_batch_params(batch))

    def agreement(self, project_id: int, batch: Batch = None) -> dict[str, Any]:
        return self.call("GET", f"/api/projects/{project_id}/agreement", params=_batch_params(batch))

    def export(
        self, project_id: int, kind: str, margin: bool = False, batch: Batch = None, criterion: str | None = None
    ) -> list[dict[str, Any]]:
        """One export's records (`kind`: one of service.EXPORTS), of `batch`'s items only where
        given (a name or several); `criterion` picks one criterion's scores for a rating project's
        `ratings` and `rating_pairs` (default: the mean over its criteria)."""
        params = {"margin": margin} | _batch_params(batch) | ({"criterion": criterion} if criterion else {})
        return self.call("GET", f"/api/projects/{project_id}/export/{kind}", params=params)

    # ---- the chat page ("playground"): a user's own conversations with the served model

    def conversations(self) -> dict[str, Any]:
        """{"model": the served model's folder (None without one), "conversations": yours}."""
        return self.call("GET", "/api/chat")

    def conversation(self, conversation_id: int) -> dict[str, Any]:
        """One of your conversations (anyone else's is a 404), its messages in order."""
        return self.call("GET", f"/api/chat/{conversation_id}")

    def start_chat(self, content: str, two: bool = False) -> dict[str, Any]:
        """A new conversation: your message and the model's answer (`two`: two answers to pick
        from with `pick_answer`). Without a served model the server answers 503."""
        return self.call("POST", "/api/chat", json={"content": content, "two": two})

    def send_message(self, conversation_id: int, content: str, two: bool = False) -> dict[str, Any]:
        """The conversation's next turn; the model sees the whole conversation. 409 while a pick
        between two answers is pending."""
        return self.call("POST", f"/api/chat/{conversation_id}/messages", json={"content": content, "two": two})

    def rate_answer(self, conversation_id: int, message_id: int, up: bool | None) -> dict[str, Any]:
        """👍 (True), 👎 (False) or no rating (None) for one of the model's answers; the conversation."""
        return self.call("PUT", f"/api/chat/{conversation_id}/messages/{message_id}/thumbs", json={"up": up})

    def pick_answer(self, conversation_id: int, message_id: int, choice: Literal[0, 1]) -> dict[str, Any]:
        """The better of two answers (0 the first, 1 the second); final, and the conversation goes
        on from it. Returns the conversation."""
        return self.call("PUT", f"/api/chat/{conversation_id}/messages/{message_id}/pick", json={"choice": choice})

    def export_chat(self, kind: str) -> list[dict[str, Any]]:
        """Everyone's chat feedback (the site owner only): `thumbs` (KTO records) or `pairs` (picks)."""
        return self.call("GET", f"/api/chat/export/{kind}")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
