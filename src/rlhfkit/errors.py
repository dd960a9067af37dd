"""The one exception type that the CLI turns into a clean message and a non-zero exit, and the one
reading of pydantic's validation errors that every such message builds on."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input from the user (file, config, flag): the message says where and what to do.

    The CLI prints it without a traceback; library callers can catch it like any exception.
    """


def validation_problems(err: Any, root: str = "<root>") -> list[tuple[str, str, str]]:
    """(where, what is wrong, pydantic's error type) for each error of a pydantic ValidationError.

    The one reading of pydantic's errors that every message builds on: `where` is the dotted field
    path (`train.lr`, `completions.2.content`) without the union-branch names pydantic inserts
    (`str`, `list[...]`), `root` when the error is about the whole value; "Value error, " is
    dropped from our own validators' messages and a missing field says "missing required key".
    """
    problems = []
    for e in err.errors():
        # A branch name is `str` itself, not a field that starts so (`strength`, `strict`).
        where = ".".join(str(p) for p in e["loc"] if str(p) != "str" and not str(p).startswith(("list[", "function-")))
        msg = "missing required key" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
        problems.append((where or root, msg, e["type"]))
    return problems
