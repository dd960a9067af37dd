"""The feedback site's fixed vocabularies, spelled once: what a project's task can be and what a
project member's role can be. The request schemas, the database columns' comments, the pages'
select boxes and the `rlhfkit serve` admin commands all take them from here.

Pure typing (no pydantic, no web framework), so the CLI can read them at no import cost.
"""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["ranking", "pairwise", "demonstration"]
Role = Literal["admin", "labeler"]
TASKS: tuple[str, ...] = get_args(Task)
ROLES: tuple[str, ...] = get_args(Role)
DEFAULT_TASK: Task = "ranking"
DEFAULT_ROLE: Role = "labeler"
