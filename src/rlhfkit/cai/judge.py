"""AI feedback: judges that say which of two responses is better, and labelling completions with them.

`ModelJudge` asks a causal LM the constitution's question ("Which reply is ...? (A) ... (B) ...")
and reads its answer from the next-token distribution: the probabilities of the two letters,
renormalised over just those two, so p(A) = σ(logit_A − logit_B). LMs favour one position, so every
pair is asked in both orders and the two answers are averaged:

    p(first better) = (p_AB(A) + p_BA(B)) / 2

where p_AB puts the first response in slot (A) and p_BA puts it in slot (B). A judge that always
says "A" with probability q, whatever the replies, then gives exactly 1/2: pure position bias cancels.

`RewardJudge` turns any reward source (reward model, classifier, function) into a judge via
Bradley-Terry: p(first better) = σ(score(first) − score(second)). Position plays no role there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import torch

from rlhfkit.cai.constitution import Constitution, Principle
from rlhfkit.cai.prompts import judge_prompt
from rlhfkit.data.formats import Completions, Pair, Text, text_key
from rlhfkit.engine.progress import track
from rlhfkit.errors import UserError
from rlhfkit.rewards.base import RewardSource

P_MAX = 0.9999  # a judge is never certain: caps the margin at logit(P_MAX) ≈ 9.2


@dataclass
class Judgement:
    """p: probability that the first response is better (position-averaged); p_ab / p_ba: the judge's
    p(A) with the first response in slot A / in slot B (so p = (p_ab + 1 − p_ba) / 2)."""

    p: torch.Tensor
    p_ab: torch.Tensor
    p_ba: torch.Tensor


def answer_ids(tokenizer: Any, text: str) -> tuple[list[int], int, int]:
    """(ids to feed, id of the token that starts answer "A", the same for "B").

    Why not just encode " A": whether the letter is its own token, carries a space, or merges with
    the "(" before it depends on the tokenizer. Encoding the text followed by each letter and taking
    the first position where the two encodings differ works for all of them.
    """
    ids_a = tokenizer(text + "A", add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(text + "B", add_special_tokens=False)["input_ids"]
    k = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), None)
    if k is None or k == 0:
        raise UserError("the judge's tokenizer cannot tell the answers 'A' and 'B' apart after the prompt")
    return ids_a[:k], ids_a[k], ids_b[k]


class ModelJudge:
    """A causal LM as the judge, asked each pair in both orders (see the module docstring)."""

    uses_principles = True

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_tokens: int = 1024):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_tokens = batch_size, max_tokens

    @torch.no_grad()
    def answer_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """p(A) of each rendered judge prompt, renormalised over the two answer letters."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        probs: list[torch.Tensor] = []
        for start in track(range(0, len(texts), self.batch_size), "judge"):
            parts = [answer_ids(self.tokenizer, t) for t in texts[start : start + self.batch_size]]
            rows = [ids[-self.max_tokens :] for ids, _, _ in parts]  # too long: keep the end, where the question is
            # Left padding, so the answer position is the last column for every row and only its logits
            # are computed (a full (batch, length, vocab) tensor would not fit for a real judge); explicit
            # positions make a padded row see exactly what it would see alone.
            width = max(len(r) for r in rows)
            ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
            letters = torch.tensor([[ia, ib] for _, ia, ib in parts], device=device)
            a, b = logits[:, -1].float().gather(1, letters).unbind(1)
            probs.append(torch.sigmoid(a - b).cpu())
        self.model.train(was_training)
        return torch.cat(probs)

    def prefer(
        self, prompts: Sequence[Text], firsts: Sequence[str], seconds: Sequence[str], principles: Sequence[Principle]
    ) -> Judgement:
        ab = [
            judge_prompt(self.tokenizer, p, x, y, c)
            for p, x, y, c in zip(prompts, firsts, seconds, principles, strict=True)
        ]
        ba = [
            judge_prompt(self.tokenizer, p, y, x, c)
            for p, x, y, c in zip(prompts, firsts, seconds, principles, strict=True)
        ]
        p_ab, p_ba = self.answer_probs(ab), self.answer_probs(ba)
        return Judgement(p=(p_ab + (1 - p_ba)) / 2, p_ab=p_ab, p_ba=p_ba)


class RewardJudge:
    """Any reward source as a judge: p(first better) = σ(score(first) − score(second))."""

    uses_principles = False

    def __init__(self, source: RewardSource):
        self.source = source

    def prefer(
        self, prompts: Sequence[Text], firsts: Sequence[str], seconds: Sequence[str], principles: Sequence[Principle]
    ) -> Judgement:
        diff = self.source.score(list(prompts), list(firsts)).float().cpu()
        diff = diff - self.source.score(list(prompts), list(seconds)).float().cpu()
        p = torch.sigmoid(diff)
        return Judgement(p=p, p_ab=p, p_ba=1 - p)


Judge = ModelJudge | RewardJudge


def candidate_pairs(
    records: Sequence[Completions], mode: Literal["all", "sampled"], rng: random.Random
) -> list[tuple[Completions, int, int]]:
    """(record, i, j) to compare: every pair of distinct candidates, or one sampled pair per prompt."""
    out: list[tuple[Completions, int, int]] = []
    for rec in records:
        keys = [text_key(c) for c in rec.completions]
        pairs = [(i, j) for i, j in combinations(range(len(keys)), 2) if keys[i] != keys[j]]
        if mode == "sampled" and pairs:
            pairs = [rng.choice(pairs)]
        out += [(rec, i, j) for i, j in pairs]
    return out


def margin_of(p_chosen: float) -> float:
    """The pair's margin: logit of the judge's probability that `chosen` is better (recover p = σ(margin)).

    Why logit: under Bradley-Terry a preference probability p is a reward gap of logit(p), so the RM's
    margin loss −log σ(r_c − r_r − margin) asks for at least the gap the judge implies.
    """
    p = min(p_chosen, P_MAX)
    return math.log(p / (1 - p))


def label(
    judge: Judge,
    records: Sequence[Completions],
    constitution: Constitution,
    mode: Literal["all", "sampled"] = "all",
    min_confidence: float = 0.0,
    seed: int = 0,
) -> tuple[list[Pair], list[dict[str, Any]]]:
    """Judge candidate pairs and return (preference pairs, one judgement record per compared pair).

    A pair becomes `{prompt, chosen, rejected, margin}` with the judge's favourite as chosen, unless
    |p − 1/2| ≤ min_confidence (an exact tie is always dropped: it carries no preference).
    Conversational candidates are not supported: the judge reads replies as text.
    """
    rng = random.Random(seed)
    todo = candidate_pairs(records, mode, rng)
    for rec, i, j in todo:
        if not (isinstance(rec.completions[i], str) and isinstance(rec.completions[j], str)):
            raise UserError(f"{rec._where or rec.prompt_id}: completions: the judge compares text replies only")
    if not todo:
        return [], []
    principles = [constitution.sample(rng) for _ in todo]
    judged = judge.prefer(
        [rec.prompt for rec, _, _ in todo],
        [str(rec.completions[i]) for rec, i, _ in todo],
        [str(rec.completions[j]) for rec, _, j in todo],
        principles,
    )
    pairs: list[Pair] = []
    details: list[dict[str, Any]] = []
    for (rec, i, j), principle, p, p_ab, p_ba in zip(
        todo, principles, judged.p.tolist(), judged.p_ab.tolist(), judged.p_ba.tolist(), strict=True
    ):
        keep = abs(p - 0.5) > min_confidence
        if keep:
            win, lose = (i, j) if p > 0.5 else (j, i)
            c = rec.completions
            pairs.append(Pair(prompt=rec.prompt, chosen=c[win], rejected=c[lose], margin=margin_of(max(p, 1 - p))))
        details.append(
            {
                "prompt_id": rec.prompt_id,
                "first": i,
                "second": j,
                "principle": principle.name if judge.uses_principles else None,
                "p_first_better": p,
                "p_ab": p_ab,
                "p_ba": p_ba,
                "kept": keep,
            }
        )
    return pairs, details


def mix_pairs(human: Sequence[Pair], ai: Sequence[Pair], ai_weight: float, seed: int = 0) -> list[Pair]:
    """Human pairs once each, plus AI pairs at total weight `ai_weight` relative to a human pair.

    The RM loss is a mean over pairs, so a pair's weight is how often it appears: every AI pair
    appears ⌊w⌋ times, and a seeded random round(frac(w)·n) of them once more. In expectation over
    that draw the RM's loss is exactly Σ human losses + w·Σ AI losses (up to the mean's normaliser).
    """
    if ai_weight < 0:
        raise UserError(f"ai_weight must be ≥ 0, got {ai_weight}")
    whole, frac = divmod(ai_weight, 1.0)
    extra = random.Random(seed).sample(range(len(ai)), round(frac * len(ai)))
    mixed = list(human) + [p for p in ai for _ in range(int(whole))] + [ai[k] for k in sorted(extra)]
    return mixed
