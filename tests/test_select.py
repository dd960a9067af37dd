"""labels/select.py: which candidate sets go to labelers under a budget, on hand-made rewards."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from rlhfkit.errors import UserError
from rlhfkit.labels.select import (
    CandidateSet,
    disagreement_scores,
    select_prompts,
    sources_scorer,
    uncertainty_scores,
)

SETS = [CandidateSet(prompt_id=f"p{i}", prompt=f"prompt {i}", completions=["a", "b", "c"]) for i in range(4)]

# Two members' rewards for 3 candidates of each of 4 prompts.
ENSEMBLE = [
    np.array([[0.0, 2.0, 4.0], [0.0, 2.0, 4.0]]),  # p0: sure, every gap 2, members agree
    np.array([[0.0, 0.1, 3.0], [0.0, 0.1, 3.0]]),  # p1: a near-tie (gap 0.1) both members agree on
    np.array([[0.0, 1.0, 3.0], [0.0, -1.0, 3.0]]),  # p2: mean gap 0 between a and b, members opposed
    np.array([[0.0, 0.5, 5.0], [0.0, 0.7, 5.0]]),  # p3: gap 0.6, members close
]


def scorer(sets: Sequence[CandidateSet]) -> list[np.ndarray]:
    return [ENSEMBLE[int(s.prompt_id[1:])] for s in sets]


def test_uncertainty_is_the_smallest_mean_margin() -> None:
    assert uncertainty_scores(ENSEMBLE) == pytest.approx([2.0, 0.1, 0.0, 0.6])
    assert select_prompts(SETS, 2, "uncertainty", scorer) == [2, 1]
    assert select_prompts(SETS, 10, "uncertainty", scorer) == [2, 1, 3, 0]  # the budget caps, never pads
    # one reward model: plain (K,) rewards
    assert uncertainty_scores([np.array([1.0, 1.3, -2.0])]) == pytest.approx([0.3])


def test_disagreement_is_the_ensemble_variance_of_a_preference() -> None:
    scores = disagreement_scores(ENSEMBLE)
    sig = 1 / (1 + np.exp(-1.0))  # p2: σ(a - b) is σ(-1) for one member and σ(1) for the other
    assert scores[2] == pytest.approx(np.var([1 - sig, sig]))
    assert scores[0] == 0.0 and scores[1] == 0.0  # identical members: no disagreement, even on a near-tie
    assert 0 < scores[3] < scores[2]
    assert select_prompts(SETS, 2, "disagreement", scorer) == [2, 3]
    with pytest.raises(UserError, match="ensemble of 2 or more"):
        disagreement_scores([np.array([0.0, 1.0])])


def test_random_all_and_bad_input() -> None:
    picked = select_prompts(SETS, 3, "random", seed=1)
    assert len(set(picked)) == 3 and picked == select_prompts(SETS, 3, "random", seed=1)
    assert {tuple(select_prompts(SETS, 2, "random", seed=s)) for s in range(20)} != {tuple(picked[:2])}
    assert select_prompts(SETS, 1, "all") == [0, 1, 2, 3]
    assert select_prompts(SETS, 0, "uncertainty", scorer) == []
    with pytest.raises(UserError, match="needs a scorer"):
        select_prompts(SETS, 2, "uncertainty")
    with pytest.raises(UserError, match="expected one of"):
        select_prompts(SETS, 2, "margin")  # type: ignore[arg-type]
    # a set with a single candidate has nothing to compare: chosen last
    assert uncertainty_scores([np.array([1.0]), ENSEMBLE[0]]).tolist() == [np.inf, 2.0]


def test_reward_sources_as_ensemble_members() -> None:
    from rlhfkit.rewards.base import FunctionReward

    sets = [CandidateSet(prompt_id="a", prompt="q", completions=["x", "xxxx", "xx"]), SETS[0]]
    length = FunctionReward(lambda p, c: len(c))
    rewards = sources_scorer([length, FunctionReward(lambda p, c: -len(c))])(sets)
    assert [r.shape for r in rewards] == [(2, 3), (2, 3)]
    assert rewards[0].tolist() == [[1, 4, 2], [-1, -4, -2]]
    assert select_prompts(sets, 1, "uncertainty", sources_scorer([length])) == [1]  # "a", "b", "c": all tied


def test_a_head_ensemble_learns_the_preference_and_disagrees_off_its_data() -> None:
    from rlhfkit.rewards.ensemble import HeadEnsemble

    rng = np.random.default_rng(0)
    true_w = np.array([1.0, -2.0, 0.0, 0.0])
    x = rng.normal(size=(200, 4)) * np.array([1, 1, 0.01, 0.01])  # the pairs never vary dims 2 and 3
    y = rng.normal(size=(200, 4)) * np.array([1, 1, 0.01, 0.01])
    better = (x @ true_w) > (y @ true_w)
    chosen, rejected = np.where(better[:, None], x, y), np.where(better[:, None], y, x)
    ens = HeadEnsemble(members=4, seed=1).fit(chosen, rejected)
    test = rng.normal(size=(100, 4)) * np.array([1, 1, 0, 0])
    pred = ens.predict(test)
    assert pred.shape == (4, 100)
    assert np.corrcoef(pred.mean(0), test @ true_w)[0, 1] > 0.95
    seen, unseen = np.array([[1.0, 0, 0, 0]]), np.array([[0, 0, 1.0, 0]])  # along data vs. a direction never seen
    # Comparing f with -f: the members agree which is better along the data, not off it.
    along, off = (ens.predict(np.concatenate([f, -f])) for f in (seen, unseen))
    assert (np.sign(along[:, 0] - along[:, 1]) > 0).all()
    assert len(set(np.sign(off[:, 0] - off[:, 1]))) == 2
    assert disagreement_scores([off])[0] > 10 * disagreement_scores([along])[0]
    same = HeadEnsemble(members=2, bootstrap=False, seed=3).fit(chosen, rejected).predict(test)
    assert not np.allclose(same[0], same[1])  # different initialisations even without bootstrap
    assert disagreement_scores([pred[:, :3]])[0] >= 0
