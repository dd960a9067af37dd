"""A PPO rollout as tensors, and how its rows are cut into micro-batches of similar lengths.

RL machinery the PPO loop (`rlhfkit.stages.ppo`) orchestrates: the loop fills `Rollout.tokens`
(log-probs, values, advantages, ...) and runs every forward/backward pass over
`Rollout.micro_batches`, each selected with `Rollout.rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhfkit.data.batching import collate_shared_prefix
from rlhfkit.models.value import SharedPrefixRows

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
    # each row's prompt (any integer id): rows of one prompt run its tokens once (`shared`); None: each row alone
    groups: Tensor | None = None

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor, int, dict[str, Tensor]]:
        """The rows `index`, without the columns that are padding in all of them.

        Why: a minibatch of short responses should not pay for the longest one in the rollout.
        """
        mask = self.attention_mask[index]
        used = mask.any(0).nonzero().squeeze(1)
        lo, hi = int(used[0]), int(used[-1]) + 1
        tokens = {k: v[index, : hi - self.start] for k, v in self.tokens.items()}
        return self.input_ids[index, lo:hi], mask[:, lo:hi], self.start - lo, tokens

    def shared(self, index: Tensor) -> SharedPrefixRows | None:
        """The rows `index` laid out one row per prompt, its tokens once (None without `groups`).

        The layout is `data.batching.collate_shared_prefix`'s (the reward model's shared prompts);
        `take` maps it back onto `rows(index)`'s response columns, in `index` order.
        """
        if self.groups is None:
            return None
        width = self.rows(index)[3]["mask"].shape[1]
        real = self.attention_mask[index].bool().cpu()  # the layout is built on the CPU, then moved
        members = by_group(self.groups[index].tolist())
        order = [b for bs in members for b in bs]
        ids = self.input_ids[index].cpu()
        seqs = [[{"input_ids": ids[b][real[b]].tolist()} for b in bs] for bs in members]
        batch = collate_shared_prefix(seqs, pad_id=0)  # any id: padding is masked out (segment -1)
        row_width = batch["input_ids"].shape[1]
        prompt_len = real[:, : self.start].sum(1)[order]
        # response token t of a sequence is predicted at its position prompt_len + t - 1 (clamped: past its end)
        position = (prompt_len[:, None] + torch.arange(width) - 1).clamp(0, batch["columns"].shape[1] - 1)
        flat = batch["ends"][:, :1] * row_width + batch["columns"].gather(1, position)
        take = torch.empty_like(flat)
        take[torch.tensor(order)] = flat
        device = self.input_ids.device
        return SharedPrefixRows(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            segments=batch["segments"].to(device),
            take=take.to(device),
        )

    def micro_batches(self, rows: Tensor, max_rows: int) -> list[Tensor]:
        """`rows` split into micro-batches of at most `max_rows` rows of similar lengths.

        Why: every row of a micro-batch is as wide as its longest prompt plus its longest response,
        so mixing 5-token responses with 32-token ones computes mostly padding (28% of the tokens in
        the benchmark's minibatches of 16 random rows; ~10% once grouped).
        The split minimises padded tokens + `pass_cost` tokens per pass (None: no more passes than
        `max_rows` requires), over contiguous runs of the rows sorted by length (dynamic
        programming). The PPO loss is unchanged: the micro-batches' losses add up to the minibatch's.
        With `groups`, the unit is a prompt's rows (up to `max_rows` of them), one row of its shared
        prompt and all their responses wide (`shared`), so a prompt's responses stay together.
        """
        if self.groups is None:  # units of rows that go together: positions in `rows`
            units = [[i] for i in range(len(rows))]
        else:
            members = by_group(self.groups[rows].tolist())
            units = [bs[c : c + max_rows] for bs in members for c in range(0, len(bs), max_rows)]
        prompt_tokens = self.attention_mask[rows, : self.start].sum(1).tolist()
        response_tokens = self.tokens["mask"][rows].sum(1).tolist()
        if self.groups is None:  # a row: left-padded prompt + right-padded response
            prompt = [prompt_tokens[u[0]] for u in units]
            response = [response_tokens[u[0]] for u in units]
        else:  # a shared row: right-padded as a whole (its prompt counted once)
            prompt = [0] * len(units)
            response = [prompt_tokens[u[0]] + sum(response_tokens[i] for i in u) for u in units]
        n, pass_cost = len(units), self.pass_cost
        if pass_cost is None:  # more than any split can save: only as many passes as max_rows needs
            pass_cost = n * (max(prompt) + max(response)) + 1.0
        order = sorted(range(n), key=lambda i: (response[i], prompt[i]))
        best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[j]: cost of the first j sorted units
        for j in range(1, n + 1):
            widest_prompt = widest_response = size = 0
            for i in range(j - 1, -1, -1):  # the last micro-batch: sorted units i..j-1
                size += len(units[order[i]])
                if size > max_rows:
                    break
                widest_prompt = max(widest_prompt, prompt[order[i]])
                widest_response = max(widest_response, response[order[i]])
                cost = best[i] + (j - i) * (widest_prompt + widest_response) + pass_cost
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        parts = []
        while n:
            parts.append(rows[[i for u in order[cut[n] : n] for i in units[u]]])
            n = cut[n]
        return parts[::-1]


def by_group(groups: list[int]) -> list[list[int]]:
    """The positions of `groups` grouped by their value, groups in order of first appearance."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return list(members.values())


def pass_cost_on(device: Any) -> float | None:
    """The per-pass cost `Rollout.micro_batches` weighs against padding: measured on CPU; None on an
    accelerator, where a pass's fixed cost is not known (so no extra passes)."""
    return CPU_PASS_COST_TOKENS if getattr(device, "type", device) == "cpu" else None
