"""How much labelers agree: the ceiling on what a reward model can learn from them.

- Percent pairwise agreement: for every two labelers of an item and every two candidates, do
  they order the candidates the same way? "With ties" compares {better, tie, worse}; "strict"
  only counts candidate pairs both labelers ordered, and asks if the direction matches.
- Krippendorff's alpha: 1 - observed/expected disagreement, chance-corrected and tolerant of
  missing values (not every labeler judges every item). Ordinal on the ranks (a unit is one
  candidate of one item), nominal on the pairwise preferences (a unit is a candidate pair).
  Implemented here from Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability";
  the `krippendorff` package is GPL, so it is not used.
- Kendall's W: per item, agreement of m labelers' full rankings (with the tie correction),
  averaged over items with at least two usable rankings.
- Per labeler: agreement with the consensus of the *other* labelers of the same items (leave
  one out, so a labeler's own ranking does not pull the consensus towards them).

Rankings flagged unusable carry no order and are left out of all of these.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata

from rlhfkit.data.formats import Ranking
from rlhfkit.labels.consensus import DEFAULT_ALPHA, bradley_terry, dense_ranks, group_by_item


def relation(ranks: Sequence[int], i: int, j: int) -> int:
    """+1: candidate i is preferred to j; -1: j to i; 0: tie."""
    return int(np.sign(ranks[j] - ranks[i]))


def pairwise_agreement(groups: Iterable[Sequence[Sequence[int]]]) -> dict[str, Any]:
    """Percent agreement over all (labeler pair x candidate pair) comparisons of each item."""
    agree = total = strict_agree = strict_total = 0
    for rankings in groups:
        for a, b in combinations(rankings, 2):
            for i, j in combinations(range(len(a)), 2):
                ra, rb = relation(a, i, j), relation(b, i, j)
                total += 1
                agree += ra == rb
                if ra and rb:
                    strict_total += 1
                    strict_agree += ra == rb
    return {
        "with_ties": agree / total if total else None,
        "strict": strict_agree / strict_total if strict_total else None,
        "comparisons": total,
        "strict_comparisons": strict_total,
    }


Level = Literal["nominal", "ordinal", "interval"]


def _distances(values: np.ndarray, n_c: np.ndarray, level: Level) -> np.ndarray:
    """Squared difference function delta^2(c, k) between the sorted distinct values."""
    if level == "nominal":
        return 1.0 - np.eye(len(values))
    if level == "interval":
        return (values[:, None] - values[None, :]) ** 2
    # ordinal: the distance between two ranks grows with how many values lie between them.
    cum = np.concatenate([[0.0], np.cumsum(n_c)])
    d = np.zeros((len(values), len(values)))
    for c in range(len(values)):
        for k in range(c + 1, len(values)):
            d[c, k] = d[k, c] = (cum[k + 1] - cum[c] - (n_c[c] + n_c[k]) / 2) ** 2
    return d


def krippendorff_alpha(units: Iterable[Sequence[float]], level: Level = "nominal") -> float | None:
    """Alpha from reliability data given per unit as the list of values its coders gave.

    Units with fewer than two values are not pairable and are skipped. None when there is no
    variation at all (expected disagreement 0: alpha is undefined).
    """
    pairable = [list(u) for u in units if len(u) >= 2]
    values = np.array(sorted({v for u in pairable for v in u}), dtype=float)
    index = {v: i for i, v in enumerate(values.tolist())}
    o = np.zeros((len(values), len(values)))  # the coincidence matrix
    for u in pairable:
        counts = Counter(index[float(v)] for v in u)
        for c, nc in counts.items():
            for k, nk in counts.items():
                o[c, k] += nc * (nk - (c == k)) / (len(u) - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n < 2:
        return None
    d = _distances(values, n_c, level)
    expected = (np.outer(n_c, n_c) * d).sum() / (n - 1)
    if expected == 0:
        return None
    return float(1.0 - (o * d).sum() / expected)


def kendalls_w(rankings: Sequence[Sequence[int]]) -> float | None:
    """Kendall's coefficient of concordance for m rankings of the same n candidates, ties
    corrected (mid-ranks, and sum(t^3 - t) over tie groups in the denominator)."""
    m, n = len(rankings), len(rankings[0]) if rankings else 0
    if m < 2 or n < 2:
        return None
    mid = np.array([rankdata(r) for r in rankings])
    totals = mid.sum(axis=0)
    s = ((totals - totals.mean()) ** 2).sum()
    ties = sum(t**3 - t for r in rankings for t in Counter(r).values())
    denom = m * m * (n**3 - n) - m * ties
    return float(12 * s / denom) if denom > 0 else None


def _usable_groups(rankings: Sequence[Ranking]) -> dict[str, list[Ranking]]:
    return {pid: [r for r in group if not r.unusable] for pid, group in group_by_item(rankings).items()}


def agreement_report(rankings: Sequence[Ranking], alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """All inter-labeler agreement figures for a set of judgments (one dict, JSON-ready)."""
    groups = _usable_groups(rankings)
    multi = {pid: [r.ranking for r in g] for pid, g in groups.items() if len(g) >= 2}
    ordinal_units = [[r[c] for r in rs] for rs in multi.values() for c in range(len(rs[0]))]
    pair_units = [
        [relation(r, i, j) for r in rs] for rs in multi.values() for i, j in combinations(range(len(rs[0])), 2)
    ]
    ws = [w for rs in multi.values() if (w := kendalls_w(rs)) is not None]
    pairwise = pairwise_agreement(multi.values())
    return {
        "judgments": len(rankings),
        "unusable": sum(r.unusable for r in rankings),
        "items_judged": len(groups),
        "items_with_2plus": len(multi),
        "pairwise_agreement": pairwise["with_ties"],
        "pairwise_agreement_strict": pairwise["strict"],
        "comparisons": pairwise["comparisons"],
        "krippendorff_alpha_ordinal": krippendorff_alpha(ordinal_units, "ordinal"),
        "krippendorff_alpha_nominal_pairs": krippendorff_alpha(pair_units, "nominal"),
        "kendalls_w_mean": float(np.mean(ws)) if ws else None,
        "labelers": labeler_agreement(rankings, alpha),
    }


def labeler_agreement(rankings: Sequence[Ranking], alpha: float = DEFAULT_ALPHA) -> dict[str, dict[str, Any]]:
    """Per labeler: pairwise agreement with the leave-one-out consensus of each of their items."""
    stats: dict[str, Counter[str]] = {}
    for group in _usable_groups(rankings).values():
        for r in group:
            others = [o.ranking for o in group if o is not r]
            st = stats.setdefault(r.labeler, Counter())
            st["items"] += 1
            if not others:
                continue
            st["items_compared"] += 1
            cons = dense_ranks(bradley_terry(len(r.ranking), others, alpha).tolist())
            for i, j in combinations(range(len(r.ranking)), 2):
                mine, theirs = relation(r.ranking, i, j), relation(cons, i, j)
                st["pairs"] += 1
                st["agree"] += mine == theirs
                if mine and theirs:
                    st["strict_pairs"] += 1
                    st["strict_agree"] += mine == theirs
    return {
        name: {
            "items_judged": st["items"],
            "items_compared": st["items_compared"],
            "agreement": st["agree"] / st["pairs"] if st["pairs"] else None,
            "agreement_strict": st["strict_agree"] / st["strict_pairs"] if st["strict_pairs"] else None,
        }
        for name, st in sorted(stats.items())
    }
