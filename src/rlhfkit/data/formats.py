"""The data formats every stage reads and writes, validated on load.

One record type per format (JSONL, one object per line, or a Hugging Face `datasets` folder):

    prompts          {"id": "p1", "prompt": "How do I brew coffee?"}
    demonstrations   {"prompt": "...", "response": "..."}
    completions      {"prompt_id": "p1", "prompt": "...", "completions": ["...", "..."]}
    rankings         {"prompt_id": "p1", "labeler": "ann", "ranking": [2, 1, 1], "unusable": false,
                      "strength": 3}
    pairs            {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 0.5}
    ratings          {"prompt": "...", "completion": "...", "score": 0.7}

A ranking gives candidate i the rank `ranking[i]` (1 = best); equal ranks are ties; ranks are dense
(1, 2, 2, 3 but never 1, 3). The optional `strength` says how much better each rank is than the
next one (STRENGTHS: 1 slightly, 2 better, 3 much better; absent = 2). Wherever a prompt or
response is allowed, a conversation (a list of `{"role", "content"}` messages) is allowed too; it
is rendered with the tokenizer's chat template.

Errors read `path:line: field: what is wrong` and are raised before anything is written, so a bad
file never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, ValidationInfo, field_validator

from rlhfkit.config import atomic_write_text
from rlhfkit.errors import UserError, validation_problems

MAX_LINE_BYTES = 1_000_000  # a "huge line" is almost always a broken file, not a real record
UTF8_BOM = b"\xef\xbb\xbf"


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

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def __eq__(self, other: object) -> bool:
        """Records are equal by content; where they were read from does not count."""
        return type(self) is type(other) and self.model_dump() == other.model_dump()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]  # mutable, like BaseModel


class PromptRecord(Record):
    id: str
    prompt: Text

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
    prompt: Text
    response: Text

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")

    @field_validator("response")
    @classmethod
    def _response(cls, v: Text) -> Text:
        return _check_text(v, "response")


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


class Rating(Record):
    prompt: Text
    completion: Text
    score: float

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")

    @field_validator("completion")
    @classmethod
    def _completion(cls, v: Text) -> Text:
        return _check_text(v, "completion", allow_empty=True)

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


def _explain(err: ValidationError) -> str:
    by_loc: dict[str, list[str]] = {}
    for loc, msg, kind in validation_problems(err, root="<record>"):
        if kind == "extra_forbidden":
            msg = "unknown key (check the spelling; see the formats in README)"
        elif kind in ("string_type", "list_type"):
            msg = "must be text or a list of {role, content} messages"
        by_loc.setdefault(loc, []).append(msg)
    return "; ".join(f"{loc}: {' / '.join(dict.fromkeys(msgs))}" for loc, msgs in by_loc.items())


def detect_kind(obj: dict[str, Any]) -> str:
    """Guess the format of a record from its keys (for `rlhfkit data validate` without --kind)."""
    keys = set(obj)
    for kind, cls in FORMATS.items():
        required = {n for n, f in cls.model_fields.items() if f.is_required()}
        if required <= keys <= set(cls.model_fields):
            return kind
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


def _rows(source: str | Path, split: str) -> tuple[Iterable[tuple[int, dict[str, Any]]], Callable[[int], str]]:
    """(numbered raw rows, how to name row n in an error) for a JSONL file or a dataset."""
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


def read_records(source: str | Path, kind: str, split: str = "train") -> list[Any]:
    """Load and validate a whole file (JSONL) or dataset (folder or hub id) of one format.

    Raises UserError naming `path:line: field: problem` for the first bad record, and for
    duplicate ids. Blank lines are skipped.
    """
    if kind not in FORMATS:
        raise UserError(f"unknown data format {kind!r}; one of: {', '.join(FORMATS)}")
    cls = FORMATS[kind]
    rows, where = _rows(source, split)
    records: list[Any] = []
    seen: dict[tuple[Any, ...], int] = {}
    unique = _UNIQUE_KEY.get(kind)
    for n, obj in rows:
        try:
            rec = cls.model_validate(obj)
        except ValidationError as e:
            raise UserError(f"{where(n)}: {_explain(e)}") from None
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
    if not records:
        raise UserError(f"{source}: no records (the file is empty)")
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> Path:
    """Write JSONL atomically: readers see the old file or the whole new one, never a prefix."""
    text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
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
