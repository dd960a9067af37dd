"""Sampling K completions per prompt: batched, KV-cached, with temperature, top-k, nucleus
(top-p), stop at EOS or a stop string, and a seed.

Used by `rlhfkit generate` and by PPO's rollouts, so both see exactly the same responses.

A prompt longer than `max_prompt_tokens` keeps its end (where the request is); `Samples` counts
such prompts, for the stages to report. Every stage that samples first calls `check_length_budget`:
`max_prompt_tokens + max_new_tokens` must fit the model's positions.

The decoding loop is our own rather than `model.generate`: it hands back the decoder's last hidden
state for every sampled token, which is all PPO needs for the log-probs and values of its rollout
(no second pass of the policy), and a row leaves the batch at its EOS. Only `SamplingConfig`
applies, not the model's generation config (a repetition penalty, say): PPO's log-probs must
describe exactly the distribution the tokens were drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from rlhfkit.config import StrictModel
from rlhfkit.data.chat import PROMPT_TEMPLATE, RESPONSE_SEPARATOR, STOP_STRINGS
from rlhfkit.engine.progress import track
from rlhfkit.errors import UserError
from rlhfkit.models.loading import model_positions
from rlhfkit.models.value import position_ids

# PPO's rollout temperature by default (PPO detail 12). The reward model is normalised on the SFT
# policy's samples drawn at the same temperature, so that "mean 0, std 1 on the reference policy"
# holds for the responses PPO actually scores (at T = 1.0 they are longer and more varied).
ROLLOUT_TEMPERATURE = 0.7
# The settings that change which responses come out (the rest only change how fast).
DISTRIBUTION_FIELDS = ("temperature", "top_k", "top_p", "max_new_tokens", "stop")


class SamplingConfig(StrictModel):
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    stop: list[str] = Field(default_factory=lambda: list(STOP_STRINGS), description="cut a response here")
    batch_size: int = Field(32, gt=0, description="sequences generated per forward pass")
    max_prompt_tokens: int = Field(192, gt=0, description="longer prompts keep their end (counted)")
    prompt_template: str = PROMPT_TEMPLATE

    def distribution(self) -> dict[str, Any]:
        """The settings that decide which responses are drawn, e.g. to record what a reward model was
        normalised on and compare it with what PPO samples."""
        return {name: getattr(self, name) for name in DISTRIBUTION_FIELDS}


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
    hidden: torch.Tensor | None = None  # (B, T, d) with keep_hidden: the state each token was sampled from
    prompts_truncated: int = 0  # prompts longer than max_prompt_tokens, of which the model saw only the end

    def __len__(self) -> int:
        return len(self.texts)


def check_length_budget(config: Any, cfg: SamplingConfig, where: str = "sampling") -> None:
    """Stop with a clear error, before any sampling, if the longest prompt plus the longest response
    would not fit the model's positions (`config`: the model's `transformers` config).

    Why up front: past its last position GPT-2's position embedding raises an IndexError in the
    middle of a run (PPO's first rollout), and a rotary model (Llama, Qwen2, Mistral) silently runs
    on positions it was never trained on. `where` is the config section that holds the two fields,
    so that the error names the settings to change. A model without a position limit passes.
    """
    positions = model_positions(config)
    if positions is None:
        return
    (limit, field), total = positions, cfg.max_prompt_tokens + cfg.max_new_tokens
    if total > limit:
        raise UserError(
            f"{where}.max_prompt_tokens + {where}.max_new_tokens = {cfg.max_prompt_tokens} + {cfg.max_new_tokens} = "
            f"{total} exceeds the {limit} positions of {config.name_or_path or 'the model'} (model.config.{field}); "
            f"lower them so that they add up to at most {limit}"
        )


def truncation_warning(n: int, total: int, cfg: SamplingConfig, where: str = "sampling") -> str:
    """The line a stage prints when `n` of the `total` prompts it sampled were cut to `max_prompt_tokens`.

    Why it matters: the model answered the end of such a prompt, while the reward model, the
    labelers and the gold judges read all of it.
    """
    return (
        f"warning: {n} of {total} prompts are longer than {where}.max_prompt_tokens={cfg.max_prompt_tokens} tokens "
        f"and the model saw only their end; raise {where}.max_prompt_tokens (within the model's positions)"
    )


def encode_prompts(tokenizer: Any, prompts: list[str], max_tokens: int) -> tuple[Tensor, Tensor, int]:
    """Left-padded ids and mask of the prompts, each cut to its last `max_tokens` tokens, and how many were cut."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    rows = [ids[-max_tokens:] for ids in encoded]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask, sum(len(e) > max_tokens for e in encoded)


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


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """`logits` (..., V) with the tokens outside the top-k and then outside the nucleus set to -inf.

    As Hugging Face's warpers: top-k keeps every token tied with the k-th largest logit; top-p keeps
    the smallest set of most likely tokens whose probability reaches `top_p`, and always the most
    likely one. 0 and 1 switch them off.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One token per row of `probs` (rows, V), row i's from its own generator `generators[i]`.

    Inverse-CDF sampling with one uniform number per row: a row's token depends only on its own
    probabilities and generator, not on which rows share the batch (`torch.multinomial` draws the
    whole batch from one stream). Zero-probability tokens are never drawn (`right=True`: the first
    token whose cumulative probability exceeds u); a u rounded onto the total takes the likeliest.
    """
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
    cdf = probs.double().cumsum(-1)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return torch.where(token < probs.shape[-1], token, probs.argmax(-1))


def _decode(
    model: Any,
    ids: Tensor,
    mask: Tensor,
    cfg: SamplingConfig,
    eos: int,
    pad: int,
    keep_hidden: bool,
    generators: list[torch.Generator] | None = None,
    repeats: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Sample up to `cfg.max_new_tokens` tokens after the left-padded prompts `ids`, `repeats`
    responses per prompt (rows grouped by prompt).

    Returns the new tokens (B * repeats, N), pad after a row's EOS, and with `keep_hidden` the
    decoder's last hidden states (B * repeats, N, d) from which they were sampled. The prompts run
    once and their KV cache is repeated (`repeats` responses to a prompt read the same prompt
    states: the prefill costs 1/repeats). One trunk call per token on the KV cache;
    the LM head only on the last position. The pad token is never sampled: it is not a real token
    (the loaders give every tokenizer one of its own). A row leaves the batch (and the cache) at its
    EOS, so a few long responses do not keep the finished ones computing. `generators`: one per row
    (see `draw`); None: the global RNG.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    n_rows, n_new = ids.shape[0] * repeats, cfg.max_new_tokens
    tokens = torch.full((n_rows, n_new), pad, dtype=torch.long, device=ids.device)
    states: list[Tensor] = []
    live = torch.arange(n_rows, device=ids.device)  # the rows still in the batch
    positions = position_ids(mask)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, positions, hidden = out.past_key_values, positions[:, -1:], out.last_hidden_state[:, -1]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        mask, positions, hidden = (x.repeat_interleave(repeats, 0) for x in (mask, positions, hidden))
    for step in range(n_new):
        logits = head(hidden).float() / cfg.temperature
        logits[:, pad] = float("-inf")
        probs = filter_logits(logits, cfg.top_k, cfg.top_p).softmax(-1)
        if generators is None:
            token = torch.multinomial(probs, 1).squeeze(1)
        else:
            token = draw(probs, [generators[i] for i in live.tolist()])
        tokens[live, step] = token
        if keep_hidden:
            states.append(torch.zeros(n_rows, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device))
            states[-1][live] = hidden
        ended = token == eos
        if step == n_new - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, token, mask, positions = live[keep], token[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        positions = positions + 1
        out = decoder(
            input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        hidden = out.last_hidden_state[:, -1]
    return tokens[:, : step + 1], torch.stack(states, 1) if keep_hidden else None


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    cfg: SamplingConfig,
    num_samples: int = 1,
    keep_hidden: bool = False,
    desc: str | None = None,
    seeds: list[int] | None = None,
) -> Samples:
    """Generate `num_samples` responses for each rendered prompt (rows grouped by prompt).

    `keep_hidden`: also return, in `Samples.hidden`, the last hidden state from which each response
    token was sampled (PPO turns them into log-probs and values without another forward pass).
    `desc`: show progress over the batches under this name (a stage's one long sampling pass).
    `seeds`: one per response (len(prompts) * num_samples, in row order): each response is drawn
    from its own generator, so it is the same whatever batch or process it is sampled in (PPO
    spread over processes samples what one process would). None: the global RNG (`torch.manual_seed`).
    """
    n_rows = len(prompts) * num_samples
    if seeds is not None and len(seeds) != n_rows:
        raise ValueError(f"sample: {len(seeds)} seeds for {n_rows} responses")
    generators = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else None
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
    per_batch = max(1, cfg.batch_size // num_samples)
    truncated = 0
    starts = range(0, len(prompts), per_batch)
    for start in track(starts, desc) if desc else starts:
        p_ids, p_mask, cut = encode_prompts(tokenizer, prompts[start : start + per_batch], cfg.max_prompt_tokens)
        truncated += cut
        first, n = start * num_samples, len(p_ids) * num_samples
        here = generators[first : first + n] if generators is not None else None
        new, hidden = _decode(model, p_ids.to(device), p_mask.to(device), cfg, eos, pad, keep_hidden, here, num_samples)
        p_ids, p_mask = p_ids.repeat_interleave(num_samples, 0), p_mask.repeat_interleave(num_samples, 0)
        parts.append((p_ids, p_mask, new.cpu(), hidden))
    model.train(was_training)

    prompt_width = max(p.shape[1] for p, _, _, _ in parts)
    prompt_ids, prompt_mask, rows, texts, ended = [], [], [], [], []
    for p, m, new, _ in parts:
        pad_left = prompt_width - p.shape[1]
        prompt_ids.append(F.pad(p, (pad_left, 0), value=pad))
        prompt_mask.append(F.pad(m, (pad_left, 0), value=0))
        for ids in new.tolist():
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            has_eos = ids[n - 1] == eos
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
    hidden = None
    if keep_hidden:  # each part's states, cut or zero-padded to the responses' width
        states = [h for _, _, _, h in parts if h is not None]
        hidden = torch.cat([F.pad(h[:, :width], (0, 0, 0, width - min(width, h.shape[1]))) for h in states])
    return Samples(
        prompt_ids=torch.cat(prompt_ids),
        prompt_mask=torch.cat(prompt_mask),
        response_ids=response_ids,
        response_mask=response_mask,
        texts=texts,
        ended=torch.tensor(ended, dtype=torch.bool),
        hidden=hidden,
        prompts_truncated=truncated,
    )
