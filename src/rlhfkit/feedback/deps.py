"""What the routes depend on: the app's state, who is calling, CSRF, cookies, rendering.

Kept apart from app.py (which assembles the app) so that the routers import this module and app.py
imports the routers, never the other way round. Two ways in, one set of rules: browsers log in and
carry a session cookie (every state-changing request must also carry the session's CSRF token),
scripts send `Authorization: Bearer <API key>` (no cookie, so no CSRF). Both end at the same
`service` functions. The `Annotated` aliases (`ApiAuth`, `PageAuth`, `PagePost`, and their owner-
only twins) are what a route declares to get its caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import User
from rlhfkit.feedback.playground import Playground
from rlhfkit.feedback.security import HashingBusy, HashingGate, LoginThrottle, csrf_ok, csrf_token, retry_after_header
from rlhfkit.feedback.settings import ServeConfig

COOKIE = "rlhfkit_session"
LOGIN_COOKIE = "rlhfkit_login"


@dataclass
class State:
    """What every request needs, hung on app.state.feedback by create_app."""

    config: ServeConfig
    db: Database
    secret: bytes
    templates: Jinja2Templates
    throttle: LoginThrottle
    hashing: HashingGate
    playground: Playground  # the chat page's model, loaded on first use

    @property
    def lease(self) -> timedelta:
        return timedelta(minutes=self.config.lease_minutes)

    @property
    def session_times(self) -> service.SessionTimes:
        return service.SessionTimes(
            idle=timedelta(hours=self.config.session_idle_hours), lifetime=timedelta(days=self.config.session_days)
        )


def state(request: Request) -> State:
    return request.app.state.feedback


@dataclass
class Auth:
    """The caller. `session_token` is None for API-key callers (they need no CSRF token)."""

    user_id: int
    username: str
    is_owner: bool
    session_token: str | None

    def csrf(self, secret: bytes) -> str:
        return csrf_token(secret, self.session_token) if self.session_token else ""

    def user(self, s: Session) -> User:
        """The caller's row in this transaction. Loaded per transaction, not once per request,
        because `Database.transact` may run its function again in a fresh session."""
        return service.user_by_id(s, self.user_id)


class LoginRequired(Exception):
    """An anonymous browser asked for a page: send it to the login form."""


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def authenticate(request: Request) -> Auth | None:
    st = state(request)
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        with st.db.session() as s:
            user = service.api_key_user(s, header[7:].strip())
            if user is None:
                raise service.Unauthorized("invalid or revoked API key")
            return Auth(user.id, user.username, user.is_owner, None)
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    with st.db.session() as s:
        found = service.session_user(s, token, st.session_times)
    if found is None:
        return None
    user, due = found
    if due:  # a write, but only once per SessionTimes.step
        with st.db.session(write=True) as s:
            service.touch_session(s, token, st.session_times)
    return Auth(user.id, user.username, user.is_owner, token)


def check_csrf(request: Request, auth: Auth, token: str | None) -> None:
    if auth.session_token is not None and not csrf_ok(state(request).secret, auth.session_token, token):
        raise service.Forbidden("missing or invalid CSRF token: reload the page and try again")


def require_owner(auth: Auth) -> Auth:
    """The one check for site-owner-only actions (creating users and projects)."""
    if not auth.is_owner:
        raise service.Forbidden("only the site owner may do that")
    return auth


def api_auth(request: Request) -> Auth:
    """Dependency for /api routes: 401 if anonymous; CSRF header on state-changing calls."""
    auth = authenticate(request)
    if auth is None:
        raise service.Unauthorized("log in (POST /api/login) or send Authorization: Bearer <API key>")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        check_csrf(request, auth, request.headers.get("x-csrf-token"))
    return auth


def page_auth(request: Request) -> Auth:
    """Dependency for GET pages: anonymous browsers are sent to the login form."""
    auth = authenticate(request)
    if auth is None:
        raise LoginRequired()
    return auth


@dataclass
class Posted:
    auth: Auth
    form: FormData


async def page_post(request: Request) -> Posted:
    """Dependency for form posts: the login, the form, and its CSRF field checked."""
    auth = await run_in_threadpool(authenticate, request)
    if auth is None:
        raise LoginRequired()
    form = await request.form()
    check_csrf(request, auth, str(form.get("csrf_token", "")))
    return Posted(auth, form)


ApiAuth = Annotated[Auth, Depends(api_auth)]
PageAuth = Annotated[Auth, Depends(page_auth)]
PagePost = Annotated[Posted, Depends(page_post)]


def _api_owner(auth: ApiAuth) -> Auth:
    return require_owner(auth)


def _page_owner(auth: PageAuth) -> Auth:
    return require_owner(auth)


def _owner_post(posted: PagePost) -> Posted:
    require_owner(posted.auth)
    return posted


ApiOwner = Annotated[Auth, Depends(_api_owner)]
PageOwner = Annotated[Auth, Depends(_page_owner)]
OwnerPost = Annotated[Posted, Depends(_owner_post)]

# Database ids are 64-bit signed integers on SQLite and PostgreSQL: a larger number in a URL would
# reach the driver and fail there (a 500), so a path id is checked here and refused with a 422
# that names the parameter, like any other invalid request.
MAX_ID = 2**63 - 1
Id = Annotated[int, Path(ge=1, le=MAX_ID, description="a database id: a positive 64-bit integer")]


# ---------------------------------------------------------------- logins, sessions and cookies


def client_address(request: Request) -> str:
    """The caller's IP address (as reported by a trusted proxy, if configured; see create_app)."""
    return request.client.host if request.client else "unknown"


def cookie_secure(request: Request) -> bool:
    """Whether cookies get the Secure flag: by default when the request came over HTTPS (directly,
    or as a trusted proxy reports it), so a plain-http localhost setup still logs in."""
    setting = state(request).config.secure_cookies
    return request.url.scheme == "https" if setting == "auto" else setting


async def login_user(request: Request, username: str, password: str) -> int:
    """The user id if the password is right, for the JSON and the form login alike.

    Throttled (see LoginThrottle: 429 with Retry-After) and bounded (see HashingGate: 503);
    the throttle is asked again once a hashing slot is free, since failures may have been
    counted while this attempt waited.
    """
    st, address = state(request), client_address(request)

    def refuse_if_throttled() -> None:
        wait = st.throttle.retry_after(username, address)
        if wait > 0:
            headers = retry_after_header(wait)
            raise service.TooManyAttempts(
                f"too many failed logins; try again in {headers['Retry-After']} seconds", headers
            )

    def check() -> int:
        refuse_if_throttled()
        with st.db.session() as s:
            return service.check_password(s, username, password).id

    refuse_if_throttled()
    try:
        user_id = await st.hashing.run(check)
    except HashingBusy:
        raise service.Busy(
            "the server is busy with other logins; try again in a moment", retry_after_header(1)
        ) from None
    except service.Unauthorized:
        st.throttle.failed(username, address)
        raise
    st.throttle.succeeded(username)
    return user_id


def start_session(request: Request, user_id: int) -> str:
    st = state(request)
    with st.db.session(write=True) as s:
        return service.open_session(s, user_id, st.session_times)


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    """The cookie lives as long as the session may (the server ends it sooner when idle)."""
    max_age = int(state(request).session_times.lifetime.total_seconds())
    secure = cookie_secure(request)
    response.set_cookie(COOKIE, token, max_age=max_age, httponly=True, samesite="lax", secure=secure, path="/")


def end_session(request: Request, auth: Auth, response: Response) -> Response:
    """Logout, for the API and the form alike: the session row goes, and so does the cookie."""
    if auth.session_token:
        with state(request).db.session(write=True) as s:
            service.logout(s, auth.session_token)
    response.delete_cookie(COOKIE, path="/")
    return response


def render(
    request: Request, name: str, context: dict[str, Any], auth: Auth | None = None, status: int = 200
) -> Response:
    st = state(request)
    ctx = {"auth": auth, "csrf": auth.csrf(st.secret) if auth else "", **context}
    return st.templates.TemplateResponse(request, name, ctx, status_code=status)


def jsonl_download(rows: Iterable[dict[str, Any]], filename: str) -> StreamingResponse:
    """An export as a JSONL file download, written line by line as it is sent (the rows are read
    in one transaction before; see service.jsonl_line for text that is not valid Unicode)."""
    return StreamingResponse(
        (service.jsonl_line(row) for row in rows),
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )
