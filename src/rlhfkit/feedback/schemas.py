"""What clients may send. Every field has a size limit and no field may hold a NUL character
(PostgreSQL text cannot store one), so bad input is a clear 422, never a half-done write."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_COMMENT = 5_000
MAX_RESPONSE = 50_000
MAX_GUIDELINES = 100_000


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def text(max_length: int, min_length: int = 0) -> type[str]:
    return Annotated[str, Field(min_length=min_length, max_length=max_length), AfterValidator(_no_nul)]  # type: ignore[return-value]


Username = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]
ClientToken = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
Role = Literal["admin", "labeler"]
Task = Literal["ranking", "pairwise", "demonstration"]


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(In):
    username: text(64, 1)
    password: text(1000, 1)


class UserIn(In):
    username: Username
    password: text(1000, 8) | None = None  # None: an API-key-only user (a script)
    is_owner: StrictBool = False


class ProjectIn(In):
    name: text(100, 1)
    task: Task = "ranking"
    guidelines: text(MAX_GUIDELINES) = ""
    overlap: StrictInt = Field(3, ge=1, le=100)


class ProjectSettingsIn(In):
    guidelines: text(MAX_GUIDELINES) | None = None
    overlap: StrictInt | None = Field(None, ge=1, le=100)


class MemberIn(In):
    username: Username
    role: Role = "labeler"


class ApiKeyIn(In):
    name: text(100, 1) = "script"


class DraftIn(In):
    """A labeler's unfinished work, saved as they go; partial and unchecked by design."""

    ranks: dict[int, StrictInt | None] = Field(default_factory=dict, max_length=100)
    unusable: StrictBool = False
    comment: text(MAX_COMMENT) = ""
    response: text(MAX_RESPONSE) = ""


class JudgmentIn(In):
    """A submitted judgment. `ranking` maps candidate id -> rank (1 = best, equal = tie, dense).

    `client_token` makes submits idempotent: send the same token again (a retry, a double
    click) and you get the stored judgment back instead of a second one.
    """

    ranking: dict[int, StrictInt] | None = Field(None, max_length=100)
    unusable: StrictBool = False
    comment: text(MAX_COMMENT) | None = None
    response: text(MAX_RESPONSE) | None = None
    client_token: ClientToken
