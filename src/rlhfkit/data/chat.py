"""Turning prompts and responses (plain text or conversations) into the text a model sees.

Plain prompts are formatted with a template (default `User: {prompt}\\nAssistant:`, the dialogue
shape of the embedded corpus); set the template to `chat` to wrap a plain prompt as one user
message and use the tokenizer's chat template (instruct models), or to `{prompt}` to use it raw.
Conversations always use the tokenizer's chat template when it has one.

Prompt and response are tokenized *separately* and concatenated, so the boundary between them is
exact: the loss mask of SFT and the response tokens of PPO never straddle a merged token.
"""

from __future__ import annotations

from typing import Any

from rlhfkit.data.formats import Message, Text
from rlhfkit.errors import UserError

PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"
RESPONSE_SEPARATOR = " "  # a plain response follows the template's "Assistant:" after one space
STOP_STRINGS = ("\nUser:",)  # where a plain-template model starts the next turn on its own
_ROLE_PREFIX = {"system": "System", "user": "User", "assistant": "Assistant"}


def _messages(value: Text) -> list[dict[str, Any]]:
    return [m.model_dump() if isinstance(m, Message) else dict(m) for m in value]  # type: ignore[union-attr]


def _plain_conversation(messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    text = "\n".join(f"{_ROLE_PREFIX[m['role']]}: {m['content']}" for m in messages)
    return text + ("\nAssistant:" if generation_prompt else "")


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
    return _plain_conversation(messages, generation_prompt=True)


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


def truncate_at_stop(text: str, stops: tuple[str, ...] | list[str] = STOP_STRINGS) -> tuple[str, bool]:
    """Cut a generated response at the first stop string; returns (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def encode_example(
    tokenizer: Any, prompt: Text, response: Text, template: str = PROMPT_TEMPLATE, max_length: int = 512
) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS, and the index where the response starts.

    Long examples are cut from the left of the prompt (the response is what we learn from).
    """
    p_ids = tokenizer(render_prompt(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(render_response(tokenizer, prompt, response, template), add_special_tokens=False)["input_ids"]
    if not r_ids or r_ids[-1] != tokenizer.eos_token_id:  # chat templates often end a turn with EOS
        r_ids = r_ids + [tokenizer.eos_token_id]
    r_ids = r_ids[:max_length]
    keep = max_length - len(r_ids)
    p_ids = p_ids[-keep:] if keep > 0 else []
    return p_ids + r_ids, len(p_ids)
