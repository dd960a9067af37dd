"""The policy with its value function, for PPO: one forward gives both the logits and the values.

By default the value function is a linear head on the policy's own last hidden state (zero-initialised,
so every value starts at 0 and the first advantages are plain returns): the trunk runs once for both,
instead of a second network as big as the policy. Alternatively the critic is a separate network
initialised from the reward model (PPO detail 4): it starts out already knowing what a good response
looks like, at the price of a second forward and backward.

Only the positions that predict response tokens go through the LM head: on a short response after a
long prompt most of the vocabulary projection would be wasted on the prompt. And the rollout needs
no trunk pass of the policy at all: `generation_hidden_states` keeps the hidden states `generate`
computed anyway, and `PolicyAndValue.heads` turns them into the same logits and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhfkit.errors import UserError
from rlhfkit.models.loading import LoraConfig, disable_dropout


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only: a left-padded row starts at position 0, as in generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def trunk_hidden(trunk: nn.Module, input_ids: Tensor, attention_mask: Tensor, start: int) -> Tensor:
    """Last hidden states at positions start-1 ... end-2: those that predict tokens start ... end-1."""
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.last_hidden_state[:, start - 1 : -1]


def response_logits(lm: Any, input_ids: Tensor, attention_mask: Tensor, start: int) -> Tensor:
    """Logits (B, T, V) for the tokens from column `start` on (the response) of any causal LM.

    Works for a peft model too: inside `lm.disable_adapter()` it gives the base model's logits,
    which is how the LoRA policy's reference model costs no memory.
    """
    hidden = trunk_hidden(lm.get_decoder(), input_ids, attention_mask, start)
    return lm.get_output_embeddings()(hidden)


class PolicyAndValue(nn.Module):
    """A causal LM plus a value function, as one module (one optimizer, one checkpoint).

    `critic=None`: a zero-initialised linear value head on the policy's last hidden state.
    `critic=` a sequence-classification model (e.g. the reward model): its score head on its own
    trunk gives the values.
    """

    def __init__(self, policy: Any, critic: Any | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        if critic is None:
            self.value_head = nn.Linear(policy.get_output_embeddings().in_features, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V), values (B, T) float32) for the response that begins at column `start`.

        values[:, t] estimates the return from the state *before* response token t, i.e. it is read
        from the same hidden state as the logits that choose token t.
        """
        hidden = trunk_hidden(self.policy.get_decoder(), input_ids, attention_mask, start)
        return self.heads(hidden, input_ids, attention_mask, start)

    def heads(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Logits and values from the policy's last hidden states at the response positions (the
        critic, if any, reads the tokens itself)."""
        logits = self.policy.get_output_embeddings()(hidden)
        if self.critic is None:
            values = self.value_head(hidden.float())
        else:
            critic_hidden = trunk_hidden(self.critic.base_model, input_ids, attention_mask, start)
            values = self.critic.score(critic_hidden).float()
        return logits, values.squeeze(-1)


@contextmanager
def generation_hidden_states(lm: Any) -> Iterator[list[list[Tensor]]]:
    """Record, while `lm` generates, the last hidden state from which each new token was sampled.

    Why: they are exactly the hidden states PPO needs for the log-probs and values of the sampled
    tokens, so keeping them saves a forward pass of the policy over every rollout (what differs is
    only float rounding between the cached, step-by-step computation and a full pass). Yields one
    list per `generate` call, holding one (B, 1, d) state per generated token.
    """
    calls: list[list[Tensor]] = []
    decoder = lm.get_decoder()

    def before(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:  # the prompt's forward: a new generate call
            calls.append([])

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        calls[-1].append(output.last_hidden_state[:, -1:].detach())

    handles = [
        decoder.register_forward_pre_hook(before, with_kwargs=True),
        decoder.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def stack_generation_states(calls: list[list[Tensor]], response_mask: Tensor) -> Tensor:
    """The recorded states as one (B, T, d) tensor aligned with the right-padded responses.

    Raises RuntimeError if they do not line up with the responses (a generation strategy that
    calls the model differently): a silent misalignment would train on wrong log-probs.
    """
    width = response_mask.shape[1]
    parts = [torch.cat(steps, 1) for steps in calls if steps]
    rows = 0
    for part in parts:
        longest = int(response_mask[rows : rows + part.shape[0]].sum(1).max())
        if longest > part.shape[1]:
            raise RuntimeError(f"recorded {part.shape[1]} generation steps for responses of {longest} tokens")
        rows += part.shape[0]
    if rows != response_mask.shape[0]:
        raise RuntimeError(f"recorded generation states for {rows} rows, expected {response_mask.shape[0]}")
    return torch.cat([F.pad(p[:, :width], (0, 0, 0, width - min(width, p.shape[1]))) for p in parts])


def load_critic(
    path: str,
    vocab_size: int,
    lora: LoraConfig | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Any:
    """A critic initialised from a reward-model folder (a one-output sequence classifier).

    Why check the vocabulary: the critic reads the policy's token ids, so it must have been trained
    with the policy's tokenizer (pad token included); a different one gives meaningless values.
    With `lora`, the critic trains a LoRA adapter plus its score head, like the policy, so that
    LoRA mode stays light; the peft wrapper is dropped and the injected layers stay in place.
    """
    from transformers import AutoModelForSequenceClassification

    try:
        critic = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
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
    if lora is None:
        return critic
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS",  # keeps the score head trainable
    )
    return get_peft_model(critic, peft_cfg).get_base_model()
