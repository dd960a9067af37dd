"""Turning prompts and responses (plain text or conversations) into the text a model sees.

Plain prompts are formatted with a template (default `User: {prompt}\\nAssistant:`, the dialogue
shape of the embedded corpus); set the template to `chat` to wrap a plain prompt as one user
message and use the tokenizer's chat template (instruct models), or to `{prompt}` to use it raw.
Conversations always use the tokenizer's chat template when it has one.

A personalised prompt (`with_user`) is the prompt as a conversation after a system line naming the
user, `User: NAME`: the policy and a personalised reward model both read who is asking from the
text itself (docs/personalization.md).

Prompt and response are tokenized *separately* and concatenated, so the boundary between them is
exact: the loss mask of SFT and the response tokens of PPO never straddle a merged token.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from rlhfkit.data.formats import Message, PromptRecord, Text
from rlhfkit.errors import UserError

PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"
RESPONSE_SEPARATOR = " "  # a plain response follows the template's "Assistant:" after one space
STOP_STRINGS = ("\nUser:",)  # where a plain-template model starts the next turn on its own
_ROLE_PREFIX = {"system": "System", "user": "User", "assistant": "Assistant"}
# The prompt's guaranteed share of an over-long example (see `encode_example`). Half: the response
# is what SFT learns and what the reward model judges, the prompt is what makes it an answer, and
# neither is worth more than the other; TRL's DPO defaults give a long prompt and a long response
# the same halves (max_prompt_length 512 of max_length 1024).
MIN_PROMPT_SHARE = 0.5


def _messages(value: Text) -> list[dict[str, Any]]:
    return [m.model_dump() if isinstance(m, Message) else dict(m) for m in value]  # type: ignore[union-attr]


def plain_text(value: Text | list[dict[str, Any]]) -> str:
    """A prompt or response as plain text: a string as it is, a conversation as `Role: content` lines
    (the dialogue shape of the embedded corpus). Used where a model has no chat template, and to
    quote a conversation inside another prompt (the AI judge's)."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{_ROLE_PREFIX[m['role']]}: {m['content']}" for m in _messages(value))


USER_LINE = "User: "  # a personalised prompt's system message: USER_LINE + the user's name


def with_user(prompt: Text, user: str | None) -> Text:
    """`prompt` as `user` asks it: a system message `User: NAME`, then the prompt's messages (a plain
    prompt becomes one user message). No user: the prompt as it is. The one rendering of a user
    that PPO, generate, eval and the reward model share."""
    if user is None:
        return prompt
    messages = [Message(role="user", content=prompt)] if isinstance(prompt, str) else list(prompt)
    return [Message(role="system", content=USER_LINE + user), *messages]


def asked_prompt(record: PromptRecord, user: str = "") -> Text:
    """A prompts record as its user asks it: `user` when given (`generate`/`eval` `user=NAME`),
    else the record's own `user`, else nobody in particular."""
    return with_user(record.prompt, user or record.user)


def split_user(prompt: Text) -> tuple[str | None, Text]:
    """(user, the prompt without them): the inverse of `with_user`; (None, prompt) when no user is
    named. A single remaining user message comes back as plain text, the form `with_user` takes."""
    if isinstance(prompt, str) or len(prompt) < 2:
        return None, prompt
    first, rest = prompt[0], list(prompt[1:])
    if first.role != "system" or not first.content.startswith(USER_LINE):
        return None, prompt
    if len(rest) == 1 and rest[0].role == "user":
        return first.content[len(USER_LINE) :], rest[0].content
    return first.content[len(USER_LINE) :], rest


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, prompt: Text, template: str = PROMPT_TEMPLATE) -> str:
    """The text the model is conditioned on, ending where the response starts."""
    if isinstance(prompt, str) and template != "chat":
        if "{prompt}" not in template:
            raise UserError(f"prompt_template {template!r} must contain {{prompt}} (or be 'chat')")
        return template.format(prompt=prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "chat":
        raise UserError("prompt_template is 'chat' but the tokenizer has no chat template")
    return plain_text(messages) + "\nAssistant:"


def render_response(tokenizer: Any, prompt: Text, response: Text, template: str = PROMPT_TEMPLATE) -> str:
    """The text that follows `render_prompt(...)` for this response (without EOS)."""
    conversational = not isinstance(prompt, str) or template == "chat" or not isinstance(response, str)
    if conversational and has_chat_template(tokenizer):
        p_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt)
        r_msgs = [{"role": "assistant", "content": response}] if isinstance(response, str) else _messages(response)
        prompt_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(p_msgs + r_msgs, tokenize=False)
        if not full.startswith(prompt_text):
            raise UserError("the chat template renders the prompt differently inside a full conversation")
        return full[len(prompt_text) :]
    if isinstance(response, str):
        return RESPONSE_SEPARATOR + response.strip()
    return RESPONSE_SEPARATOR + "\n".join(m["content"] for m in _messages(response))


class EncodedExample(NamedTuple):
    """What `encode_example` makes of one (prompt, response)."""

    ids: list[int]  # prompt + response + EOS
    response_start: int  # index of the first response token (= prompt tokens kept)
    truncated: bool  # the example was longer than max_length and was cut


def encode_example(
    tokenizer: Any,
    prompt: Text | None,
    response: Text,
    template: str = PROMPT_TEMPLATE,
    max_length: int = 512,
    min_prompt_share: float = MIN_PROMPT_SHARE,
) -> EncodedExample:
    """Token ids of prompt + response + EOS, the index where the response starts, and whether it was cut.

    An example longer than `max_length` is cut so that it still reads as prompt, response, EOS: the
    prompt loses its beginning (its end, where the request is, stays: TRL's `keep_end`), the response
    loses its end, and the EOS is always kept. Why the EOS: a decoder reward model reads its score
    there and SFT teaches the model to stop with it; without it the score is read mid-response.
    The prompt keeps at least min(its length, `min_prompt_share` * max_length) tokens and the
    response at least the rest; either may use the room the other does not need. Why a floor for
    the prompt: a response alone can fill `max_length`, and then different prompts with the same
    long response would be identical inputs (same reward) and SFT would learn the response with
    no prompt at all.

    With `prompt` None the response is a plain text learned whole (TRL's language-modeling type):
    no template, response_start 0, and a long text keeps its start and the EOS.
    """
    eos = tokenizer.eos_token_id
    if prompt is None:
        p_ids, response_text = [], plain_text(response)
    else:
        p_ids = tokenizer(render_prompt(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]
        response_text = render_response(tokenizer, prompt, response, template)
    r_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if not r_ids or r_ids[-1] != eos:  # chat templates often end a turn with EOS
        r_ids = r_ids + [eos]
    if len(p_ids) + len(r_ids) <= max_length:
        return EncodedExample(p_ids + r_ids, len(p_ids), False)
    keep_prompt = min(len(p_ids), max(max_length - len(r_ids), int(min_prompt_share * max_length)), max_length - 1)
    kept = p_ids[len(p_ids) - keep_prompt :] + r_ids[: max_length - keep_prompt - 1] + [eos]
    return EncodedExample(kept, keep_prompt, True)
