"""The text a model sees in each CAI step: critique, revision, and the judge's A/B question.

Every step is a conversation (the CAI paper's shape): the user's prompt, the assistant's response,
then the critique request as a user turn, the critique as the assistant's answer, the revision
request, and so on. Few-shot examples from the constitution come first, as earlier rounds of the
same conversation. The conversation is rendered with the tokenizer's chat template when it has one
(instruct models), else as plain `User: ...` / `Assistant: ...` lines, the shape of our own SFT data.

The judge's question is one user turn; the assistant's answer is started for it ("The better reply
is (") so the very next token is the letter, and the judge's preference is read from the
probabilities of the two letters there (see `judge.py`).
"""

from __future__ import annotations

from typing import Any

from rlhfkit.cai.constitution import Constitution, Example, Principle
from rlhfkit.data.chat import RESPONSE_SEPARATOR, has_chat_template, plain_text, render_prompt
from rlhfkit.data.formats import Text

Messages = list[dict[str, str]]
ANSWER_PREFIX = "The better reply is ("
JUDGE_TEMPLATE = """Here is a request and two possible replies to it.

Request: {request}

{question}
(A) {a}
(B) {b}

Answer with the letter of the better reply."""


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def prompt_messages(prompt: Text) -> Messages:
    """A prompt as the opening messages of a conversation."""
    if isinstance(prompt, str):
        return [user(prompt)]
    return [m.model_dump() for m in prompt]


def example_messages(example: Example, constitution: Constitution) -> Messages:
    """One whole few-shot round: prompt, response, critique request, critique, revision request, revision."""
    principle = constitution.principle(example.principle)
    return [
        user(example.prompt),
        assistant(example.response),
        user(principle.critique),
        assistant(example.critique),
        user(principle.revision),
        assistant(example.revision),
    ]


def few_shot_messages(constitution: Constitution, few_shot: int) -> Messages:
    """The first `few_shot` examples (all of them when negative), as earlier turns."""
    examples = constitution.examples if few_shot < 0 else constitution.examples[:few_shot]
    return [m for ex in examples for m in example_messages(ex, constitution)]


def render(tokenizer: Any, messages: Messages) -> str:
    """A conversation that ends with a user turn, rendered up to where the assistant's answer starts."""
    return render_prompt(tokenizer, messages)


def critique_messages(prompt: Text, response: str, principle: Principle, shots: Messages) -> Messages:
    return [*shots, *prompt_messages(prompt), assistant(response), user(principle.critique)]


def revision_messages(prompt: Text, response: str, principle: Principle, critique: str, shots: Messages) -> Messages:
    return [*critique_messages(prompt, response, principle, shots), assistant(critique), user(principle.revision)]


def judge_prompt(tokenizer: Any, prompt: Text, a: str, b: str, principle: Principle) -> str:
    """The judge's question with reply `a` as (A) and `b` as (B), ending right before the letter."""
    question = JUDGE_TEMPLATE.format(request=plain_text(prompt), question=principle.comparison, a=a, b=b)
    separator = "" if has_chat_template(tokenizer) else RESPONSE_SEPARATOR
    return render(tokenizer, [user(question)]) + separator + ANSWER_PREFIX
