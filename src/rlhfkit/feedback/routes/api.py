"""The JSON API under /api: what scripts (with an API key) and the page's own JS call.

A labeler's loop is two calls:
    GET  /api/projects/{pid}/next                        -> {"item": {..., "candidates": [{id, label, text}]}}
    POST /api/projects/{pid}/items/{item_id}/judgments   <- {"ranking": {cand_id: rank}, "unusable",
                                                             "comment", "client_token"}
(a rating or thumbs project sends {"scores": {criterion: {cand_id: score}}} instead of a ranking;
its criteria are in GET /api/projects/{pid}).
Candidates come in this labeler's shuffled order; their ids are stable. Errors are
{"error": "message"} with a 4xx status.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlhfkit.feedback import service
from rlhfkit.feedback.deps import (
    ApiAuth,
    ApiOwner,
    Id,
    end_session,
    jsonl_download,
    login_user,
    set_session_cookie,
    start_session,
    state,
)
from rlhfkit.feedback.models import Project
from rlhfkit.feedback.schemas import (
    ApiKeyIn,
    DraftIn,
    ExcludedIn,
    JudgmentIn,
    LoginIn,
    MemberIn,
    ProjectIn,
    ProjectSettingsIn,
    ReviewFilterIn,
    UserIn,
)
from rlhfkit.feedback.security import csrf_token
from rlhfkit.labels.agreement import agreement_report

router = APIRouter(prefix="/api")

# `?batch=a&batch=b` or `?batch=a,b`: progress, agreement and exports limited to those batches.
Batches = Annotated[list[str] | None, Query(description="limit to these batches (repeat or comma-separate)")]


def project_json(p: Project, role: str) -> dict[str, Any]:
    criteria = [c.model_dump() for c in service.criteria_of(p)]
    return {"id": p.id, "name": p.name, "task": p.task, "overlap": p.overlap, "role": role} | (
        {"criteria": criteria} if criteria else {}
    )


@router.post("/login")
async def login(data: LoginIn, request: Request) -> Response:
    st = state(request)
    user_id = await login_user(request, data.username, data.password)
    token = await run_in_threadpool(start_session, request, user_id)
    response = JSONResponse({"username": data.username, "csrf_token": csrf_token(st.secret, token)})
    set_session_cookie(request, response, token)
    return response


@router.post("/logout", status_code=204)
def logout(request: Request, auth: ApiAuth) -> Response:
    return end_session(request, auth, Response(status_code=204))


@router.get("/me")
def me(request: Request, auth: ApiAuth) -> dict[str, Any]:
    with state(request).db.session() as s:
        user = auth.user(s)
        projects = [project_json(p, role) for p, role in service.projects_of(s, user)]
    return {"username": auth.username, "is_owner": auth.is_owner, "projects": projects}


@router.post("/users", status_code=201)
def create_user(data: UserIn, request: Request, auth: ApiOwner) -> dict[str, Any]:
    user = state(request).db.transact(lambda s: service.create_user(s, data))
    return {"id": user.id, "username": user.username, "is_owner": user.is_owner}


@router.get("/keys")
def list_keys(request: Request, auth: ApiAuth) -> list[dict[str, Any]]:
    with state(request).db.session() as s:
        keys = service.api_keys(s, auth.user(s))
        return [
            {
                "id": k.id,
                "name": k.name,
                "prefix": k.prefix,
                "revoked": k.revoked,
                "created_at": k.created_at.isoformat() + "Z",
            }
            for k in keys
        ]


@router.post("/keys", status_code=201)
def create_key(data: ApiKeyIn, request: Request, auth: ApiAuth) -> dict[str, str]:
    with state(request).db.session(write=True) as s:
        key = service.create_api_key(s, auth.user(s), data.name)
    return {"key": key, "note": "store it now: it is not shown again"}


@router.delete("/keys/{key_id}", status_code=204)
def revoke_key(key_id: Id, request: Request, auth: ApiAuth) -> Response:
    with state(request).db.session(write=True) as s:
        service.revoke_api_key(s, auth.user(s), key_id)
    return Response(status_code=204)


@router.get("/projects")
def list_projects(request: Request, auth: ApiAuth) -> list[dict[str, Any]]:
    with state(request).db.session() as s:
        return [project_json(p, role) for p, role in service.projects_of(s, auth.user(s))]


@router.post("/projects", status_code=201)
def create_project(data: ProjectIn, request: Request, auth: ApiOwner) -> dict[str, Any]:
    project = state(request).db.transact(lambda s: service.create_project(s, data))
    return project_json(project, "owner")


@router.get("/projects/{pid}")
def get_project(pid: Id, request: Request, auth: ApiAuth) -> dict[str, Any]:
    with state(request).db.session() as s:
        user = auth.user(s)
        project, role = service.project_for(s, user, pid)
        return project_json(project, role) | {
            "guidelines": project.guidelines,
            "progress": service.my_progress(s, project, user),
        }


@router.patch("/projects/{pid}")
def update_project(
    pid: Id, data: ProjectSettingsIn, request: Request, auth: ApiAuth
) -> dict[str, Any]:
    with state(request).db.session(write=True) as s:
        project, role = service.project_for(s, auth.user(s), pid, admin=True)
        service.update_project(s, project, data)
        return project_json(project, role) | {"guidelines": project.guidelines}


@router.get("/projects/{pid}/members")
def list_members(pid: Id, request: Request, auth: ApiAuth) -> list[dict[str, Any]]:
    with state(request).db.session() as s:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        return [
            {"user_id": m.user_id, "username": m.user.username, "role": m.role} for m in service.members(s, project)
        ]


@router.put("/projects/{pid}/members")
def set_member(pid: Id, data: MemberIn, request: Request, auth: ApiAuth) -> dict[str, Any]:
    def work(s: Session) -> dict[str, Any]:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        m = service.set_member(s, project, data)
        return {"user_id": m.user_id, "username": data.username, "role": m.role}

    return state(request).db.transact(work)


@router.delete("/projects/{pid}/members/{user_id}", status_code=204)
def remove_member(pid: Id, user_id: Id, request: Request, auth: ApiAuth) -> Response:
    with state(request).db.session(write=True) as s:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        service.remove_member(s, project, user_id)
    return Response(status_code=204)


@router.post("/projects/{pid}/import")
async def import_items(
    pid: Id, request: Request, auth: ApiAuth, filename: str = "upload.jsonl", batch: str | None = None
) -> dict[str, int]:
    """Body: a JSONL file (completions, or prompts for demonstration projects); `?batch=NAME` tags
    every item it adds with that batch."""
    if batch is not None:
        service.batch_name(batch)
    body = await request.body()
    st = state(request)

    def project(s: Session) -> Project:
        return service.project_for(s, auth.user(s), pid, admin=True)[0]

    def work() -> dict[str, int]:
        with st.db.session() as s:
            task = project(s).task
        records = service.parse_upload(filename, body, task)  # before the write transaction: see import_items
        return st.db.transact(lambda s: service.import_items(s, project(s), records, batch))

    return await run_in_threadpool(work)


@router.get("/projects/{pid}/next")
def next_item(pid: Id, request: Request, auth: ApiAuth) -> dict[str, Any]:
    st = state(request)

    def work(s: Session) -> dict[str, Any]:
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        return {"item": service.next_view(s, project, user, st.lease)}

    return st.db.transact(work)


@router.get("/projects/{pid}/items/{item_id}")
def get_item(pid: Id, item_id: Id, request: Request, auth: ApiAuth) -> dict[str, Any]:
    with state(request).db.session() as s:
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        return service.item_view(service.assignment_for(s, project, user, item_id), project)


@router.put("/projects/{pid}/items/{item_id}/draft", status_code=204)
def save_draft(pid: Id, item_id: Id, data: DraftIn, request: Request, auth: ApiAuth) -> Response:
    st = state(request)
    with st.db.session(write=True) as s:
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        service.save_draft(s, project, user, item_id, data, st.lease)
    return Response(status_code=204)


@router.post("/projects/{pid}/items/{item_id}/judgments")
def submit(pid: Id, item_id: Id, data: JudgmentIn, request: Request, auth: ApiAuth) -> Response:
    """201 with the new judgment; 200 with the stored one when this client_token was seen."""

    def work(s: Session) -> tuple[dict[str, Any], bool]:
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        judgment, created = service.submit(s, project, user, item_id, data)
        return service.judgment_view(judgment), created

    view, created = state(request).db.transact(work)
    return JSONResponse(view, status_code=201 if created else 200)


@router.put("/projects/{pid}/items/{item_id}/judgment")
def edit_judgment(pid: Id, item_id: Id, data: JudgmentIn, request: Request, auth: ApiAuth) -> dict[str, Any]:
    """Replace your own judgment of an item (the old one is kept in the item's history)."""

    def work(s: Session) -> dict[str, Any]:
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        return service.judgment_view(service.edit_judgment(s, project, user, item_id, data)[0])

    return state(request).db.transact(work)


@router.post("/projects/{pid}/items/{item_id}/skip", status_code=204)
def skip(pid: Id, item_id: Id, request: Request, auth: ApiAuth) -> Response:
    with state(request).db.session(write=True) as s:
        user = auth.user(s)
        service.skip(s, service.project_for(s, user, pid)[0], user, item_id)
    return Response(status_code=204)


@router.delete("/projects/{pid}/items/{item_id}/skip", status_code=204)
def unskip(pid: Id, item_id: Id, request: Request, auth: ApiAuth) -> Response:
    with state(request).db.session(write=True) as s:
        user = auth.user(s)
        service.unskip(s, service.project_for(s, user, pid)[0], user, item_id)
    return Response(status_code=204)


@router.get("/projects/{pid}/history")
def history(pid: Id, request: Request, auth: ApiAuth, page: int = 1) -> dict[str, Any]:
    """Your judgments in the project, newest first (20 a page), and the items you skipped."""
    with state(request).db.session() as s:
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        return service.history(s, project, user, max(1, page))


@router.get("/projects/{pid}/review/items")
def review_items(
    pid: Id, request: Request, f: Annotated[ReviewFilterIn, Query()], auth: ApiAuth
) -> dict[str, Any]:
    """Filters: status (unlabeled, partial, complete, sent_back), min_disagreement (0-1),
    has_comment, labeler (a username), page (25 items a page, in import order)."""
    with state(request).db.session() as s:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        return service.review_items(s, project, f)


@router.get("/projects/{pid}/review/items/{item_id}")
def review_item(pid: Id, item_id: Id, request: Request, auth: ApiAuth) -> dict[str, Any]:
    with state(request).db.session() as s:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        return service.review_item(s, project, item_id)


@router.post("/projects/{pid}/review/items/{item_id}/send-back")
def send_back(pid: Id, item_id: Id, request: Request, auth: ApiAuth) -> dict[str, int]:
    def work(s: Session) -> dict[str, int]:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        return {"judgments_set_aside": service.send_back(s, project, item_id)}

    return state(request).db.transact(work)


@router.put("/projects/{pid}/labelers/{user_id}/excluded")
def set_excluded(pid: Id, user_id: Id, data: ExcludedIn, request: Request, auth: ApiAuth) -> dict[str, int | bool]:
    """Leave a labeler's judgments in the project out of exports, agreement and progress (or not)."""

    def work(s: Session) -> dict[str, int | bool]:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        return {"excluded": data.excluded, "changed": service.set_excluded(s, project, user_id, data.excluded)}

    return state(request).db.transact(work)


@router.get("/projects/{pid}/progress")
def progress(pid: Id, request: Request, auth: ApiAuth, batch: Batches = None) -> dict[str, Any]:
    batches = service.batch_names(batch)
    with state(request).db.session() as s:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        return service.progress(s, project, batches)


@router.get("/projects/{pid}/agreement")
def agreement(pid: Id, request: Request, auth: ApiAuth, batch: Batches = None) -> dict[str, Any]:
    batches = service.batch_names(batch)
    with state(request).db.session() as s:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        service.check_batches(s, project, batches)
        rankings = service.rankings_of(s, project, batches)
    return agreement_report(rankings)


@router.get("/projects/{pid}/export/{kind}")
def export(
    pid: Id,
    kind: str,
    request: Request,
    auth: ApiAuth,
    margin: bool = False,
    batch: Batches = None,
    criterion: str | None = None,
) -> Response:
    """JSONL download; `kind` is one of service.EXPORTS."""
    batches = service.batch_names(batch)
    with state(request).db.session() as s:
        project, _ = service.project_for(s, auth.user(s), pid, admin=True)
        rows = service.export(s, project, kind, margin=margin, batches=batches, criterion=criterion)
        stem = f"{project.id}-{'+'.join(batches)}" if batches else str(project.id)
        name = f"{stem}-{kind}.jsonl"

    return jsonl_download(rows, name)
