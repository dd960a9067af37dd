"""Consensus from several labelers' rankings of one item, and the datasets built from it.

Each ranking is turned into pairwise outcomes (a tie counts as half a win each way) and a
Bradley-Terry model is fitted per item: P(i beats j) = sigmoid(s_i - s_j). `choix` has no tie
input and no weights, so every strict win enters twice and every tie once each way: the same
likelihood, doubled. A small Gaussian prior (`alpha`) keeps the fit finite when labelers are
unanimous (the MLE would be infinite) and centres the scores at 0.

Consensus strengths are log-odds: a margin of 1.1 means the consensus expects 75% of labelers to
prefer the first candidate. That is what the optional `margin` of an exported pair carries.
A ranking's stated strength of preference (`Ranking.strength`) weighs its comparisons: "slightly
better" counts half, "much better" twice as much as a plain "better" (see `pairwise_outcomes`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from rlhfkit.data.formats import DEFAULT_STRENGTH, Completions, Pair, Ranking, text_key, text_to_json

DEFAULT_ALPHA = 0.1
TIE_TOL = 1e-6


# Copies of one strict win per stated strength, when strengths are given (ties: 2 each way, and
# the prior doubled): "better" is then exactly the unweighted fit, on twice the data.
_WIN_COPIES = {1: 2, 2: 4, 3: 8}


def pairwise_outcomes(
    rankings: Sequence[Sequence[int]], strengths: Sequence[int | None] | None = None
) -> list[tuple[int, int]]:
    """(winner, loser) tuples for choix: strict wins twice, ties once each way (= half a win).

    With `strengths` (one per ranking) every outcome is doubled and a strict win is repeated by
    its ranking's strength instead: slightly better 2, better (or not given) 4, much better 8
    copies. choix takes no weights; repeating outcomes is the same likelihood."""
    weighted = strengths is not None and any(x is not None for x in strengths)
    data: list[tuple[int, int]] = []
    for n, ranks in enumerate(rankings):
        win_copies = _WIN_COPIES[(strengths[n] if strengths else None) or DEFAULT_STRENGTH] if weighted else 2
        tie_copies = 2 if weighted else 1
        for i, j in combinations(range(len(ranks)), 2):
            if ranks[i] == ranks[j]:
                data += [(i, j), (j, i)] * tie_copies
            else:
                win, lose = (i, j) if ranks[i] < ranks[j] else (j, i)
                data += [(win, lose)] * win_copies
    return data


def bradley_terry(
    n: int,
    rankings: Sequence[Sequence[int]],
    alpha: float = DEFAULT_ALPHA,
    strengths: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Centred Bradley-Terry log-strengths of n candidates (higher = better); `strengths` weigh
    each ranking (see pairwise_outcomes)."""
    data = pairwise_outcomes(rankings, strengths)
    if not data:
        return np.zeros(n)
    if strengths is not None and any(x is not None for x in strengths):
        alpha *= 2  # the data was doubled: the same prior per real comparison
    # Imported here: choix pulls in scipy.stats (~1.5 s), which the server's admin commands,
    # importing this module through the service, never need.
    import choix

    # choix's penalty is alpha * ||s||^2 on the doubled likelihood: alpha/2 per real comparison.
    scores = choix.opt_pairwise(n, data, alpha=alpha)
    return scores - scores.mean()


def dense_ranks(scores: Sequence[float], tol: float = TIE_TOL) -> list[int]:
    """Scores -> dense ranks (1 = highest); scores within `tol` of each other share a rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    rank, prev = 0, None
    for i in order:
        if prev is None or prev - scores[i] > tol:
            rank += 1
            prev = scores[i]
        ranks[i] = rank
    return ranks


@dataclass
class Consensus:
    prompt_id: str
    scores: list[float]  # Bradley-Terry log-strengths, one per candidate (original order)
    ranking: list[int]  # dense consensus ranks
    n_judgments: int
    n_unusable: int

    @property
    def unusable(self) -> bool:
        """Most labelers flagged the item (not rankable / all bad)."""
        return self.n_unusable * 2 > self.n_judgments

    def as_ranking(self) -> Ranking:
        return Ranking(prompt_id=self.prompt_id, labeler="consensus", ranking=self.ranking, unusable=self.unusable)


def group_by_item(rankings: Sequence[Ranking]) -> dict[str, list[Ranking]]:
    groups: dict[str, list[Ranking]] = defaultdict(list)
    for r in rankings:
        groups[r.prompt_id].append(r)
    return dict(groups)


def consensus(rankings: Sequence[Ranking], alpha: float = DEFAULT_ALPHA) -> dict[str, Consensus]:
    """Per item: a Bradley-Terry fit over the usable rankings (flagged ones carry no order)."""
    out: dict[str, Consensus] = {}
    for prompt_id, group in group_by_item(rankings).items():
        usable = [r for r in group if not r.unusable]
        n = len(group[0].ranking)
        scores = bradley_terry(n, [r.ranking for r in usable], alpha, [r.strength for r in usable])
        ranking = dense_ranks(scores.tolist()) if usable else [1] * n
        out[prompt_id] = Consensus(
            prompt_id=prompt_id,
            scores=[round(float(x), 6) for x in scores],
            ranking=ranking,
            n_judgments=len(group),
            n_unusable=len(group) - len(usable),
        )
    return out


def consensus_rows(cons: dict[str, Consensus]) -> list[dict[str, Any]]:
    """The consensus as `rankings` records (labeler "consensus") plus scores and judgment count."""
    return [c.as_ranking().to_json() | {"scores": c.scores, "n_judgments": c.n_judgments} for c in cons.values()]


def consensus_pairs(cons: dict[str, Consensus], completions: Sequence[Completions], margin: bool = False) -> list[Pair]:
    """One TRL pair (preferred first) per candidate pair the consensus orders; ties, flagged items
    and identical texts are left out. `margin` adds the consensus score difference."""
    pairs: list[Pair] = []
    for c in completions:
        k = cons.get(c.prompt_id)
        if k is None or k.unusable:
            continue
        for i, j in combinations(range(len(c.completions)), 2):
            if k.ranking[i] == k.ranking[j]:
                continue
            win, lose = (i, j) if k.ranking[i] < k.ranking[j] else (j, i)
            if text_key(c.completions[win]) == text_key(c.completions[lose]):
                continue
            pairs.append(
                Pair(
                    prompt=c.prompt,
                    chosen=c.completions[win],
                    rejected=c.completions[lose],
                    margin=round(k.scores[win] - k.scores[lose], 4) if margin else None,
                )
            )
    return pairs


def kto_records(cons: dict[str, Consensus], completions: Sequence[Completions]) -> list[dict[str, Any]]:
    """KTO-style {prompt, completion, label}: label True above the item's consensus mean, False
    below (scores are centred, so the sign decides); candidates at the mean are left out. An item
    most labelers flagged (not rankable / all bad) makes all its candidates undesirable."""
    rows: list[dict[str, Any]] = []
    for c in completions:
        k = cons.get(c.prompt_id)
        if k is None:
            continue
        for text, score in zip(c.completions, k.scores, strict=True):
            if k.unusable:
                label = False
            elif abs(score) > TIE_TOL:
                label = score > 0
            else:
                continue
            rows.append({"prompt": text_to_json(c.prompt), "completion": text_to_json(text), "label": label})
    return rows
