"""The chat page's rules ("playground"), in plain functions over a SQLAlchemy session like
service.py: a signed-in user talks to the served model (playground.py), rates each answer 👍/👎,
or asks for two answers and picks the better one, which then continues the conversation.

A conversation is its user's alone: anyone else gets 404 for it (not 403: whether it exists is
not theirs to learn). A turn is stored only once its answer is written: the model writes outside
any transaction, then `add_turn` stores the user's message and the answer together, after
checking that nothing was added meanwhile (another tab), so a conversation never holds half a turn.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from rlhfkit.data.formats import Pair, Unpaired
from rlhfkit.feedback.models import ChatMessage, Conversation, User, utcnow
from rlhfkit.feedback.playground import Answer
from rlhfkit.feedback.service import Conflict, Invalid, NotFound, iso, plain_snippet

MAX_TURNS = 100  # user messages per conversation: the context has to fit the model anyway


def own_conversation(s: Session, user: User, conversation_id: int) -> Conversation:
    """The user's conversation with its messages, or 404 (also for someone else's)."""
    conv = s.scalar(
        select(Conversation)
        .options(selectinload(Conversation.messages))
        .where(Conversation.id == conversation_id, Conversation.user_id == user.id)
    )
    if conv is None:
        raise NotFound("no such conversation among yours")
    return conv


def waiting_pick(conv: Conversation) -> ChatMessage | None:
    """The last answer, if it is a pair the user has not picked from yet."""
    last = conv.messages[-1] if conv.messages else None
    return last if last is not None and last.content is None else None


def context(conv: Conversation | None, text: str) -> list[dict[str, str]]:
    """The conversation so far plus the user's new message: what the model answers. Refused while
    a pair waits for the user's pick (the picked answer is what the conversation continues from)."""
    if conv is not None:
        if waiting_pick(conv) is not None:
            raise Conflict("pick the better of the two answers first: the conversation continues from it")
        if sum(m.role == "user" for m in conv.messages) >= MAX_TURNS:
            raise Conflict(f"this conversation has reached {MAX_TURNS} messages; start a new one")
    past = [{"role": m.role, "content": m.content or ""} for m in (conv.messages if conv else [])]
    return [*past, {"role": "user", "content": text}]


def add_turn(s: Session, user: User, conversation_id: int | None, seen: int, text: str, answer: Answer) -> Conversation:
    """Store the user's message and the model's answer (or two, to pick from) as the next turn of
    their conversation (a new one if `conversation_id` is None). `seen`: how many messages the
    conversation had when the answer was asked for; if that changed, the answer no longer fits."""
    if conversation_id is None:
        conv = Conversation(user_id=user.id)
        s.add(conv)
        s.flush()
    else:
        conv = own_conversation(s, user, conversation_id)
        if len(conv.messages) != seen:
            raise Conflict("the conversation changed meanwhile (another tab?); reload it and send again")
    now = utcnow()
    two = len(answer.texts) == 2
    s.add_all(
        [
            ChatMessage(conversation_id=conv.id, position=seen, role="user", content=text, created_at=now),
            ChatMessage(
                conversation_id=conv.id,
                position=seen + 1,
                role="assistant",
                content=None if two else answer.texts[0],
                candidates=answer.texts if two else None,
                model=answer.model,
                fingerprint=answer.fingerprint,
                created_at=now,
            ),
        ]
    )
    conv.updated_at = now
    s.flush()
    s.expire(conv, ["messages"])
    return conv


def _answer(s: Session, user: User, conversation_id: int, message_id: int) -> ChatMessage:
    conv = own_conversation(s, user, conversation_id)
    message = next((m for m in conv.messages if m.id == message_id and m.role == "assistant"), None)
    if message is None:
        raise NotFound("no such answer in this conversation")
    return message


def rate(s: Session, user: User, conversation_id: int, message_id: int, up: bool | None) -> ChatMessage:
    """👍 (True), 👎 (False), or take the rating back (None); changing it is allowed any time."""
    message = _answer(s, user, conversation_id, message_id)
    if message.content is None:
        raise Conflict("pick one of the two answers first, then rate it")
    message.thumbs, message.rated_at = up, utcnow() if up is not None else None
    return message


def pick(s: Session, user: User, conversation_id: int, message_id: int, choice: int) -> ChatMessage:
    """The user's pick of the two answers: it becomes the conversation's answer. Final, so the
    conversation that continued from it stays true; picking the same again is harmless."""
    message = _answer(s, user, conversation_id, message_id)
    if message.candidates is None:
        raise Invalid("this answer was not one of two; rate it instead")
    if choice not in (0, 1):
        raise Invalid(f"choice: {choice} is not 0 (the first answer) or 1 (the second)")
    if message.picked is not None:
        if message.picked != choice:
            raise Conflict("you already picked the other answer; the conversation continued from it")
        return message
    message.picked, message.content, message.rated_at = choice, message.candidates[choice], utcnow()
    return message


def conversations_of(s: Session, user: User) -> list[dict[str, Any]]:
    """The user's conversations, newest first, each with its first message as a title."""
    first = select(ChatMessage.conversation_id, ChatMessage.content).where(ChatMessage.position == 0).subquery()
    turns = (
        select(ChatMessage.conversation_id, func.count().label("n"))
        .where(ChatMessage.role == "user")
        .group_by(ChatMessage.conversation_id)
        .subquery()
    )
    rows = s.execute(
        select(Conversation.id, Conversation.updated_at, first.c.content, turns.c.n)
        .join(first, first.c.conversation_id == Conversation.id)
        .join(turns, turns.c.conversation_id == Conversation.id)
        .where(Conversation.user_id == user.id)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    )
    return [
        {"id": cid, "title": plain_snippet(title, 80), "turns": n, "updated_at": iso(at)} for cid, at, title, n in rows
    ]


def conversation_view(conv: Conversation) -> dict[str, Any]:
    waiting = waiting_pick(conv)
    return {
        "id": conv.id,
        "created_at": iso(conv.created_at),
        "waiting_pick": waiting.id if waiting is not None else None,
        "messages": [
            {
                "id": m.id,
                "role": m.role,
                "content": m.content,
                "candidates": m.candidates,
                "picked": m.picked,
                "thumbs": m.thumbs,
                "model": m.model,
                "fingerprint": m.fingerprint,
                "created_at": iso(m.created_at),
            }
            for m in conv.messages
        ],
    }


CHAT_EXPORTS = {
    "thumbs": "KTO records {prompt: the conversation before the answer, completion, label, user} from 👍/👎",
    "pairs": "preference pairs {prompt: the conversation before the answers, chosen, rejected, user} from picks",
}


def export(s: Session, kind: str) -> list[dict[str, Any]]:
    """Every user's chat feedback as training records (see CHAT_EXPORTS); the prompt is the whole
    conversation up to the answer, as a list of {role, content} messages."""
    if kind not in CHAT_EXPORTS:
        raise NotFound(f"no chat export {kind!r}; one of: {', '.join(CHAT_EXPORTS)}")
    convs = s.scalars(
        select(Conversation).options(selectinload(Conversation.messages), selectinload(Conversation.user))
        .order_by(Conversation.id)
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    for conv in convs:
        for i, m in enumerate(conv.messages):
            prompt = [{"role": p.role, "content": p.content or ""} for p in conv.messages[:i]]
            if kind == "thumbs" and m.thumbs is not None and m.content is not None:
                row = Unpaired(prompt=prompt, completion=m.content, label=m.thumbs, user=conv.user.username)
                rows.append(row.to_json())
            elif kind == "pairs" and m.picked is not None and m.candidates is not None:
                chosen, rejected = m.candidates[m.picked], m.candidates[1 - m.picked]
                if chosen.strip() != rejected.strip():  # two identical answers prefer nothing
                    pair = Pair(prompt=prompt, chosen=chosen, rejected=rejected, user=conv.user.username)
                    rows.append(pair.to_json())
    return rows
