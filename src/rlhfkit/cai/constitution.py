"""The constitution: the principles that critiques, revisions and AI preference labels are made under.

A YAML file with `principles` (name, critique, revision, comparison) and optional few-shot
`examples`; see `default_constitution.yaml`, which ships with rlhfkit and is used when no file is
given. Loading validates everything up front, so a typo fails before a model is loaded, with an
error naming the file and the field.
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from rlhfkit.config import StrictModel, read_yaml
from rlhfkit.errors import UserError, validation_problems

DEFAULT_CONSTITUTION = Path(__file__).with_name("default_constitution.yaml")


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    return value.strip()


class Principle(StrictModel):
    name: str
    critique: str = Field(description="critique request: what to look for in a response")
    revision: str = Field(description="revision request: how to rewrite the response")
    comparison: str = Field(description="the judge's question between two responses, e.g. 'Which is more honest?'")

    _strip = field_validator("name", "critique", "revision", "comparison")(_nonempty)


class Example(StrictModel):
    """A few-shot critique-and-revision round, shown before the real one."""

    principle: str
    prompt: str
    response: str
    critique: str
    revision: str

    _strip = field_validator("principle", "prompt", "response", "critique", "revision")(_nonempty)


class Constitution(StrictModel):
    principles: list[Principle] = Field(min_length=1)
    examples: list[Example] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> Constitution:
        names = [p.name for p in self.principles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"principle names must be unique; repeated: {', '.join(dupes)}")
        for i, ex in enumerate(self.examples):
            if ex.principle not in names:
                raise ValueError(f"examples.{i}.principle: {ex.principle!r} is not a principle ({', '.join(names)})")
        return self

    def principle(self, name: str) -> Principle:
        return next(p for p in self.principles if p.name == name)

    def sample(self, rng: random.Random) -> Principle:
        """One principle, uniformly: each critique round and each judgement uses one (as in the CAI paper)."""
        return rng.choice(self.principles)


def load_constitution(path: str | Path = "") -> Constitution:
    """Read and validate a constitution YAML file; the shipped default when `path` is empty."""
    source = Path(path) if path else DEFAULT_CONSTITUTION
    data = read_yaml(source, "constitution file")
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with `principles:` (and optional `examples:`)")
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        problems = [f"{loc}: {msg}" for loc, msg, _ in validation_problems(e, root="<file>")]
        raise UserError(f"{source}: invalid constitution\n  " + "\n  ".join(problems)) from None
