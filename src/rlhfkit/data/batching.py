"""Turning encoded examples into training batches: SFT (masked labels, packing) and reward models
(pairs grouped by prompt, ratings).

SFT: labels are −100 (ignored by the loss) on prompt tokens and padding, so the model learns only
the responses, EOS included. Packing concatenates whole examples into blocks and restarts
`position_ids` at every example; with no attention mask, `transformers` turns those restarts into
a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`), so an example never
attends to its neighbours and packed training computes the same loss as unpacked training.
Architectures that do not build their mask through `transformers.masking_utils` (old remote
code) would attend across examples: keep packing off for those.

Reward models: all pairs of one prompt form one dataset item, so they land in the same batch
(InstructGPT: spreading one prompt's C(K,2) pairs over many batches overfits), and each distinct
(prompt, response) sequence is encoded and run through the model once, however many pairs use it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from rlhfkit.data.formats import Demonstration, Pair, Text, text_key

IGNORE_INDEX = -100  # label of a token that does not count in the loss
# "input_ids" (and "token_type_ids" for BERT-style pair inputs; "user": [column] for a personalised RM)
Encoded = dict[str, list[int]]
T = TypeVar("T")  # any record with a `prompt`: Demonstration, Pair, Rating


def split_by_prompt(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out a seeded share of *prompts* (at least one when fraction > 0) with all their records,
    so that no held-out prompt was seen in training (a plain text, which has none, is its own key)."""
    keys = [text_key(x.key if isinstance(x, Demonstration) else x.prompt) for x in items]  # type: ignore[attr-defined]
    prompts = sorted(set(keys))
    if fraction == 0 or len(prompts) < 2:
        return items, []
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(len(prompts) * fraction))])
    train = [x for x, k in zip(items, keys, strict=True) if k not in held]
    return train, [x for x, k in zip(items, keys, strict=True) if k in held]


def pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# ---- SFT ------------------------------------------------------------------------------------
SFTExample = tuple[list[int], int]  # (prompt + response + EOS token ids, prompt length)


def sft_labels(ids: list[int], prompt_len: int) -> list[int]:
    return [IGNORE_INDEX] * prompt_len + ids[prompt_len:]


def sft_collate(pad_id: int) -> Callable[[list[SFTExample]], dict[str, torch.Tensor]]:
    """Right-padded input_ids, attention_mask, and labels masked on prompt and padding."""

    def collate(examples: list[SFTExample]) -> dict[str, torch.Tensor]:
        ids = pad_right([e[0] for e in examples], pad_id)
        lengths = torch.tensor([len(e[0]) for e in examples])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        labels = pad_right([sft_labels(*e) for e in examples], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@dataclass
class PackedBlock:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack_examples(examples: Sequence[SFTExample], block_size: int, seed: int = 0) -> list[PackedBlock]:
    """Greedily fill blocks of at most `block_size` tokens with whole examples (in a seeded order).

    Examples are never split, so no response loses its beginning. The first token of each example
    gets label −100: it would otherwise be predicted from the previous example's last token.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    blocks: list[PackedBlock] = []
    current = PackedBlock([], [], [])
    for i in order:
        ids, prompt_len = examples[i]
        if len(ids) > block_size:
            raise ValueError(f"example of {len(ids)} tokens does not fit a block of {block_size}")
        if len(current.input_ids) + len(ids) > block_size:
            blocks.append(current)
            current = PackedBlock([], [], [])
        labels = sft_labels(ids, prompt_len)
        labels[0] = IGNORE_INDEX
        current.input_ids += ids
        current.labels += labels
        current.position_ids += list(range(len(ids)))
    if current.input_ids:
        blocks.append(current)
    return blocks


def packed_collate(pad_id: int) -> Callable[[list[PackedBlock]], dict[str, torch.Tensor]]:
    """Batch packed blocks. Padding gets its own position run (0, 1, ...), so it forms a separate
    masked-out "example"; `attention_mask` only counts real tokens and is not given to the model."""

    def collate(blocks: list[PackedBlock]) -> dict[str, torch.Tensor]:
        width = max(len(b.input_ids) for b in blocks)
        positions = [b.position_ids + list(range(width - len(b.position_ids))) for b in blocks]
        ids = pad_right([b.input_ids for b in blocks], pad_id)
        mask = pad_right([[1] * len(b.input_ids) for b in blocks], 0)
        return {
            "input_ids": ids,
            "labels": pad_right([b.labels for b in blocks], IGNORE_INDEX),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "attention_mask": mask,
        }

    return collate


# ---- reward models --------------------------------------------------------------------------
def collate_sequences(seqs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded sequences; the reward is read at the last real token (or the CLS token)."""
    out = {
        "input_ids": pad_right([s["input_ids"] for s in seqs], pad_id),
        "attention_mask": pad_right([[1] * len(s["input_ids"]) for s in seqs], 0),
    }
    if "token_type_ids" in seqs[0]:
        out["token_type_ids"] = pad_right([s["token_type_ids"] for s in seqs], 0)
    if "user" in seqs[0]:  # a personalised reward model's output column per sequence
        out["user"] = torch.tensor([s["user"][0] for s in seqs], dtype=torch.long)
    return out


def group_by_prompt(pairs: Sequence[Pair]) -> list[list[Pair]]:
    """Pairs grouped by prompt, in order of first appearance."""
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(text_key(p.prompt), []).append(p)
    return list(groups.values())


@dataclass
class PairGroup:
    """The pairs of one prompt: distinct sequences encoded once; pairs are indices into them."""

    sequences: list[Encoded]
    chosen: list[int]
    rejected: list[int]
    margins: list[float]


def make_pair_group(pairs: Sequence[Pair], encode: Callable[[Text, Text], Encoded]) -> PairGroup:
    index: dict[str, int] = {}
    group = PairGroup([], [], [], [])

    def seq(response: Text) -> int:
        key = text_key(response)
        if key not in index:
            index[key] = len(group.sequences)
            group.sequences.append(encode(pairs[0].prompt, response))
        return index[key]

    for p in pairs:
        group.chosen.append(seq(p.chosen))
        group.rejected.append(seq(p.rejected))
        group.margins.append(p.margin or 0.0)
    return group


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many tokens all `seqs` start with, leaving each at least its last token of its own."""
    first, limit = seqs[0], min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def collate_shared_prefix(groups: Sequence[Sequence[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per group: the tokens its sequences share once, then each sequence's own tokens.

    Why: the sequences of one prompt (chosen and rejected, or a ranking's K responses) share the
    prompt's tokens, and a causal model's hidden states there do not depend on what follows, so
    running them once per group instead of once per sequence saves that work (and the padding of
    the longest sequence). `segments` says which part a token is (0: shared, i + 1: the group's
    i-th sequence, -1: padding) and `position_ids` restart after the shared part for every
    sequence, so that `segment_attention_mask` lets each sequence see exactly the
    tokens it would see alone: the rewards equal those of `collate_sequences` up to float rounding.
    `ends` (row, column) is the last token of every sequence, in group order: where it is scored.
    `columns` (sequences, longest) is the column of each of a sequence's tokens in its row (0 past
    its end), for readers of more than the last token (the RL update's per-token log-probs).
    """
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    segments: list[list[int]] = []
    ends: list[tuple[int, int]] = []
    columns: list[list[int]] = []
    for r, group in enumerate(groups):
        ids = [s["input_ids"] for s in group]
        n = shared_prefix(ids)
        row, pos, seg = list(ids[0][:n]), list(range(n)), [0] * n
        for i, s in enumerate(ids, start=1):
            columns.append(list(range(n)) + list(range(len(row), len(row) + len(s) - n)))
            row += s[n:]
            pos += range(n, len(s))
            seg += [i] * (len(s) - n)
            ends.append((r, len(row) - 1))
        rows.append(row)
        positions.append(pos)
        segments.append(seg)
    out = {
        "input_ids": pad_right(rows, pad_id),
        "attention_mask": pad_right([[1] * len(r) for r in rows], 0),  # real tokens (counted), not the model's mask
        "position_ids": pad_right(positions, 0),
        "segments": pad_right(segments, -1),
        "ends": torch.tensor(ends, dtype=torch.long),
        "columns": pad_right(columns, 0),
    }
    if "user" in groups[0][0]:  # as in collate_sequences: one output column per sequence, in `ends` order
        out["user"] = torch.tensor([s["user"][0] for group in groups for s in group], dtype=torch.long)
    return out


def segment_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (B, 1, L, L) for rows of a shared prefix (segment 0) followed by
    sequences (segments 1, 2, ...): causal, and a sequence's token sees the prefix and its own
    sequence, never another's. Padding (-1) sees the prefix and padding: never an empty row, whose
    softmax would be NaN (and NaN gradients, although its outputs are never read)."""
    q, k = segments[:, None, :, None], segments[:, None, None, :]
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & ((k == 0) | (k == q))
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def pair_collate(pad_id: int, share_prefix: bool = False) -> Callable[[list[PairGroup]], dict[str, torch.Tensor]]:
    """One batch of prompt groups: all their sequences, and which rows are chosen/rejected.

    `share_prefix` (decoder reward models): a group's shared prompt tokens run once for all its
    sequences (`collate_shared_prefix`); otherwise every sequence is its own right-padded row.
    """

    def collate(groups: list[PairGroup]) -> dict[str, torch.Tensor]:
        seqs: list[Encoded] = []
        chosen: list[int] = []
        rejected: list[int] = []
        margins: list[float] = []
        for g in groups:
            offset = len(seqs)
            seqs += g.sequences
            chosen += [offset + i for i in g.chosen]
            rejected += [offset + i for i in g.rejected]
            margins += g.margins
        if share_prefix:
            batch = collate_shared_prefix([g.sequences for g in groups], pad_id)
        else:
            batch = collate_sequences(seqs, pad_id)
        batch["chosen_idx"] = torch.tensor(chosen, dtype=torch.long)
        batch["rejected_idx"] = torch.tensor(rejected, dtype=torch.long)
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
        return batch

    return collate


def rating_collate(pad_id: int) -> Callable[[list[tuple[Encoded, float]]], dict[str, torch.Tensor]]:
    def collate(items: list[tuple[Encoded, float]]) -> dict[str, torch.Tensor]:
        batch = collate_sequences([seq for seq, _ in items], pad_id)
        batch["score"] = torch.tensor([score for _, score in items], dtype=torch.float32)
        return batch

    return collate
