"""A PPO rollout as tensors, and how its rows are cut into micro-batches of similar lengths.

RL machinery the PPO loop (`rlhfkit.stages.ppo`) orchestrates: the loop fills `Rollout.tokens`
(log-probs, values, advantages, ...) and runs every forward/backward pass over
`Rollout.micro_batches`, each selected with `Rollout.rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

# On a CPU one forward + backward pass costs about as much as this many more tokens through the
# model, whatever its size: every pass streams all the weights through the caches (measured 20-36
# on GPT-2 and Llama of 3-40M parameters). One more micro-batch pays when it saves more padding.
CPU_PASS_COST_TOKENS = 32


@dataclass
class Rollout:
    """One batch of responses and everything PPO computes about them, as (B, ...) tensors.

    `input_ids` is the left-padded prompt followed by the right-padded response, so the response
    starts at column `start` in every row; per-token tensors in `tokens` are (B, T).
    """

    input_ids: Tensor
    attention_mask: Tensor
    start: int
    tokens: dict[str, Tensor]
    pass_cost: float | None = None  # what one more forward/backward pass costs, in tokens (`pass_cost_on`)

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor, int, dict[str, Tensor]]:
        """The rows `index`, without the columns that are padding in all of them.

        Why: a minibatch of short responses should not pay for the longest one in the rollout.
        """
        mask = self.attention_mask[index]
        used = mask.any(0).nonzero().squeeze(1)
        lo, hi = int(used[0]), int(used[-1]) + 1
        tokens = {k: v[index, : hi - self.start] for k, v in self.tokens.items()}
        return self.input_ids[index, lo:hi], mask[:, lo:hi], self.start - lo, tokens

    def micro_batches(self, rows: Tensor, max_rows: int) -> list[Tensor]:
        """`rows` split into micro-batches of at most `max_rows` rows of similar lengths.

        Why: every row of a micro-batch is as wide as its longest prompt plus its longest response,
        so mixing 5-token responses with 32-token ones computes mostly padding (28% of the tokens in
        the benchmark's minibatches of 16 random rows; ~10% once grouped).
        The split minimises padded tokens + `pass_cost` tokens per pass (None: no more passes than
        `max_rows` requires), over contiguous runs of the rows sorted by length (dynamic
        programming). The PPO loss is unchanged: the micro-batches' losses add up to the minibatch's.
        """
        prompt = self.attention_mask[rows, : self.start].sum(1).tolist()
        response = self.tokens["mask"][rows].sum(1).tolist()
        n, pass_cost = len(prompt), self.pass_cost
        if pass_cost is None:  # more than any split can save: only as many passes as max_rows needs
            pass_cost = n * (max(prompt) + max(response)) + 1.0
        order = sorted(range(n), key=lambda i: (response[i], prompt[i]))
        best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[j]: cost of the first j sorted rows
        for j in range(1, n + 1):
            widest_prompt = widest_response = 0
            for i in range(j - 1, max(0, j - max_rows) - 1, -1):  # the last micro-batch: sorted rows i..j-1
                widest_prompt = max(widest_prompt, prompt[order[i]])
                widest_response = max(widest_response, response[order[i]])
                cost = best[i] + (j - i) * (widest_prompt + widest_response) + pass_cost
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        parts = []
        while n:
            parts.append(rows[order[cut[n] : n]])
            n = cut[n]
        return parts[::-1]


def pass_cost_on(device: Any) -> float | None:
    """The per-pass cost `Rollout.micro_batches` weighs against padding: measured on CPU; None on an
    accelerator, where a pass's fixed cost is not known (so no extra passes)."""
    return CPU_PASS_COST_TOKENS if getattr(device, "type", device) == "cpu" else None
