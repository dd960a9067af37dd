"""The policy with its value function, for PPO: one forward gives both the logits and the values.

By default the value function is a linear head on the policy's own last hidden state (zero-initialised,
so every value starts at 0 and the first advantages are plain returns): the trunk runs once for both,
instead of a second network as big as the policy. Alternatively the critic is a separate network
initialised from the reward model (PPO detail 4): it starts out already knowing what a good response
looks like, at the price of a second forward and backward.

Only the positions that predict response tokens go through the LM head: on a short response after a
long prompt most of the vocabulary projection would be wasted on the prompt. And the rollout needs
no trunk pass of the policy at all: `sample(..., keep_hidden=True)` returns the hidden states the
sampling loop computed anyway, and `PolicyAndValue.heads` turns them into the same logits and values
(in float32; under mixed precision PPO runs the full forward instead, see `stages.ppo.score_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.data.batching import segment_attention_mask
from rlhfkit.errors import UserError
from rlhfkit.models.loading import (
    BackboneOptions,
    apply_lora,
    disable_dropout,
    fuse_gelu,
    prepare_for_training,
    pretrained_kwargs,
)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only: a left-padded row starts at position 0, as in generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class SharedPrefixRows:
    """Responses to the same prompt laid out with the tokens they share once per row
    (`data.batching.collate_shared_prefix`), and where each response token's predictor lands.

    Why: the K responses of a prompt (RLOO, GRPO) all carry its tokens; the trunk's hidden states
    there do not depend on what follows, so the prompt runs once for all K instead of K times.
    `take` (B, T) indexes the flattened (rows x columns) hidden states: entry [b, t] is the state
    that predicts token t of response b (the one `trunk_hidden` returns at [b, t] for the plain
    rows); past a response's end it points at any real state (masked out downstream).
    """

    input_ids: Tensor  # (R, L) shared prefix, then each response's own tokens, right-padded
    position_ids: Tensor  # (R, L) restarting after the shared prefix for every response
    segments: Tensor  # (R, L) 0: shared, i + 1: the row's i-th response, -1: padding
    take: Tensor  # (B, T) flat indices into R * L


def trunk_hidden(
    trunk: nn.Module, input_ids: Tensor, attention_mask: Tensor, start: int, shared: SharedPrefixRows | None = None
) -> Tensor:
    """Last hidden states at positions start-1 ... end-2: those that predict tokens start ... end-1.

    `shared`: the same rows as one row per prompt (see `SharedPrefixRows`); the result is the
    same (B, T, d) tensor up to float rounding, from fewer tokens through the trunk.
    """
    # no KV cache: nothing decodes after this pass, and filling one copies every layer's keys and values
    if shared is not None:
        mask = segment_attention_mask(shared.segments, next(trunk.parameters()).dtype)
        out = trunk(input_ids=shared.input_ids, attention_mask=mask, position_ids=shared.position_ids, use_cache=False)
        return out.last_hidden_state.flatten(0, 1)[shared.take]
    positions = position_ids(attention_mask)
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state[:, start - 1 : -1]


def response_logits(
    lm: Any, input_ids: Tensor, attention_mask: Tensor, start: int, shared: SharedPrefixRows | None = None
) -> Tensor:
    """Logits (B, T, V) for the tokens from column `start` on (the response) of any causal LM
    (`shared`: computed from the rows' shared-prefix layout, see `trunk_hidden`).

    Works for a peft model too: inside `lm.disable_adapter()` it gives the base model's logits,
    which is how the LoRA policy's reference model costs no memory.
    """
    hidden = trunk_hidden(lm.get_decoder(), input_ids, attention_mask, start, shared)
    return lm.get_output_embeddings()(hidden)


class PolicyAndValue(nn.Module):
    """A causal LM plus a value function, as one module (one optimizer, one checkpoint).

    `critic=None`: a zero-initialised linear value head on the policy's last hidden state.
    `critic=` a sequence-classification model (e.g. the reward model): its score head on its own
    trunk gives the values. `value=False` (RLOO, GRPO: the other samples of a prompt are the
    baseline): no value function at all, no head trained or saved; the values are 0.
    """

    def __init__(self, policy: Any, critic: Any | None = None, value: bool = True) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head: nn.Linear | None = None
        if critic is None and value:
            self.value_head = nn.Linear(policy.get_output_embeddings().in_features, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, start: int, shared: SharedPrefixRows | None = None
    ) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V), values (B, T) float32) for the response that begins at column `start`.

        values[:, t] estimates the return from the state *before* response token t, i.e. it is read
        from the same hidden state as the logits that choose token t. `shared`: the trunk runs the
        rows' shared-prefix layout instead (critic-free only: a separate critic reads plain rows).
        """
        if shared is not None and self.critic is not None:
            raise ValueError("a separate critic reads the plain rows: shared-prefix rows are for critic-free runs")
        hidden = trunk_hidden(self.policy.get_decoder(), input_ids, attention_mask, start, shared)
        return self.heads(hidden, input_ids, attention_mask, start)

    def heads(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Logits and values from the policy's last hidden states at the response positions (the
        critic, if any, reads the tokens itself)."""
        logits = self.policy.get_output_embeddings()(hidden)
        if self.value_head is not None:
            values = self.value_head(hidden.float())
        elif self.critic is None:
            return logits, torch.zeros(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)
        else:
            critic_hidden = trunk_hidden(self.critic.base_model, input_ids, attention_mask, start)
            values = self.critic.score(critic_hidden).float()
        return logits, values.squeeze(-1)


def load_critic(path: str, vocab_size: int, opts: BackboneOptions | None = None) -> Any:
    """A critic initialised from a reward-model folder (a one-output sequence classifier).

    Why check the vocabulary: the critic reads the policy's token ids, so it must have been trained
    with the policy's tokenizer (pad token included); a different one gives meaningless values.
    With `lora`, the critic trains a LoRA adapter plus its score head, like the policy, so that
    LoRA mode stays light; the peft wrapper is dropped and the injected layers stay in place.
    `opts` are the policy's (`model.*`): the critic is loaded in its dtype, attention kernel, 4-bit
    and gradient-checkpointing settings, as big as the policy and fitting where it fits.
    """
    from transformers import AutoModelForSequenceClassification

    opts = opts or BackboneOptions()
    try:
        critic = AutoModelForSequenceClassification.from_pretrained(path, **pretrained_kwargs(opts, "model"))
    except (OSError, ValueError) as e:
        raise UserError(f"ppo.critic_path: cannot load {path!r} as a sequence classifier ({e})") from None
    if critic.config.num_labels != 1:
        raise UserError(f"ppo.critic_path: {path} has {critic.config.num_labels} outputs; a critic needs exactly 1")
    if not hasattr(critic, "score"):
        raise UserError(f"ppo.critic_path: {type(critic).__name__} has no `score` head to read values from")
    if critic.get_input_embeddings().num_embeddings < vocab_size:
        raise UserError(
            f"ppo.critic_path: {path} knows {critic.get_input_embeddings().num_embeddings} tokens but the policy's "
            f"tokenizer has {vocab_size}; initialise the critic from a reward model trained on this policy"
        )
    disable_dropout(critic)
    fuse_gelu(critic)  # the policy's kernels: the critic trains as much as it does
    prepare_for_training(critic, opts)
    if opts.lora is None:
        return critic
    return apply_lora(critic, opts.lora, "SEQ_CLS").get_base_model()
