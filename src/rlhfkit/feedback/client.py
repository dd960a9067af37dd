"""A small synchronous client for the feedback JSON API (scripts, the benchmark, simulated labelers).

    with FeedbackClient.login("http://127.0.0.1:8000", "ann", "secret-pw") as c:
        while (item := c.next_item(project_id)) is not None:
            ranks = {cand["id"]: rank for cand, rank in zip(item["candidates"], [1, 2, 2])}
            c.submit(project_id, item["item_id"], ranks)

Or `FeedbackClient(url, api_key="rk_...")` for a script with an API key. `submit` retries network
failures with the same client_token, so a judgment is stored exactly once even when a response
is lost on the way back.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx

from rlhfkit.feedback.choices import DEFAULT_ROLE, DEFAULT_TASK, Role, Task

Batch = str | list[str] | None  # one batch's name, or several


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
) -> dict[str, Any]:
    """The JSON of a judgment, new or edited; the client token makes a retried request idempotent."""
    return {
        "ranking": ranking,
        "unusable": unusable,
        "comment": comment,
        "response": response,
        "strength": strength,
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
    ) -> None:
        self.call(
            "PUT",
            f"/api/projects/{project_id}/items/{item_id}/draft",
            json={"ranks": ranks or {}, "unusable": unusable, "comment": comment, "response": response},
        )

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
        client_token: str | None = None,
        retries: int = 3,
    ) -> dict[str, Any]:
        """Submit a judgment (ranking: candidate id -> rank, 1 = best, equal = tie; strength: how
        much better each rank is than the next, 1 slightly, 2 better, 3 much better).

        Returns the stored judgment with "created": False when the server already had it.
        """
        body = judgment_body(ranking, unusable, comment, response, strength, client_token)
        for attempt in range(retries):
            try:
                r = self.request("POST", f"/api/projects/{project_id}/items/{item_id}/judgments", json=body)
                return r.json() | {"created": r.status_code == 201}
            except httpx.TransportError:
                if attempt == retries - 1:
                    raise
        raise AssertionError("unreachable")

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
    ) -> dict[str, Any]:
        """Replace your own judgment of an item (the server keeps the earlier version)."""
        body = judgment_body(ranking, unusable, comment, response, strength)
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
        self, name: str, task: Task = DEFAULT_TASK, overlap: int = 3, guidelines: str = ""
    ) -> dict[str, Any]:
        return self.call(
            "POST",
            "/api/projects",
            json={"name": name, "task": task, "overlap": overlap, "guidelines": guidelines},
        )

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

    def export(self, project_id: int, kind: str, margin: bool = False, batch: Batch = None) -> list[dict[str, Any]]:
        """One export's records, of `batch`'s items only where given (a name or several)."""
        params = {"margin": margin} | _batch_params(batch)
        return self.call("GET", f"/api/projects/{project_id}/export/{kind}", params=params)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
