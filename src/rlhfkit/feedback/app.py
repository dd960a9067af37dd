"""The feedback web app: `create_app(config)` builds it; api.py and pages.py hold the routes.

Two ways in, one set of rules: browsers log in and carry a session cookie (every state-changing
request must also carry the session's CSRF token), scripts send `Authorization: Bearer <API key>`
(no cookie, so no CSRF). Both end at the same `service` functions.

Everything a model wrote is untrusted: templates autoescape, data for scripts goes through
`tojson` into a non-executable <script type="application/json">, and a strict Content-Security-
Policy (no inline scripts) stops anything that might slip through anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.markdown_safe import render_markdown
from rlhfkit.feedback.security import (
    HashingBusy,
    HashingGate,
    LoginThrottle,
    csrf_ok,
    csrf_token,
    load_secret,
    retry_after_header,
)
from rlhfkit.feedback.settings import ServeConfig

HERE = Path(__file__).parent
COOKIE = "rlhfkit_session"
LOGIN_COOKIE = "rlhfkit_login"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass
class State:
    """What every request needs, hung on app.state.feedback."""

    config: ServeConfig
    db: Database
    secret: bytes
    templates: Jinja2Templates
    throttle: LoginThrottle
    hashing: HashingGate

    @property
    def lease(self) -> timedelta:
        return timedelta(minutes=self.config.lease_minutes)

    @property
    def session_times(self) -> service.SessionTimes:
        return service.SessionTimes(
            idle=timedelta(hours=self.config.session_idle_hours), lifetime=timedelta(days=self.config.session_days)
        )


@dataclass
class Auth:
    """The caller. `session_token` is None for API-key callers (they need no CSRF token)."""

    user_id: int
    username: str
    is_owner: bool
    session_token: str | None

    def csrf(self, secret: bytes) -> str:
        return csrf_token(secret, self.session_token) if self.session_token else ""


class LoginRequired(Exception):
    """An anonymous browser asked for a page: send it to the login form."""


def state(request: Request) -> State:
    return request.app.state.feedback


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


def render(
    request: Request, name: str, context: dict[str, Any], auth: Auth | None = None, status: int = 200
) -> Response:
    st = state(request)
    ctx = {"auth": auth, "csrf": auth.csrf(st.secret) if auth else "", **context}
    return st.templates.TemplateResponse(request, name, ctx, status_code=status)


# ---------------------------------------------------------------- errors


def _error(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    if is_api(request):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    auth = None
    if status not in (401, 403):
        try:
            auth = authenticate(request)
        except service.ServiceError:
            auth = None
    response = render(request, "error.html", {"status": status, "message": message}, auth, status=status)
    response.headers.update(headers or {})
    return response


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(service.ServiceError)
    async def _service(request: Request, exc: service.ServiceError) -> Response:
        return await run_in_threadpool(_error, request, exc.status, exc.message, exc.headers)

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        if is_api(request):
            return JSONResponse({"error": "not logged in"}, status_code=401)
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return await run_in_threadpool(_error, request, 422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 413:
            cfg = state(request).config
            message = f"request body too large: the limit is {cfg.max_body_kb} KB ({cfg.max_upload_mb} MB for imports)"
        return await run_in_threadpool(_error, request, exc.status_code, message)

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> Response:
        return await run_in_threadpool(_error, request, 409, "conflicts with data saved meanwhile; reload and retry")


# ---------------------------------------------------------------- body limit and headers


class Guard:
    """A pure ASGI middleware: caps request bodies (413 before the body is parsed, whether or not
    it declares a Content-Length; imports, paths ending in /import, may be larger) and adds the
    CSP and other security headers to every response."""

    HEADERS = [
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    ]

    def __init__(self, app: Callable[..., Awaitable[None]], max_body: int, max_upload: int):
        self.app, self.max_body, self.max_upload = app, max_body, max_upload

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[..., Awaitable[Any]],
        send: Callable[..., Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload if scope["path"].endswith("/import") else self.max_body
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        counting = not length.isdigit()  # no usable Content-Length: count the bytes as they come
        seen = 0 if counting else int(length)

        async def limited_receive() -> Any:
            nonlocal seen
            if seen > limit:  # declared too large: refuse before reading any of it
                raise StarletteHTTPException(413)
            message = await receive()
            if message["type"] == "http.request" and counting:
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413)
            return message

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


# ---------------------------------------------------------------- the app


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["markdown"] = render_markdown
    return templates


def create_app(config: ServeConfig, db: Database | None = None) -> FastAPI:
    """The ASGI app. Migrates the database first, so a fresh file or database just works."""
    from rlhfkit.feedback import api, pages, review_pages

    db = db or Database(config.db_url)
    db.migrate()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        db.dispose()

    app = FastAPI(
        title="rlhfkit feedback",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.feedback = State(
        config,
        db,
        load_secret(config.secret_key_file),
        _templates(),
        LoginThrottle(
            config.login_max_failures,
            config.login_max_failures_per_ip,
            config.login_backoff_seconds,
            config.login_backoff_max_seconds,
        ),
        HashingGate(config.password_hash_concurrency, config.password_hash_wait_seconds),
    )
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(review_pages.router)
    app.add_middleware(
        Guard,  # type: ignore[arg-type]
        max_body=config.max_body_kb * 1024,
        max_upload=config.max_upload_mb * 1024 * 1024,
    )
    if config.trusted_proxies:
        # Outermost: the client address (login throttling) and the scheme (Secure cookies) are the
        # ones the proxy reports, and only when the request really comes from that proxy.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=config.trusted_proxies)  # type: ignore[arg-type]
    return app
