"""Server-rendered pages: log in, label, administer. They call the same service as the API.

The task page works without JavaScript (every candidate has a rank box, the form posts); app.js
adds rank buttons on each card, keyboard shortcuts, folding of long answers and draft autosave.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from rlhfkit.data.formats import STRENGTHS
from rlhfkit.feedback import service
from rlhfkit.feedback.choices import DEFAULT_ROLE, DEFAULT_TASK, ROLES, TASKS
from rlhfkit.feedback.deps import (
    LOGIN_COOKIE,
    Auth,
    Id,
    OwnerPost,
    PageAuth,
    PageOwner,
    PagePost,
    cookie_secure,
    end_session,
    login_user,
    render,
    set_session_cookie,
    start_session,
    state,
)
from rlhfkit.feedback.models import Project
from rlhfkit.feedback.schemas import (
    ApiKeyIn,
    JudgmentIn,
    LoginIn,
    MemberIn,
    ProjectIn,
    ProjectSettingsIn,
    UserIn,
    problems_text,
)
from rlhfkit.feedback.security import csrf_ok, csrf_token, new_token
from rlhfkit.labels.agreement import agreement_report

router = APIRouter()


def redirect(path: str, **params: Any) -> RedirectResponse:
    return RedirectResponse(path + ("?" + urlencode(params) if params else ""), status_code=303)


def safe_next(target: str | None) -> str:
    """Only same-site paths after login (no open redirect to //evil.example)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def small_int(raw: str) -> int | None:
    """A form field's whole number, or None if it is not one. At most 9 digits: every number
    a form here takes is small, and int() refuses 4,300 digits and more with an error."""
    raw = raw.strip()
    return int(raw) if raw.isdecimal() and len(raw) <= 9 else None


def form_int(form: Any, name: str, default: int) -> int:
    raw = str(form.get(name, default))
    value = small_int(raw)
    if value is None:
        raise service.Invalid(f"{name}: {raw.strip()[:20]!r} is not a whole number (at most 9 digits)")
    return value


# ---------------------------------------------------------------- login


def _login_page(
    request: Request,
    next_path: str,
    error: str = "",
    username: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    nonce = new_token()
    response = render(
        request,
        "login.html",
        {
            "next": next_path,
            "login_csrf": csrf_token(state(request).secret, "login:" + nonce),
            "error": error,
            "username": username,
        },
        status=status,
    )
    # Login CSRF: the form's token must match this cookie, so another site cannot log you in.
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="lax", secure=cookie_secure(request))
    response.headers.update(headers or {})
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    return _login_page(request, safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    st = state(request)
    form = await request.form()
    next_path = safe_next(str(form.get("next", "/")))
    username = str(form.get("username", ""))[:64]
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not csrf_ok(st.secret, "login:" + nonce, str(form.get("csrf_token", ""))):
        return _login_page(request, next_path, "The login form expired; please try again.", username, status=403)
    try:
        data = LoginIn(username=str(form.get("username", "")), password=str(form.get("password", "")))
        user_id = await login_user(request, data.username, data.password)
    except ValidationError as e:
        return _login_page(request, next_path, problems_text(e), "", status=422)
    except (service.Unauthorized, service.TooManyAttempts, service.Busy) as e:
        return _login_page(request, next_path, e.message, username, status=e.status, headers=e.headers)
    token = await run_in_threadpool(start_session, request, user_id)
    response = redirect(next_path)
    set_session_cookie(request, response, token)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, posted: PagePost) -> Response:
    return end_session(request, posted.auth, redirect("/login"))


# ---------------------------------------------------------------- home, project, labeling


@router.get("/")
def home(request: Request, auth: PageAuth) -> Response:
    with state(request).db.session() as s:
        user = auth.user(s)
        projects = [
            {"project": p, "role": role, "progress": service.my_progress(s, p, user)}
            for p, role in service.projects_of(s, user)
        ]
        return render(request, "home.html", {"projects": projects, "tasks": TASKS}, auth)


@router.get("/p/{pid}")
def project_page(pid: Id, request: Request, auth: PageAuth) -> Response:
    with state(request).db.session() as s:
        user = auth.user(s)
        project, role = service.project_for(s, user, pid)
        return render(
            request,
            "project.html",
            {"project": project, "role": role, "progress": service.my_progress(s, project, user)},
            auth,
        )


@router.get("/p/{pid}/next")
def next_page(pid: Id, request: Request, auth: PageAuth, saved: int = 0) -> Response:
    st = state(request)

    def work(s: Session) -> int | None:
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        view = service.next_view(s, project, user, st.lease)
        return view["item_id"] if view else None

    item_id = st.db.transact(work)
    if item_id is not None:
        return redirect(f"/p/{pid}/items/{item_id}", **({"saved": 1} if saved else {}))
    with st.db.session() as s:
        user = auth.user(s)
        project, role = service.project_for(s, user, pid)
        return render(
            request,
            "done.html",
            {
                "project": project,
                "role": role,
                "saved": saved,
                "undo": service.last_judgment(s, project, user) if saved else None,
                "progress": service.my_progress(s, project, user),
            },
            auth,
        )


def _task_page(
    request: Request,
    auth: Auth,
    pid: int,
    item_id: int,
    *,
    error: str = "",
    posted_draft: dict[str, Any] | None = None,
    saved: int = 0,
    status: int = 200,
) -> Response:
    with state(request).db.session() as s:
        user = auth.user(s)
        project, role = service.project_for(s, user, pid)
        try:
            a = service.assignment_for(s, project, user, item_id)
        except service.NotFound:
            service.own_judgment(s, project, user, item_id)  # says so if it was sent back for relabeling
            raise
        view = service.item_view(a, project)
        editing = service.editing_view(s, project, user, item_id, a.display_order) if view["submitted"] else None
        draft = posted_draft if posted_draft is not None else (editing or {}).get("draft", view["draft"] or {})
        return render(
            request,
            "task.html",
            {
                "project": project,
                "role": role,
                "item": view,
                "editing": editing,
                "strengths": STRENGTHS,
                "error": error,
                "saved": saved,
                "undo": service.last_judgment(s, project, user) if saved else None,
                "ranks": {int(k): v for k, v in (draft.get("ranks") or {}).items()},
                # An autosaved draft comes back from JSON with text keys.
                "scores": {n: {int(k): v for k, v in row.items()} for n, row in (draft.get("scores") or {}).items()},
                "draft": draft,
                "client_token": new_token()[:32],
                "progress": service.my_progress(s, project, user),
            },
            auth,
            status=status,
        )


@router.get("/p/{pid}/items/{item_id}")
def task_page(pid: Id, item_id: Id, request: Request, auth: PageAuth, saved: int = 0) -> Response:
    return _task_page(request, auth, pid, item_id, saved=saved)


def _draft_from_form(form: Any, display_order: list[int], project: Project) -> dict[str, Any]:
    """The posted form as a draft: what the page shows again if the submit is refused."""
    ranks: dict[int, int | None] = {}
    for cid in display_order:
        ranks[cid] = small_int(str(form.get(f"rank_{cid}", "")))
    scores = {
        c.name: {cid: small_int(str(form.get(f"score_{c.name}_{cid}", ""))) for cid in display_order}
        for c in service.criteria_of(project)
    }
    # Browsers send textarea line breaks as CRLF; training data wants plain newlines.
    return {
        "ranks": ranks,
        "unusable": form.get("unusable") in ("1", "on", "true"),
        "comment": str(form.get("comment", "")).replace("\r\n", "\n"),
        "response": str(form.get("response", "")).replace("\r\n", "\n"),
        "strength": small_int(str(form.get("strength", ""))),
        "scores": scores,
    }


def _judgment(draft: dict[str, Any], form: Any) -> JudgmentIn:
    chosen = {cid: r for cid, r in draft["ranks"].items() if r is not None}
    scores = {name: {cid: v for cid, v in row.items() if v is not None} for name, row in draft["scores"].items()}
    return service.checked(
        JudgmentIn,
        ranking=chosen or None,
        # Nothing scored at all: no scores (the service then asks for them, unless flagged unusable).
        scores=scores if any(scores.values()) else None,
        unusable=draft["unusable"],
        comment=draft["comment"] or None,
        response=draft["response"] if "response" in form else None,
        strength=draft["strength"],
        client_token=str(form.get("client_token", "")),
    )


@router.post("/p/{pid}/items/{item_id}")
def submit_page(pid: Id, item_id: Id, request: Request, posted: PagePost) -> Response:
    st, auth, form = state(request), posted.auth, posted.form
    draft: dict[str, Any] | None = None

    def work(s: Session) -> None:
        nonlocal draft
        user = auth.user(s)
        project, _ = service.project_for(s, user, pid)
        a = service.assignment_for(s, project, user, item_id)
        draft = _draft_from_form(form, a.display_order, project)
        choice = form.get("choice")
        if project.task == "pairwise" and choice:  # quick mode: one click is the whole judgment
            draft["ranks"] = service.pairwise_choice(a, str(choice))
            draft["unusable"] = draft["unusable"] or choice == "both_bad"
            if choice in ("tie", "both_bad"):  # the strength row is for A or B; a tie has none
                draft["strength"] = None
        if form.get("mode") == "edit":
            service.edit_judgment(s, project, user, item_id, _judgment(draft, form))
        else:
            service.submit(s, project, user, item_id, _judgment(draft, form))

    try:
        st.db.transact(work)
    except (service.Invalid, service.Conflict) as e:
        return _task_page(request, auth, pid, item_id, error=e.message, posted_draft=draft, status=e.status)
    return redirect(f"/p/{pid}/next", saved=1)


# ---------------------------------------------------------------- project admin


@router.get("/p/{pid}/admin")
def admin_page(pid: Id, request: Request, auth: PageAuth, added: int = -1, skipped: int = 0) -> Response:
    with state(request).db.session() as s:
        project, role = service.project_for(s, auth.user(s), pid, admin=True)
        ranked = project.task in ("ranking", "pairwise")
        report = agreement_report(service.rankings_of(s, project)) if ranked else None
        return render(
            request,
            "admin.html",
            {
                "project": project,
                "role": role,
                "progress": service.progress(s, project),
                "agreement": report,
                "members": service.members(s, project),
                "exports": service.exports_for(project),
                "criteria": service.criteria_of(project),
                "roles": ROLES,
                "default_role": DEFAULT_ROLE,
                "added": added,
                "skipped": skipped,
            },
            auth,
        )


def _admin_project(s: Session, auth: Auth, pid: int) -> Project:
    return service.project_for(s, auth.user(s), pid, admin=True)[0]


@router.post("/p/{pid}/admin/settings")
def admin_settings(pid: Id, request: Request, posted: PagePost) -> Response:
    form = posted.form
    guidelines, overlap = str(form.get("guidelines", "")), form_int(form, "overlap", 3)
    locked = form.get("locked") in ("1", "on")
    data = service.checked(ProjectSettingsIn, guidelines=guidelines, overlap=overlap, locked=locked)
    with state(request).db.session(write=True) as s:
        service.update_project(s, _admin_project(s, posted.auth, pid), data)
    return redirect(f"/p/{pid}/admin")


@router.post("/p/{pid}/admin/import")
def admin_import(pid: Id, request: Request, posted: PagePost) -> Response:
    upload = posted.form.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise service.Invalid("choose a JSONL file to import")
    batch = str(posted.form.get("batch", "")).strip() or None
    if batch is not None:
        service.batch_name(batch)
    data = upload.file.read()
    db = state(request).db
    with db.session() as s:
        task = _admin_project(s, posted.auth, pid).task
    records = service.parse_upload(upload.filename or "", data, task)  # before the write transaction
    result = db.transact(lambda s: service.import_items(s, _admin_project(s, posted.auth, pid), records, batch))
    return redirect(f"/p/{pid}/admin", **result)


@router.post("/p/{pid}/admin/members")
def admin_add_member(pid: Id, request: Request, posted: PagePost) -> Response:
    username = str(posted.form.get("username", "")).strip()
    data = service.checked(MemberIn, username=username, role=posted.form.get("role", DEFAULT_ROLE))
    state(request).db.transact(lambda s: service.set_member(s, _admin_project(s, posted.auth, pid), data))
    return redirect(f"/p/{pid}/admin")


@router.post("/p/{pid}/admin/members/{user_id}/remove")
def admin_remove_member(pid: Id, user_id: Id, request: Request, posted: PagePost) -> Response:
    with state(request).db.session(write=True) as s:
        service.remove_member(s, _admin_project(s, posted.auth, pid), user_id)
    return redirect(f"/p/{pid}/admin")


# ---------------------------------------------------------------- site owner: projects and users

@router.post("/projects")
def create_project(request: Request, posted: OwnerPost) -> Response:
    form = posted.form
    data = service.checked(
        ProjectIn,
        name=str(form.get("name", "")).strip(),
        task=form.get("task", DEFAULT_TASK),
        guidelines=str(form.get("guidelines", "")),
        overlap=form_int(form, "overlap", 3),
        criteria=service.criteria_from_text(str(form.get("criteria", ""))) if form.get("task") == "rating" else None,
    )
    project_id = state(request).db.transact(lambda s: service.create_project(s, data).id)
    return redirect(f"/p/{project_id}/admin")


@router.get("/admin/users")
def users_page(request: Request, auth: PageOwner) -> Response:
    with state(request).db.session() as s:
        return render(request, "users.html", {"users": service.all_users(s)}, auth)


@router.post("/admin/users")
def create_user(request: Request, posted: OwnerPost) -> Response:
    form = posted.form
    data = service.checked(
        UserIn,
        username=str(form.get("username", "")).strip(),
        password=str(form.get("password", "")) or None,
        is_owner=form.get("is_owner") in ("1", "on"),
    )
    state(request).db.transact(lambda s: service.create_user(s, data))
    return redirect("/admin/users")


@router.post("/admin/users/{user_id}/active")
def set_user_active(user_id: Id, request: Request, posted: OwnerPost) -> Response:
    if user_id == posted.auth.user_id:
        raise service.Invalid("you cannot deactivate yourself")
    with state(request).db.session(write=True) as s:
        service.set_active(s, service.user_by_id(s, user_id), posted.form.get("active") == "1")
    return redirect("/admin/users")


@router.post("/admin/users/{user_id}/password")
def set_user_password(user_id: Id, request: Request, posted: OwnerPost) -> Response:
    with state(request).db.session(write=True) as s:
        service.set_password(s, service.user_by_id(s, user_id), str(posted.form.get("password", "")))
    return redirect("/admin/users")


# ---------------------------------------------------------------- own account: password, API keys


def _account_page(
    request: Request, auth: Auth, *, new_key: str | None = None, password_error: str = "", status: int = 200
) -> Response:
    with state(request).db.session() as s:
        user = auth.user(s)
        return render(
            request,
            "account.html",
            {
                "keys": service.api_keys(s, user),
                "new_key": new_key,
                "has_password": user.password_hash is not None,
                "password_changed": request.query_params.get("password") == "changed",
                "password_error": password_error,
            },
            auth,
            status=status,
        )


@router.get("/account")
def account_page(request: Request, auth: PageAuth) -> Response:
    return _account_page(request, auth)


@router.post("/account/password")
async def change_password(request: Request, posted: PagePost) -> Response:
    """The current password, then the new one twice. The current one is checked like a login
    (throttled, hashing bounded), so an open session cannot be used to guess it. Every other
    session of this user ends (as with any password change); this browser gets a fresh session so
    the labeler stays logged in."""
    st, form = state(request), posted.form
    new = str(form.get("new_password", ""))
    try:
        if new != str(form.get("new_password_again", "")):
            raise service.Invalid("the two new passwords differ")
        try:
            await login_user(request, posted.auth.username, str(form.get("current_password", "")))
        except service.Unauthorized:
            raise service.Invalid("current password: that is not your current password") from None

        def change() -> str:  # no row a concurrent request could insert too: no retry (see db.py)
            with st.db.session(write=True) as s:
                service.set_password(s, posted.auth.user(s), new)
                return service.open_session(s, posted.auth.user_id, st.session_times)

        token = await run_in_threadpool(change)
    except (service.Invalid, service.TooManyAttempts, service.Busy) as e:
        response = await run_in_threadpool(
            _account_page, request, posted.auth, password_error=e.message, status=e.status
        )
        response.headers.update(getattr(e, "headers", None) or {})
        return response
    response = redirect("/account", password="changed")
    set_session_cookie(request, response, token)
    return response


@router.post("/account/keys")
def create_key(request: Request, posted: PagePost) -> Response:
    data = service.checked(ApiKeyIn, name=str(posted.form.get("name", "")).strip() or "script")
    with state(request).db.session(write=True) as s:
        key = service.create_api_key(s, posted.auth.user(s), data.name)
    return _account_page(request, posted.auth, new_key=key)  # shown once, on this response only


@router.post("/account/keys/{key_id}/revoke")
def revoke_key(key_id: Id, request: Request, posted: PagePost) -> Response:
    with state(request).db.session(write=True) as s:
        service.revoke_api_key(s, posted.auth.user(s), key_id)
    return redirect("/account")
