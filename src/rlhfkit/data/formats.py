"""The data formats every stage reads and writes, validated on load.

One record type per format (JSONL, one object per line, or a Hugging Face `datasets` folder):

    prompts          {"id": "p1", "prompt": "How do I brew coffee?", "user": "ann"}
    demonstrations   {"prompt": "...", "response": "..."}
    completions      {"prompt_id": "p1", "prompt": "...", "completions": ["...", "..."]}
    rankings         {"prompt_id": "p1", "labeler": "ann", "ranking": [2, 1, 1], "unusable": false,
                      "strength": 3}
    pairs            {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 0.5, "user": "ann"}
    ratings          {"prompt": "...", "completion": "...", "score": 0.7, "user": "ann"}

A ranking gives candidate i the rank `ranking[i]` (1 = best); equal ranks are ties; ranks are dense
(1, 2, 2, 3 but never 1, 3). The optional `strength` says how much better each rank is than the
next one (STRENGTHS: 1 slightly, 2 better, 3 much better; absent = 2). The optional `user` of a
prompt, pair, rating or unpaired row is whose preference it is (personalisation,
docs/personalization.md): a pair's or rating's is the labeler who made it, or the user who chatted
with the model on the feedback server's playground; a prompt's is the user the policy answers.
Wherever a prompt or
response is allowed, a conversation (a list of `{"role", "content"}` messages) is allowed too; it
is rendered with the tokenizer's chat template.

Errors read `path:line: field: what is wrong` and are raised before anything is written, so a bad
file never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rlhfkit.config import atomic_write_text
from rlhfkit.errors import UserError, validation_problems

MAX_LINE_BYTES = 1_000_000  # a "huge line" is almost always a broken file, not a real record
UTF8_BOM = b"\xef\xbb\xbf"
log = logging.getLogger(__name__)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


Text = str | list[Message]


def _check_text(value: Text, what: str, allow_empty: bool = False) -> Text:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise ValueError(f"{what} is empty")
        return value
    if not value:
        raise ValueError(f"{what} is an empty conversation")
    if not allow_empty and all(not m.content.strip() for m in value):
        raise ValueError(f"{what} has only empty messages")
    return value


def text_key(value: Text) -> str:
    """A hashable identity of a prompt/response (conversations compare by their JSON)."""
    if isinstance(value, str):
        return value
    return json.dumps([m.model_dump() for m in value], sort_keys=True)


def text_to_json(value: Text) -> Any:
    return value if isinstance(value, str) else [m.model_dump() for m in value]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)
    # `path:line` a record was read from, so cross-file checks can point at it too.
    _where: str | None = PrivateAttr(default=None)
    # Optional keys and the value a row without one is written with when other rows of the file
    # have it (`write_records`): every row of a file has the same columns.
    fill: ClassVar[dict[str, Any]] = {}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def __eq__(self, other: object) -> bool:
        """Records are equal by content; where they were read from does not count."""
        return type(self) is type(other) and self.model_dump() == other.model_dump()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]  # mutable, like BaseModel


def check_user(v: str | None) -> str | None:
    """A user name as personalisation renders it into a prompt (`data.chat.with_user`): one line."""
    if v is not None and (not v.strip() or v != v.strip() or "\n" in v or len(v) > 100):
        raise ValueError(f"user {v!r} must be a non-empty name on one line, without surrounding spaces, ≤ 100 chars")
    return v


class PromptRecord(Record):
    id: str
    prompt: Text
    user: str | None = None  # whom the policy answers (personalisation); absent = anyone

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        return check_user(v)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("id is empty")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")


class Demonstration(Record):
    """A prompt and the response to learn; or, with `prompt` None, a plain text to learn whole
    (TRL's language-modeling `{"text": ...}`: no template, the loss on every token)."""

    prompt: Text | None
    response: Text

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text | None) -> Text | None:
        return v if v is None else _check_text(v, "prompt")

    @field_validator("response")
    @classmethod
    def _response(cls, v: Text) -> Text:
        return _check_text(v, "response")

    @model_validator(mode="after")
    def _plain_text(self) -> Demonstration:
        if self.prompt is None and not isinstance(self.response, str):
            raise ValueError("a text without a prompt must be a string")
        return self

    @property
    def key(self) -> Text:
        """What identifies the example's prompt (a plain text has none: the text itself)."""
        return self.response if self.prompt is None else self.prompt

    def to_json(self) -> dict[str, Any]:
        return {"text": self.response} if self.prompt is None else super().to_json()


class Completions(Record):
    prompt_id: str
    prompt: Text
    completions: list[Text]

    @field_validator("prompt_id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt_id is empty")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")

    @field_validator("completions")
    @classmethod
    def _completions(cls, v: list[Text]) -> list[Text]:
        # A model may legitimately produce an empty completion; labelers should see it.
        if len(v) < 2:
            raise ValueError(f"need at least 2 candidates to rank, got {len(v)}")
        return v


# Strength of preference: how much better each rank is than the next. The margin is the log-odds
# that a labeler prefers the better one (60%, 75%, 90%): the units of a reward model's margin loss
# and of the consensus margins. A ranking that does not say is taken as "better".
STRENGTHS = {1: "slightly better", 2: "better", 3: "much better"}
STRENGTH_MARGINS = {1: 0.4, 2: 1.1, 3: 2.2}
DEFAULT_STRENGTH = 2


class Ranking(Record):
    prompt_id: str
    labeler: str
    ranking: list[int]
    unusable: bool = False
    comment: str | None = None
    strength: Literal[1, 2, 3] | None = None

    @field_validator("prompt_id", "labeler")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        return v

    @field_validator("ranking")
    @classmethod
    def _ranking(cls, v: list[int]) -> list[int]:
        check_ranks(v)
        return v


def check_ranks(ranks: Sequence[int]) -> None:
    """Ranks are 1-based and dense: ties share a rank, and no rank is skipped."""
    if len(ranks) < 2:
        raise ValueError(f"ranking needs at least 2 candidates, got {len(ranks)}")
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks start at 1 (best); got {list(ranks)}")
    used = sorted(set(ranks))
    if used != list(range(1, len(used) + 1)):
        raise ValueError(f"ranks must be dense (1, 2, 2, 3 - no gaps); got {list(ranks)}")


class Pair(Record):
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    user: str | None = None  # whose preference (the labeler, the chatting user); a personalised RM learns per user

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        return check_user(v)

    # No margin is a margin of 0 in the loss; `datasets` would read a missing one as null, and
    # TRL's RewardTrainer fails on a null (`rlhfkit cai mix` writes human pairs next to AI ones).
    fill: ClassVar[dict[str, Any]] = {"margin": 0.0}

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")

    @field_validator("chosen", "rejected")
    @classmethod
    def _response(cls, v: Text) -> Text:
        # An empty completion can be ranked (see Completions), so it can be either side of a pair.
        return _check_text(v, "response", allow_empty=True)

    @field_validator("margin")
    @classmethod
    def _margin(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("margin must be a finite number")
        return v

    @field_validator("rejected")
    @classmethod
    def _distinct(cls, v: Text, info: ValidationInfo) -> Text:
        chosen = info.data.get("chosen")
        if chosen is not None and text_key(chosen) == text_key(v):
            raise ValueError("identical to chosen: the pair carries no preference")
        return v


class _Completion(Record):
    """A prompt and one completion of it: what unpaired preferences and ratings share."""

    prompt: Text
    completion: Text
    user: str | None = None  # whose judgment (the labeler, the chatting user); kept for per-user models

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        return check_user(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")

    @field_validator("completion")
    @classmethod
    def _completion(cls, v: Text) -> Text:
        return _check_text(v, "completion", allow_empty=True)


class Unpaired(_Completion):
    """One judged completion (TRL's unpaired preference, KTO's input): `label` true = desirable.
    Not a format of its own: a prompt's desirable and undesirable completions are paired."""

    label: bool


def unpaired_to_pairs(rows: Sequence[Unpaired]) -> tuple[list[Pair], int]:
    """Every (desirable, undesirable) completion pair of the same prompt, in file order, and how
    many prompts gave none (only one kind of label). Identical texts are skipped."""
    by_prompt: dict[str, tuple[Text, list[Text], list[Text]]] = {}
    for r in rows:
        _, good, bad = by_prompt.setdefault(text_key(r.prompt), (r.prompt, [], []))
        (good if r.label else bad).append(r.completion)
    pairs = [
        Pair(prompt=prompt, chosen=g, rejected=b)
        for prompt, good, bad in by_prompt.values()
        for g in good
        for b in bad
        if text_key(g) != text_key(b)
    ]
    return pairs, sum(not good or not bad for _, good, bad in by_prompt.values())


class Rating(_Completion):
    """A completion scored on a scale (regression reward models learn the score)."""

    score: float

    @field_validator("score")
    @classmethod
    def _score(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("score must be a finite number")
        return v


FORMATS: dict[str, type[Record]] = {
    "prompts": PromptRecord,
    "demonstrations": Demonstration,
    "completions": Completions,
    "rankings": Ranking,
    "pairs": Pair,
    "ratings": Rating,
}

# The key that must be unique across a file, where there is one.
_UNIQUE_KEY = {"prompts": ("id",), "completions": ("prompt_id",), "rankings": ("prompt_id", "labeler")}


class ShapeError(ValueError):
    """A record of a TRL shape that cannot become one of our formats; `field` is the user's column."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


def _from_text(obj: dict[str, Any], n: int) -> dict[str, Any]:
    return {"prompt": None, "response": obj.pop("text"), **obj}


def _from_messages(obj: dict[str, Any], n: int) -> dict[str, Any]:
    """The last message (the assistant's) is the response, the messages before it the prompt."""
    msgs = obj.pop("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict):
        raise ShapeError("messages", "must be a list of {role, content} messages: a prompt, then the assistant's")
    if msgs[-1].get("role") != "assistant":
        raise ShapeError("messages", f"the last message has role {msgs[-1].get('role')!r}; it must be the assistant's")
    return {"prompt": msgs[:-1], "response": msgs[-1:], **obj}


def _from_prompt_completion(obj: dict[str, Any], n: int) -> dict[str, Any]:
    return {"prompt": obj.pop("prompt"), "response": obj.pop("completion"), **obj}


ASSISTANT_MARK = "Assistant:"  # where the last turn starts in HH-RLHF-style dialogue strings


def _shared_start(chosen: Any, rejected: Any) -> int:
    """How many leading messages (conversations) or characters (strings) chosen and rejected share.

    A string's cut moves back to just after the last `Assistant:` in the shared start (two answers
    that both begin "Sure," still have "Sure," as response), else to a whitespace, so that no
    word is split between prompt and response."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        mark = chosen.rfind(ASSISTANT_MARK, 0, n)
        if mark >= 0:
            return mark + len(ASSISTANT_MARK)
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
    return n


def _from_implicit_prompt(obj: dict[str, Any], n: int) -> dict[str, Any]:
    """TRL's implicit-prompt preference (HH-RLHF, UltraFeedback): the shared start is the prompt."""
    chosen, rejected = obj.pop("chosen"), obj.pop("rejected")
    if isinstance(chosen, str) != isinstance(rejected, str) or not isinstance(chosen, str | list):
        raise ShapeError("chosen", "chosen and rejected must both be texts or both conversations")
    cut = _shared_start(chosen, rejected)
    prompt = chosen[:cut].rstrip() if isinstance(chosen, str) else chosen[:cut]
    if not prompt:
        raise ShapeError("chosen", "no prompt: chosen and rejected share no start (add a `prompt` column)")
    rest = (chosen[cut:], rejected[cut:])
    if isinstance(chosen, str):
        rest = (rest[0].strip(), rest[1].strip())
    return {"prompt": prompt, "chosen": rest[0], "rejected": rest[1], **obj}


def _with_row_id(obj: dict[str, Any], n: int) -> dict[str, Any]:
    return {"id": f"row{n}", **obj}


def _as_is(obj: dict[str, Any], n: int) -> dict[str, Any]:
    return obj


class Shape(NamedTuple):
    """A TRL dataset type, read as one of our formats."""

    name: str  # as TRL's documentation calls it
    kind: str  # the format it becomes
    keys: frozenset[str]  # the columns that identify it
    adapt: Callable[[dict[str, Any], int], dict[str, Any]]  # (row, line or row number) -> the record's keys
    renamed: dict[str, str]  # our field -> the user's column, for error messages
    record: type[Record] | None = None  # what a row is validated as; None = the format's own record


SHAPES = (
    Shape("language modeling", "demonstrations", frozenset({"text"}), _from_text, {"response": "text"}),
    Shape(
        "language modeling (conversational)", "demonstrations", frozenset({"messages"}), _from_messages,
        {"prompt": "messages", "response": "messages"},
    ),
    Shape(
        "prompt-completion", "demonstrations", frozenset({"prompt", "completion"}), _from_prompt_completion,
        {"response": "completion"},
    ),
    Shape("prompt-only", "prompts", frozenset({"prompt"}), _with_row_id, {}),
    Shape(
        "preference (implicit prompt)", "pairs", frozenset({"chosen", "rejected"}), _from_implicit_prompt,
        {"prompt": "chosen"},
    ),
    Shape("unpaired preference", "pairs", frozenset({"prompt", "completion", "label"}), _as_is, {}, Unpaired),
)  # fmt: skip


def _required(cls: type[Record]) -> frozenset[str]:
    return frozenset(n for n, f in cls.model_fields.items() if f.is_required())


def shape_of(kind: str, obj: dict[str, Any]) -> Shape | None:
    """The TRL shape a record of `kind` has, or None for our own format (also when it matches neither,
    so that the error names our format's missing keys): ours when all its keys are there, else the
    shape naming the most columns."""
    if _required(FORMATS[kind]) <= obj.keys():
        return None
    fits = [s for s in SHAPES if s.kind == kind and s.keys <= obj.keys()]
    return max(fits, key=lambda s: len(s.keys), default=None)


def _explain(err: ValidationError, renamed: dict[str, str] | None = None) -> str:
    by_loc: dict[str, list[str]] = {}
    for loc, msg, kind in validation_problems(err, root="<record>"):
        head, dot, tail = loc.partition(".")
        loc = (renamed or {}).get(head, head) + dot + tail
        if kind == "extra_forbidden":
            msg = "unknown key (check the spelling; see the formats in README)"
        elif kind in ("string_type", "list_type"):
            msg = "must be text or a list of {role, content} messages"
        by_loc.setdefault(loc, []).append(msg)
    return "; ".join(f"{loc}: {' / '.join(dict.fromkeys(msgs))}" for loc, msgs in by_loc.items())


def detect_kind(obj: dict[str, Any]) -> str:
    """Guess the format of a record from its keys (for `rlhfkit data validate` without --kind): one
    of ours, or a TRL shape with exactly its columns (with extra columns, name the kind)."""
    keys = set(obj)
    for kind, cls in FORMATS.items():
        if _required(cls) <= keys <= set(cls.model_fields):
            return kind
    for shape in SHAPES:
        if keys == shape.keys:
            return shape.kind
    raise ValueError(f"keys {sorted(keys)} match no known format ({', '.join(FORMATS)})")


def _iter_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(UTF8_BOM)  # Windows editors and Excel start UTF-8 files with one
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(
                    f"{path}:{lineno}: line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit "
                    "(is this really JSONL, one record per line?)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: JSON nested too deeply (see the formats in README)") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _iter_dataset(source: str, split: str) -> Iterable[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        local = Path(source).is_dir()
        ds = datasets.load_from_disk(source) if local else datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types; the user needs the message, not the type
        raise UserError(f"{source}: cannot load as a Hugging Face dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{source}: no split {split!r}; splits are {', '.join(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield i, dict(row)


def split_source(source: str | Path, split: str = "train") -> tuple[str | Path, str]:
    """`data/hh:test` -> (`data/hh`, "test"): a `datasets` folder or hub id may name its split.
    A path that exists as written is never split (a `:` may be part of a file name)."""
    text = str(source)
    head, colon, tail = text.rpartition(":")
    if not colon or not head or not tail or "/" in tail or "\\" in tail or Path(text).exists():
        return source, split
    return head, tail


def _rows(source: str | Path, split: str) -> tuple[Iterable[tuple[int, dict[str, Any]]], Callable[[int], str]]:
    """(numbered raw rows, how to name row n in an error) for a JSONL file or a dataset."""
    source, split = split_source(source, split)
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        return _iter_jsonl(path), lambda n: f"{path}:{n}"
    return _iter_dataset(str(source), split), lambda n: f"{source}[row {n}]"


def first_record(source: str | Path, split: str = "train") -> dict[str, Any]:
    """The first raw record (unvalidated), e.g. to `detect_kind` of a file."""
    rows, _ = _rows(source, split)
    for _, obj in rows:
        return obj
    raise UserError(f"{source}: no records (the file is empty)")


def read_records(
    source: str | Path, kind: str, split: str = "train", strict: bool = True, pair_unpaired: bool = True
) -> list[Any]:
    """Load and validate a whole file (JSONL) or dataset (folder, hub id, `path:split`) of one format,
    or of a TRL shape read as that format (`SHAPES`).

    Raises UserError naming `path:line: field: problem` for the first bad record, and for
    duplicate ids. Blank lines are skipped. Columns the format does not use are an error when
    `strict` (a typo must not silently drop data), else dropped and named once in the log (a
    dataset from the hub often carries scores, ids and sources the stage has no use for).
    Unpaired preference rows become pairs (`pair_unpaired`), or stay `Unpaired` records.
    """
    if kind not in FORMATS:
        raise UserError(f"unknown data format {kind!r}; one of: {', '.join(FORMATS)}")
    rows, where = _rows(source, split)
    records: list[Any] = []
    unpaired: list[Unpaired] = []
    seen: dict[tuple[Any, ...], int] = {}
    ignored: dict[str, None] = {}
    unique = _UNIQUE_KEY.get(kind)
    for n, obj in rows:
        shape = shape_of(kind, obj)
        cls = (shape.record if shape is not None else None) or FORMATS[kind]
        if not strict:
            extra = [k for k in obj if k not in cls.model_fields and (shape is None or k not in shape.keys)]
            ignored.update(dict.fromkeys(extra))
            obj = {k: v for k, v in obj.items() if k not in extra}
        try:
            rec = cls.model_validate(shape.adapt(dict(obj), n) if shape is not None else obj)
        except ShapeError as e:
            raise UserError(f"{where(n)}: {e}") from None
        except ValidationError as e:
            raise UserError(f"{where(n)}: {_explain(e, shape.renamed if shape is not None else None)}") from None
        if isinstance(rec, Unpaired) and pair_unpaired:
            unpaired.append(rec)
            continue
        if unique:
            key = tuple(getattr(rec, k) for k in unique)
            if key in seen:
                raise UserError(
                    f"{where(n)}: {'/'.join(unique)}: duplicate {key if len(key) > 1 else key[0]!r} "
                    f"(first at {where(seen[key])})"
                )
            seen[key] = n
        rec._where = where(n)
        records.append(rec)
    if ignored:
        log.warning(
            "%s: ignored column(s) the %s format does not use: %s (strict=true makes them an error)",
            source, kind, ", ".join(ignored),
        )  # fmt: skip
    if unpaired:
        pairs, lonely = unpaired_to_pairs(unpaired)
        if not pairs and not records:
            raise UserError(
                f"{source}: no pairs: no prompt has both a desirable (label true) and an undesirable "
                "(label false) completion"
            )
        records.extend(pairs)
        log.warning(
            "%s: %d unpaired judgements -> %d pairs (each desirable completion over each undesirable one of the "
            "same prompt); %d prompt(s) with only one kind of label gave none",
            source, len(unpaired), len(pairs), lonely,
        )  # fmt: skip
    if not records:
        raise UserError(f"{source}: no records (the file is empty)")
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> Path:
    """Write JSONL atomically: readers see the old file or the whole new one, never a prefix.
    An optional key that some rows have is written on every row (`Record.fill`)."""
    records = list(records)
    rows = [r.to_json() for r in records]
    for key, value in {k: v for r in records for k, v in r.fill.items()}.items():
        if any(key in row for row in rows):
            rows = [row if key in row else {**row, key: value} for row in rows]
    return write_jsonl(path, rows)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line, UTF-8 as is, written atomically (see `atomic_write_text`)."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)


def check_rankings(rankings: Sequence[Ranking], completions: Sequence[Completions], source: str = "rankings") -> None:
    """Cross-file checks: every ranking names a known prompt and ranks all of its candidates."""
    by_id = {c.prompt_id: c for c in completions}
    for i, r in enumerate(rankings, start=1):
        where = r._where or f"{source}: record {i}"
        c = by_id.get(r.prompt_id)
        if c is None:
            raise UserError(f"{where}: prompt_id: unknown id {r.prompt_id!r} (not in the completions)")
        if len(r.ranking) != len(c.completions):
            raise UserError(
                f"{where}: ranking: ranks {len(r.ranking)} candidates but prompt "
                f"{r.prompt_id!r} has {len(c.completions)}; every candidate needs a rank"
            )
