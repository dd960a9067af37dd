"""The feedback web app: `create_app(config)` assembles it from the routers (routes/api.py,
routes/pages.py), the error handlers and the middleware; deps.py holds what the routes depend on.

Everything a model wrote is untrusted: templates autoescape, data for scripts goes through
`tojson` into a non-executable <script type="application/json">, and a strict Content-Security-
Policy (no inline scripts) stops anything that might slip through anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.deps import LoginRequired, State, authenticate, is_api, render, state
from rlhfkit.feedback.markdown_safe import render_markdown
from rlhfkit.feedback.playground import Playground
from rlhfkit.feedback.routes import api, chat, pages, review
from rlhfkit.feedback.schemas import problems_text
from rlhfkit.feedback.security import HashingGate, LoginThrottle, load_secret
from rlhfkit.feedback.settings import ServeConfig

HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


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
        return await run_in_threadpool(_error, request, 422, "invalid request: " + problems_text(exc, "body"))

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
        Playground(config),
    )
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(review.router)
    app.include_router(chat.router)
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
