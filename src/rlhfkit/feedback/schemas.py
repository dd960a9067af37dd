"""What clients may send. Every field has a size limit and only holds text a database can store
(see `text_problem`), so bad input is a clear 422, never a half-done write or a page that can
never be shown again."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from rlhfkit.errors import validation_problems
from rlhfkit.feedback.choices import DEFAULT_ROLE, DEFAULT_TASK, ReviewStatus, Role, Task
from rlhfkit.feedback.security import password_problem

MAX_COMMENT = 5_000
MAX_RESPONSE = 50_000
MAX_GUIDELINES = 100_000
# Candidates per item: the import refuses more, and a judgment ranks at most this many. One
# number for both, so an item that was imported can always be judged.
MAX_CANDIDATES = 100
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: str, allow_nul: bool = False) -> str | None:
    """Why `value` is not text a database can store and a page can show, or None if it is.

    A NUL character cannot be stored in PostgreSQL text; `allow_nul` is for text stored inside
    JSON (imported prompts and completions), where it is kept as the escape \\u0000 on both
    databases (model output can hold one: byte-level tokenizers decode it). A lone UTF-16
    surrogate (what JavaScript tools write for half of an emoji, `\\ud800` in JSON) is stored,
    but it is not Unicode: it cannot be encoded as UTF-8, so every page or export with it fails.
    """
    if "\x00" in value and not allow_nul:
        return "contains a NUL character (\\u0000), which the database cannot store; remove it"
    bad = _SURROGATE.search(value)
    if bad:
        return (
            f"contains a lone UTF-16 surrogate (\\u{ord(bad.group()):04x} at character {bad.start()}), which is "
            "not valid Unicode; fix the broken character (e.g. re-export the file as UTF-8)"
        )
    return None


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def text(max_length: int, min_length: int = 0) -> type[str]:
    return Annotated[str, Field(min_length=min_length, max_length=max_length), AfterValidator(_storable)]  # type: ignore[return-value]


Username = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]
ClientToken = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]


def problems_text(err: Any, root: str = "form") -> str:
    """A ValidationError (of these schemas, or FastAPI's of a request) as one line that names each
    field: `role: Input should be 'admin' or 'labeler'`. A request's `body.` prefix is dropped:
    the body is where every field is."""
    return "; ".join(f"{where.removeprefix('body.')}: {msg}" for where, msg, _ in validation_problems(err, root))


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(In):
    username: text(64, 1)
    password: text(1000, 1)


class UserIn(In):
    username: Username
    password: text(1000, 1) | None = None  # None: an API-key-only user (a script)
    is_owner: StrictBool = False

    @field_validator("password")
    @classmethod
    def _strong(cls, password: str | None, info: ValidationInfo) -> str | None:
        problem = password_problem(password, info.data.get("username", "")) if password is not None else None
        if problem:
            raise ValueError(problem)
        return password


MAX_CRITERIA = 20
MAX_SCALE = 100  # the most points a rating scale may have (a select box, a column of radio buttons)


class Criterion(In):
    """One thing a rating project scores each response on, with its own scale and guideline
    (InstructGPT's Likert ratings: helpful, honest, harmless on 1-7)."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]  # export's ?criterion=, form field names
    min: StrictInt = Field(1, ge=-MAX_SCALE, le=MAX_SCALE)
    max: StrictInt = Field(7, ge=-MAX_SCALE, le=MAX_SCALE)
    guideline: text(5_000) = ""

    @field_validator("max")
    @classmethod
    def _scale(cls, v: int, info: ValidationInfo) -> int:
        low = info.data.get("min")
        if low is not None and not low < v <= low + MAX_SCALE:
            raise ValueError(f"the scale {low}..{v} must have min < max and at most {MAX_SCALE + 1} points")
        return v


DEFAULT_CRITERION = Criterion(name="overall")


class ProjectIn(In):
    name: text(100, 1)
    task: Task = DEFAULT_TASK
    guidelines: text(MAX_GUIDELINES) = ""
    overlap: StrictInt = Field(3, ge=1, le=100)
    # Rating projects only: what each response is scored on (default: one "overall" 1-7 scale).
    criteria: list[Criterion] | None = Field(None, min_length=1, max_length=MAX_CRITERIA)

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, v: list[Criterion] | None, info: ValidationInfo) -> list[Criterion] | None:
        if v is None:
            return v
        if info.data.get("task") != "rating":
            raise ValueError("only a rating project has criteria")
        names = [c.name for c in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"criterion name(s) {twice} appear more than once")
        return v


class ProjectSettingsIn(In):
    guidelines: text(MAX_GUIDELINES) | None = None
    overlap: StrictInt | None = Field(None, ge=1, le=100)
    locked: StrictBool | None = None  # True: no more submits, skips, edits or send-backs


class MemberIn(In):
    username: Username
    role: Role = DEFAULT_ROLE


class ApiKeyIn(In):
    name: text(100, 1) = "script"


class DraftIn(In):
    """A labeler's unfinished work, saved as they go; partial and unchecked by design."""

    ranks: dict[int, StrictInt | None] = Field(default_factory=dict, max_length=MAX_CANDIDATES)
    unusable: StrictBool = False
    comment: text(MAX_COMMENT) = ""
    response: text(MAX_RESPONSE) = ""
    strength: Literal[1, 2, 3] | None = None
    scores: dict[str, dict[int, StrictInt | None]] = Field(default_factory=dict, max_length=MAX_CRITERIA)


# criterion name -> candidate id -> score (rating and thumbs tasks; thumbs: {"thumbs": {id: 1 up / 0 down}})
Scores = dict[str, dict[int, StrictInt]]


class JudgmentIn(In):
    """A submitted judgment. `ranking` maps candidate id -> rank (1 = best, equal = tie, dense);
    a rating or thumbs task sends `scores` instead: criterion -> candidate id -> score, every
    candidate on every criterion of the project (thumbs: the one criterion "thumbs", 1 up, 0 down).

    `client_token` makes submits idempotent: send the same token again (a retry, a double
    click) and you get the stored judgment back instead of a second one.
    """

    ranking: dict[int, StrictInt] | None = Field(None, max_length=MAX_CANDIDATES)
    unusable: StrictBool = False
    comment: text(MAX_COMMENT) | None = None
    response: text(MAX_RESPONSE) | None = None
    # How much better each rank is than the next: 1 slightly, 2 better, 3 much (formats.STRENGTHS).
    strength: Literal[1, 2, 3] | None = None
    scores: Scores | None = Field(None, max_length=MAX_CRITERIA)
    client_token: ClientToken


class ExcludedIn(In):
    """Whether a labeler's judgments in a project are left out (reversible)."""

    excluded: StrictBool


class ReviewFilterIn(In):
    """The admin review list's filters, every one optional; from a query string, so numbers and
    booleans are parsed from text (not strict)."""

    status: ReviewStatus | None = None
    min_disagreement: float | None = Field(None, ge=0, le=1)
    has_comment: bool | None = None
    labeler: Username | None = None
    page: int = Field(1, ge=1, le=1_000_000)


MAX_CHAT_MESSAGE = 10_000


class ChatIn(In):
    """A message to the chat model; `two`: ask for two answers to pick the better from."""

    content: text(MAX_CHAT_MESSAGE, 1)
    two: StrictBool = False

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("write a message first")
        return v


class ThumbsIn(In):
    up: StrictBool | None  # True 👍, False 👎, None: no rating


class PickIn(In):
    choice: Literal[0, 1]  # the first or the second of the two answers
