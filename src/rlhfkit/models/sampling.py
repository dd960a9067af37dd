"""Sampling K completions per prompt: batched, KV-cached (`model.generate`), with temperature,
top-k, nucleus (top-p), stop at EOS or a stop string, and a seed.

Used by `rlhfkit generate` and by PPO's rollouts, so both see exactly the same responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from rlhfkit.config import StrictModel
from rlhfkit.data.chat import PROMPT_TEMPLATE, RESPONSE_SEPARATOR, STOP_STRINGS


class SamplingConfig(StrictModel):
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    stop: list[str] = Field(default_factory=lambda: list(STOP_STRINGS), description="cut a response here")
    batch_size: int = Field(32, gt=0, description="sequences generated per forward pass")
    max_prompt_tokens: int = Field(192, gt=0, description="longer prompts keep their end")
    prompt_template: str = PROMPT_TEMPLATE


@dataclass
class Samples:
    """A batch of rollouts. Prompts are left-padded (so generation continues every row at the
    same position), responses right-padded; masks mark real tokens."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T)
    texts: list[str]  # decoded responses, cut at a stop string, without the leading separator
    ended: torch.Tensor  # (B,) bool: the response finished with EOS or a stop string

    def __len__(self) -> int:
        return len(self.texts)


def _encode_prompts(tokenizer: Any, prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [ids[-max_tokens:] for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _cut_at_stop(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[int, str, bool]:
    """(tokens to keep, text, found): the kept tokens run through the token where a stop string
    begins, so the policy gets credit for ending the turn; the text ends before the stop."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return len(ids), text, False
    cut = min(hits)
    for n in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:n], skip_special_tokens=True)) > cut:
            return n, text[:cut], True
    return len(ids), text[:cut], True


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: list[str], cfg: SamplingConfig, num_samples: int = 1) -> Samples:
    """Generate `num_samples` responses for each rendered prompt (rows grouped by prompt)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []
    per_batch = max(1, cfg.batch_size // num_samples)
    for start in range(0, len(prompts), per_batch):
        p_ids, p_mask = _encode_prompts(tokenizer, prompts[start : start + per_batch], cfg.max_prompt_tokens)
        out = model.generate(
            input_ids=p_ids.to(device),
            attention_mask=p_mask.to(device),
            do_sample=True,
            temperature=cfg.temperature,
            top_k=cfg.top_k,  # 0 disables it; None would mean the generation config's default (50)
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        responses = [row for row in out[:, p_ids.shape[1] :].cpu()]
        parts.append((p_ids.repeat_interleave(num_samples, 0), p_mask.repeat_interleave(num_samples, 0), responses))
    model.train(was_training)

    prompt_width = max(p.shape[1] for p, _, _ in parts)
    prompt_ids, prompt_mask, rows, texts, ended = [], [], [], [], []
    for p, m, responses in parts:
        pad_left = prompt_width - p.shape[1]
        prompt_ids.append(torch.nn.functional.pad(p, (pad_left, 0), value=pad))
        prompt_mask.append(torch.nn.functional.pad(m, (pad_left, 0), value=0))
        for r in responses:
            ids = r.tolist()
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            while n > 0 and ids[n - 1] == pad:  # generate pads finished rows
                n -= 1
            has_eos = n > 0 and ids[n - 1] == eos
            keep, text, stopped = _cut_at_stop(tokenizer, ids[: n - int(has_eos)], cfg.stop)
            if stopped:
                n = keep
            rows.append(ids[:n])
            texts.append(text.removeprefix(RESPONSE_SEPARATOR).strip())
            ended.append(has_eos or stopped)
    width = max(1, max(len(r) for r in rows))
    response_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = 1
    return Samples(
        prompt_ids=torch.cat(prompt_ids),
        prompt_mask=torch.cat(prompt_mask),
        response_ids=response_ids,
        response_mask=response_mask,
        texts=texts,
        ended=torch.tensor(ended, dtype=torch.bool),
    )
