"""Agreement metrics and consensus, checked against published and hand-computed values."""

from __future__ import annotations

import math

import choix
import numpy as np
import pytest

from rlhfkit.data.formats import Completions, Ranking
from rlhfkit.labels.agreement import (
    agreement_report,
    kendalls_w,
    krippendorff_alpha,
    labeler_agreement,
    pairwise_agreement,
)
from rlhfkit.labels.consensus import (
    bradley_terry,
    consensus,
    consensus_pairs,
    dense_ranks,
    kto_records,
    pairwise_outcomes,
)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 coders, 12 units,
# missing values as None. The paper gives alpha = 0.743 (nominal), 0.815 (ordinal), 0.849 (interval).
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def _units(matrix: list[list[int | None]]) -> list[list[int]]:
    return [[row[u] for row in matrix if row[u] is not None] for u in range(len(matrix[0]))]


@pytest.mark.parametrize("level,expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_matches_the_published_example(level: str, expected: float) -> None:
    assert krippendorff_alpha(_units(KRIPPENDORFF_2011), level) == pytest.approx(expected, abs=5e-4)


def test_krippendorff_alpha_hand_computed() -> None:
    # Two coders, units (1,1) (2,2) (1,2): coincidences o11=2, o22=2, o12=o21=1; n=6, n1=n2=3.
    # Nominal: D_o = 2/6, D_e = 2*3*3/(6*5) = 0.6  =>  alpha = 1 - (1/3)/0.6 = 4/9.
    assert krippendorff_alpha([[1, 1], [2, 2], [1, 2]], "nominal") == pytest.approx(4 / 9)
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "ordinal") == pytest.approx(1.0)
    assert krippendorff_alpha([[1, 1], [1, 1]], "nominal") is None  # no variation: undefined
    assert krippendorff_alpha([[1], [2]], "nominal") is None  # nothing pairable


def test_kendalls_w_hand_computed() -> None:
    # R = (2, 5, 5), mean 4, S = 6; W = 12*6 / (2^2 * (27 - 3)) = 0.75
    assert kendalls_w([[1, 2, 3], [1, 3, 2]]) == pytest.approx(0.75)
    # Ties: mid-ranks (1.5, 1.5, 3) and (1, 2, 3): R = (2.5, 3.5, 6), S = 6.5, T = 2^3 - 2 = 6
    # W = 12 * 6.5 / (4 * 24 - 2 * 6) = 78 / 84
    assert kendalls_w([[1, 1, 2], [1, 2, 3]]) == pytest.approx(78 / 84)
    assert kendalls_w([[1, 2, 3]] * 4) == pytest.approx(1.0)
    assert kendalls_w([[1, 2], [2, 1]]) == pytest.approx(0.0)
    assert kendalls_w([[1, 2, 3]]) is None


def test_pairwise_agreement_with_and_without_ties() -> None:
    # Candidate pairs (0,1) (0,2) (1,2). a: 0>1, 0>2, 1>2.  b: 0=1, 0>2, 1>2.
    out = pairwise_agreement([[[1, 2, 3], [1, 1, 2]]])
    assert out["with_ties"] == pytest.approx(2 / 3)
    assert out["strict"] == pytest.approx(1.0)  # the tie is left out of the strict figure
    assert out["comparisons"] == 3 and out["strict_comparisons"] == 2
    reversed_ = pairwise_agreement([[[1, 2], [2, 1]]])
    assert reversed_["with_ties"] == 0.0 and reversed_["strict"] == 0.0


def test_bradley_terry_ties_are_half_wins_and_match_choix() -> None:
    assert sorted(pairwise_outcomes([[1, 1]])) == [(0, 1), (1, 0)]
    assert pairwise_outcomes([[2, 1]]) == [(1, 0), (1, 0)]
    rankings = [[1, 2, 3], [1, 3, 2], [2, 1, 3], [1, 2, 3]]
    scores = bradley_terry(3, rankings, alpha=0.1)
    assert scores.sum() == pytest.approx(0.0, abs=1e-9)
    assert list(np.argsort(-scores)) == [0, 1, 2]
    # Oracle: choix's own penalised ML on the same outcomes, each strict win entered once, with
    # half the prior (our doubled data has twice the likelihood) must give the same strengths.
    once = [(w, lose) for r in rankings for (w, lose) in pairwise_outcomes([r])[::2]]
    oracle = choix.opt_pairwise(3, once, alpha=0.05)
    assert scores == pytest.approx(oracle - oracle.mean(), abs=1e-3)


def test_consensus_ranks_pairs_and_kto() -> None:
    completions = [
        Completions(prompt_id="q", prompt="Q?", completions=["good", "fine", "bad"]),
        Completions(prompt_id="r", prompt="R?", completions=["x", "y"]),
    ]
    rankings = [
        Ranking(prompt_id="q", labeler="a", ranking=[1, 2, 3]),
        Ranking(prompt_id="q", labeler="b", ranking=[1, 1, 2]),
        Ranking(prompt_id="r", labeler="a", ranking=[1, 1], unusable=True),
        Ranking(prompt_id="r", labeler="b", ranking=[1, 2], unusable=True),
    ]
    cons = consensus(rankings)
    assert cons["q"].ranking == [1, 2, 3] and cons["q"].n_judgments == 2
    assert cons["r"].unusable and cons["r"].ranking == [1, 1]
    pairs = consensus_pairs(cons, completions, margin=True)
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "fine"), ("good", "bad"), ("fine", "bad")]
    assert all(p.margin is not None and p.margin > 0 for p in pairs)
    # A margin is a log-odds difference: the biggest gap is between the best and the worst.
    assert pairs[1].margin == pytest.approx(pairs[0].margin + pairs[2].margin, abs=1e-3)
    assert consensus_pairs(cons, completions)[0].margin is None
    kto = {(r["prompt"], r["completion"]): r["label"] for r in kto_records(cons, completions)}
    assert kto[("Q?", "good")] is True and kto[("Q?", "bad")] is False
    assert kto[("R?", "x")] is False and kto[("R?", "y")] is False  # flagged all bad by most labelers


def test_dense_ranks_with_ties() -> None:
    assert dense_ranks([0.5, 2.0, 0.5, -1.0]) == [2, 1, 2, 3]


def test_labeler_agreement_is_leave_one_out() -> None:
    rankings = [
        Ranking(prompt_id=f"q{i}", labeler=name, ranking=r)
        for i in range(3)
        for name, r in [("a", [1, 2, 3]), ("b", [1, 2, 3]), ("c", [1, 2, 3]), ("contrarian", [3, 2, 1])]
    ]
    per = labeler_agreement(rankings)
    # a's consensus comes from b, c and the contrarian (2 to 1): a agrees fully; the contrarian is
    # compared only with the other three and agrees on nothing. Including one's own ranking in the
    # consensus would have flattered the contrarian.
    assert per["a"]["agreement"] == 1.0
    assert per["contrarian"]["agreement"] == 0.0 and per["contrarian"]["agreement_strict"] == 0.0
    assert per["a"]["items_judged"] == 3 and per["a"]["items_compared"] == 3


def test_agreement_report_skips_flagged_rankings() -> None:
    rankings = [
        Ranking(prompt_id="q", labeler="a", ranking=[1, 2, 3]),
        Ranking(prompt_id="q", labeler="b", ranking=[1, 2, 3]),
        Ranking(prompt_id="q", labeler="c", ranking=[3, 2, 1], unusable=True),
        Ranking(prompt_id="solo", labeler="a", ranking=[1, 2]),
    ]
    report = agreement_report(rankings)
    assert report["judgments"] == 4 and report["unusable"] == 1
    assert report["items_judged"] == 2 and report["items_with_2plus"] == 1
    assert report["pairwise_agreement"] == 1.0 and report["krippendorff_alpha_ordinal"] == pytest.approx(1.0)
    assert report["kendalls_w_mean"] == pytest.approx(1.0)
    empty = agreement_report([])
    assert empty["pairwise_agreement"] is None and empty["krippendorff_alpha_ordinal"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in empty.values())
