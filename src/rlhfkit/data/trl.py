"""Training files for TRL: pairs, KTO rows and ratings with the prompt as the policy saw it.

rlhfkit's own files keep the prompt as it was labelled, and every stage renders it with its
`prompt_template`. TRL's trainers do not know that template: a standard (text) example is read as
the concatenation prompt + completion, a conversational one is rendered with the tokenizer's chat
template. So a TRL row has a plain prompt already rendered (`User: ...\\nAssistant:`) and each plain
response as rlhfkit appends it (`render_response`: one space, then the text), so that TRL trains on
exactly the text rlhfkit's reward model and policy saw; a conversation stays a conversation (TRL
renders it with the chat template, as rlhfkit does). `raw_prompt` keeps the prompt as labelled.

Every row has the same columns: a pair without a margin gets 0.0, which is what the loss uses for
it (TRL's RewardTrainer fails on a null margin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfkit.data.chat import render_prompt, render_response
from rlhfkit.data.formats import Pair, Rating, Text, Unpaired, text_to_json


def _is_plain(prompt: Text, template: str, *responses: Text) -> bool:
    return isinstance(prompt, str) and template != "chat" and all(isinstance(r, str) for r in responses)


def _messages(text: Text, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": text}] if isinstance(text, str) else text_to_json(text)


def render_row(prompt: Text, responses: dict[str, Text], template: str) -> dict[str, Any]:
    """{prompt, *responses, raw_prompt}: standard (rendered text) when the prompt and responses are
    plain text and the template is not `chat`, else conversational (lists of messages)."""
    if _is_plain(prompt, template, *responses.values()):
        rendered = render_prompt(None, prompt, template)
        row: dict[str, Any] = {"prompt": rendered}
        row.update({k: render_response(None, prompt, r, template) for k, r in responses.items()})
    else:
        row = {"prompt": _messages(prompt, "user")}
        row.update({k: _messages(r, "assistant") for k, r in responses.items()})
    row["raw_prompt"] = text_to_json(prompt)
    return row


def trl_pairs(pairs: Sequence[Pair], template: str) -> list[dict[str, Any]]:
    """Preference rows for RewardTrainer / DPOTrainer: prompt, chosen, rejected, margin, raw_prompt."""
    return [
        {**render_row(p.prompt, {"chosen": p.chosen, "rejected": p.rejected}, template), "margin": p.margin or 0.0}
        for p in pairs
    ]


def trl_unpaired(rows: Sequence[Unpaired], template: str) -> list[dict[str, Any]]:
    """Unpaired preference rows for KTOTrainer: prompt, completion, label, raw_prompt."""
    return [{**render_row(r.prompt, {"completion": r.completion}, template), "label": r.label} for r in rows]


def trl_ratings(ratings: Sequence[Rating], template: str) -> list[dict[str, Any]]:
    """Rated completions (prompt, completion, score, raw_prompt), e.g. for a regression reward model."""
    return [{**render_row(r.prompt, {"completion": r.completion}, template), "score": r.score} for r in ratings]
