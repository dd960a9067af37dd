"""The chat page ("playground") and its JSON twin: a signed-in user talks to the served model,
rates answers 👍/👎 or picks the better of two. Every route is a plain `def`, so FastAPI runs it
in its thread pool: while the model writes an answer the event loop serves everyone else.

    GET  /chat, /chat/{cid}                         pages (a user's own conversations only)
    POST /chat                                      start a conversation (form: content, two)
    POST /chat/{cid}                                send the next message
    POST /chat/{cid}/messages/{mid}/thumbs|pick     rate an answer, pick one of two
    GET  /api/chat, /api/chat/{cid}; POST /api/chat, /api/chat/{cid}/messages  <- {"content", "two"}
    PUT  /api/chat/{cid}/messages/{mid}/thumbs <- {"up"}; .../pick <- {"choice": 0 | 1}
    GET  /api/chat/export/{thumbs|pairs}            the site owner: everyone's feedback, for training
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from rlhfkit.feedback import chat, service
from rlhfkit.feedback.deps import (
    ApiAuth,
    ApiOwner,
    Auth,
    Id,
    PageAuth,
    PagePost,
    Posted,
    State,
    jsonl_download,
    render,
    state,
)
from rlhfkit.feedback.playground import NoModel
from rlhfkit.feedback.routes.pages import redirect, small_int
from rlhfkit.feedback.schemas import ChatIn, PickIn, ThumbsIn

router = APIRouter()


def send(st: State, auth: Auth, conversation_id: int | None, data: ChatIn) -> int:
    """The user's message and the model's answer(s) as the conversation's next turn; returns the
    conversation's id. The model writes with no transaction open (see chat.add_turn)."""
    with st.db.session() as s:
        user = auth.user(s)
        conv = chat.own_conversation(s, user, conversation_id) if conversation_id is not None else None
        context = chat.context(conv, data.content)
        seen = len(conv.messages) if conv is not None else 0
        name = user.username
    answer = st.playground.answer(context, n=2 if data.two else 1, user=name)
    return st.db.transact(lambda s: chat.add_turn(s, auth.user(s), conversation_id, seen, data.content, answer).id)


# ---------------------------------------------------------------- pages


def _page(request: Request, auth: Auth, conversation_id: int | None, error: str = "", draft: str = "") -> Response:
    """The chat page: the user's conversations beside the open one (or a new one); `error` and
    `draft` (the message that was not sent, kept) after a refused send."""
    st = state(request)
    with st.db.session() as s:
        user = auth.user(s)
        conv = chat.own_conversation(s, user, conversation_id) if conversation_id is not None else None
        context = {
            "conversations": chat.conversations_of(s, user),
            "conv": chat.conversation_view(conv) if conv is not None else None,
            "model": st.playground.path,
            "error": error,
            "draft": draft,
        }
    return render(request, "chat.html", context, auth, status=422 if error else 200)


@router.get("/chat")
def chat_home(request: Request, auth: PageAuth) -> Response:
    return _page(request, auth, None)


@router.get("/chat/{cid}")
def chat_page(cid: Id, request: Request, auth: PageAuth) -> Response:
    return _page(request, auth, cid)


def _send_form(request: Request, posted: Posted, cid: int | None) -> Response:
    form = posted.form
    content = str(form.get("content", "")).replace("\r\n", "\n")
    try:
        data = service.checked(ChatIn, content=content, two=form.get("two") in ("1", "on", "true"))
        new_id = send(state(request), posted.auth, cid, data)
    except (service.Invalid, service.Conflict, NoModel) as e:
        return _page(request, posted.auth, cid, error=e.message, draft=content)
    return redirect(f"/chat/{new_id}")


@router.post("/chat")
def chat_start(request: Request, posted: PagePost) -> Response:
    return _send_form(request, posted, None)


@router.post("/chat/{cid}")
def chat_send(cid: Id, request: Request, posted: PagePost) -> Response:
    return _send_form(request, posted, cid)


@router.post("/chat/{cid}/messages/{mid}/thumbs")
def chat_thumbs(cid: Id, mid: Id, request: Request, posted: PagePost) -> Response:
    raw = str(posted.form.get("up", ""))
    data = service.checked(ThumbsIn, up={"1": True, "0": False, "": None}.get(raw, raw))
    state(request).db.transact(lambda s: chat.rate(s, posted.auth.user(s), cid, mid, data.up))
    return redirect(f"/chat/{cid}")


@router.post("/chat/{cid}/messages/{mid}/pick")
def chat_pick(cid: Id, mid: Id, request: Request, posted: PagePost) -> Response:
    choice = service.checked(PickIn, choice=small_int(str(posted.form.get("choice", "")))).choice
    state(request).db.transact(lambda s: chat.pick(s, posted.auth.user(s), cid, mid, choice))
    return redirect(f"/chat/{cid}")


# ---------------------------------------------------------------- JSON


@router.get("/api/chat")
def api_conversations(request: Request, auth: ApiAuth) -> dict[str, Any]:
    st = state(request)
    with st.db.session() as s:
        return {"model": st.playground.path or None, "conversations": chat.conversations_of(s, auth.user(s))}


def _view(request: Request, auth: Auth, cid: int) -> dict[str, Any]:
    with state(request).db.session() as s:
        return chat.conversation_view(chat.own_conversation(s, auth.user(s), cid))


@router.post("/api/chat", status_code=201)
def api_start(data: ChatIn, request: Request, auth: ApiAuth) -> dict[str, Any]:
    return _view(request, auth, send(state(request), auth, None, data))


@router.get("/api/chat/{cid}")
def api_conversation(cid: Id, request: Request, auth: ApiAuth) -> dict[str, Any]:
    return _view(request, auth, cid)


@router.post("/api/chat/{cid}/messages")
def api_send(cid: Id, data: ChatIn, request: Request, auth: ApiAuth) -> dict[str, Any]:
    return _view(request, auth, send(state(request), auth, cid, data))


@router.put("/api/chat/{cid}/messages/{mid}/thumbs")
def api_thumbs(cid: Id, mid: Id, data: ThumbsIn, request: Request, auth: ApiAuth) -> dict[str, Any]:
    state(request).db.transact(lambda s: chat.rate(s, auth.user(s), cid, mid, data.up))
    return _view(request, auth, cid)


@router.put("/api/chat/{cid}/messages/{mid}/pick")
def api_pick(cid: Id, mid: Id, data: PickIn, request: Request, auth: ApiAuth) -> dict[str, Any]:
    state(request).db.transact(lambda s: chat.pick(s, auth.user(s), cid, mid, data.choice))
    return _view(request, auth, cid)


@router.get("/api/chat/export/{kind}")
def api_export(kind: str, request: Request, auth: ApiOwner) -> Response:
    """JSONL of everyone's chat feedback (chat.CHAT_EXPORTS): the site owner's, like the users list."""
    with state(request).db.session() as s:
        rows = chat.export(s, kind)

    return jsonl_download(rows, f"chat-{kind}.jsonl")
