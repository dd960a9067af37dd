"""The feedback site's fixed vocabularies, spelled once: what a project's task can be, what a
project member's role can be, why a judgment's earlier version was kept, and the statuses an
admin's review filters items by. The request schemas, the database columns' comments, the pages'
select boxes and the `rlhfkit serve` admin commands all take them from here.

Pure typing (no pydantic, no web framework), so the CLI can read them at no import cost.
"""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["ranking", "pairwise", "demonstration", "rating", "thumbs"]
# Tasks whose judgment scores each candidate on its own (Judgment.scores), not relative to the others.
SCORED_TASKS: tuple[str, ...] = ("rating", "thumbs")
Role = Literal["admin", "labeler"]
TASKS: tuple[str, ...] = get_args(Task)
ROLES: tuple[str, ...] = get_args(Role)
ReviewStatus = Literal["unlabeled", "partial", "complete", "sent_back"]
HistoryReason = Literal["edited", "sent_back"]  # changed by its labeler, or its item sent back
REVIEW_STATUSES: tuple[str, ...] = get_args(ReviewStatus)
HISTORY_REASONS: tuple[str, ...] = get_args(HistoryReason)
DEFAULT_TASK: Task = "ranking"
DEFAULT_ROLE: Role = "labeler"
