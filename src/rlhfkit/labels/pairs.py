"""Rankings -> preference pairs (preferred first), and an account of what was left out and why.

A ranking of K candidates yields up to C(K, 2) pairs. Left out: tied pairs (no preference),
rankings flagged unusable (no candidate acceptable), and pairs of identical texts at different
ranks (nothing to learn). Each labeler's ranking yields its own pairs: aggregating labelers is the
consensus's job (`rlhfkit.labels.consensus`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations

from rlhfkit.data.formats import (
    DEFAULT_STRENGTH,
    STRENGTH_MARGINS,
    Completions,
    Pair,
    Ranking,
    check_rankings,
    text_key,
)


def rankings_to_pairs(
    rankings: Sequence[Ranking], completions: Sequence[Completions], margin: bool = False
) -> list[Pair]:
    """Every candidate pair with different ranks, preferred first; ties and unusable dropped.

    Each labeler's ranking yields its own pairs (aggregating labelers is a separate step), so a
    pair two labelers agree on appears twice: that is the evidence, weighted as such. Each pair's
    `user` is its labeler: what a personalised reward model learns per user. Identical
    candidate texts at different ranks are skipped (the pair carries no learnable preference).
    `margin` gives every pair the labeler's stated strength as log-odds per rank between them
    (STRENGTH_MARGINS; a ranking without a strength counts as "better").
    """
    check_rankings(rankings, completions)
    by_id = {c.prompt_id: c for c in completions}
    pairs: list[Pair] = []
    for r in rankings:
        if r.unusable:
            continue
        c = by_id[r.prompt_id]
        for i, j in combinations(range(len(r.ranking)), 2):
            if r.ranking[i] == r.ranking[j]:
                continue
            win, lose = (i, j) if r.ranking[i] < r.ranking[j] else (j, i)
            if text_key(c.completions[win]) == text_key(c.completions[lose]):
                continue
            gap = abs(r.ranking[i] - r.ranking[j])
            m = round(STRENGTH_MARGINS[r.strength or DEFAULT_STRENGTH] * gap, 4) if margin else None
            pairs.append(
                Pair(prompt=c.prompt, chosen=c.completions[win], rejected=c.completions[lose], margin=m, user=r.labeler)
            )
    return pairs


def pairs_with_counts(rankings: Sequence[Ranking], completions: Sequence[Completions]) -> tuple[list[Pair], Counter]:
    """`rankings_to_pairs`, and how many rankings, pairs, and of what was dropped, each reason.

    Keys: rankings, rankings_unusable_skipped, tied_pairs_dropped, identical_text_pairs_skipped,
    pairs. Why count: a user must see when most of their labels became no training data.
    """
    pairs = rankings_to_pairs(rankings, completions)
    usable = [r for r in rankings if not r.unusable]
    ties = sum(a == b for r in usable for a, b in combinations(r.ranking, 2))
    compared = sum(len(r.ranking) * (len(r.ranking) - 1) // 2 for r in usable) - ties
    counts = Counter(rankings=len(rankings))
    counts["rankings_unusable_skipped"] += len(rankings) - len(usable)
    counts["tied_pairs_dropped"] += ties
    counts["identical_text_pairs_skipped"] += compared - len(pairs)
    counts["pairs"] = len(pairs)
    return pairs, counts
