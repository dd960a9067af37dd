"""Pages for the annotator's day beyond the task page: a labeler's own judgments (to reopen and
change) and skipped items (to put back), the skip itself; and an admin's review: items filtered
and paginated, one item's judgments side by side, send back, exclude a labeler. Each calls the
one service function its JSON twin in api.py calls."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from rlhfkit.feedback import service
from rlhfkit.feedback.choices import REVIEW_STATUSES
from rlhfkit.feedback.deps import Id, PageAuth, PagePost, render, state
from rlhfkit.feedback.routes.pages import redirect, small_int
from rlhfkit.feedback.schemas import ReviewFilterIn

router = APIRouter()


# ---------------------------------------------------------------- a labeler's own


@router.post("/p/{pid}/items/{item_id}/skip")
def skip(pid: Id, item_id: Id, request: Request, posted: PagePost) -> Response:
    with state(request).db.session(write=True) as s:
        user = posted.auth.user(s)
        service.skip(s, service.project_for(s, user, pid)[0], user, item_id)
    return redirect(f"/p/{pid}/next")


@router.post("/p/{pid}/items/{item_id}/unskip")
def unskip(pid: Id, item_id: Id, request: Request, posted: PagePost) -> Response:
    with state(request).db.session(write=True) as s:
        user = posted.auth.user(s)
        service.unskip(s, service.project_for(s, user, pid)[0], user, item_id)
    return redirect(f"/p/{pid}/history", put_back=1)


@router.get("/p/{pid}/history")
def history_page(pid: Id, request: Request, auth: PageAuth, page: int = 1, put_back: int = 0) -> Response:
    with state(request).db.session() as s:
        user = auth.user(s)
        project, role = service.project_for(s, user, pid)
        history = service.history(s, project, user, max(1, page))
        context = {"project": project, "role": role, "history": history, "put_back": put_back}
        return render(request, "history.html", context, auth)


# ---------------------------------------------------------------- an admin's review


@router.get("/p/{pid}/review")
def review_page(pid: Id, request: Request, auth: PageAuth) -> Response:
    # The filter form sends the filters it leaves unused as empty fields: those filter nothing.
    f = service.checked(ReviewFilterIn, **{k: v for k, v in request.query_params.items() if v.strip()})
    with state(request).db.session() as s:
        project, role = service.project_for(s, auth.user(s), pid, admin=True)
        context = {
            "project": project,
            "role": role,
            "listing": service.review_items(s, project, f),
            "f": f,
            "query": f.model_dump(exclude={"page"}, exclude_none=True),
            "statuses": REVIEW_STATUSES,
            "members": service.members(s, project),
        }
        return render(request, "review.html", context, auth)


@router.get("/p/{pid}/review/{item_id}")
def review_item_page(pid: Id, item_id: Id, request: Request, auth: PageAuth, sent: int = -1) -> Response:
    with state(request).db.session() as s:
        project, role = service.project_for(s, auth.user(s), pid, admin=True)
        context = {"project": project, "role": role, "item": service.review_item(s, project, item_id), "sent": sent}
        return render(request, "review_item.html", context, auth)


@router.post("/p/{pid}/review/{item_id}/send-back")
def send_back(pid: Id, item_id: Id, request: Request, posted: PagePost) -> Response:
    def work(s: Session) -> int:
        project, _ = service.project_for(s, posted.auth.user(s), pid, admin=True)
        return service.send_back(s, project, item_id)

    return redirect(f"/p/{pid}/review/{item_id}", sent=state(request).db.transact(work))


@router.post("/p/{pid}/admin/labelers/{user_id}/excluded")
def set_excluded(pid: Id, user_id: Id, request: Request, posted: PagePost) -> Response:
    excluded = small_int(str(posted.form.get("excluded", "")))
    if excluded not in (0, 1):
        raise service.Invalid("excluded: 1 to leave the labeler's judgments out, 0 to take them back in")

    def work(s: Session) -> int:
        project, _ = service.project_for(s, posted.auth.user(s), pid, admin=True)
        return service.set_excluded(s, project, user_id, bool(excluded))

    state(request).db.transact(work)
    return redirect(f"/p/{pid}/admin")
