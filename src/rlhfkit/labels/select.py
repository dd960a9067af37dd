"""Choosing what to send for labeling under a budget (issue 18): the prompts whose candidates the
current reward model(s) can tell apart least, instead of all of them or a random share.

A scorer gives, for each candidate set, the predicted rewards of its K candidates by each of M
ensemble members: an array (M, K); a single reward model is M = 1. From those:

- `uncertainty`: the smallest predicted |margin| between two of the set's candidates (members
  averaged first): a set where the model cannot order some pair is where a label moves it most;
- `disagreement`: the largest variance, over the members, of a pair's predicted preference
  σ(r_a − r_b) (needs M ≥ 2): the members were trained on different samples (bootstrap) or seeds,
  so where they disagree the model does not know (epistemic, Dwaracherla et al. 2024), whereas a
  small margin may only be a real near-tie;
- `random`: a uniform sample, the baseline any method must beat at the same budget;
- `all`: every set, the budget ignored (no selection).

The functions are pure (NumPy in, indexes out) and deterministic for a seed; ties keep the
candidate sets' order. They return indexes most informative first; sort them for import order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from rlhfkit.data.chat import plain_text
from rlhfkit.data.formats import Completions, Pair, Text
from rlhfkit.errors import UserError

if TYPE_CHECKING:
    from rlhfkit.rewards.base import RewardSource
    from rlhfkit.rewards.model import RewardModel

Method = Literal["all", "random", "uncertainty", "disagreement"]
METHODS: tuple[Method, ...] = ("all", "random", "uncertainty", "disagreement")


# One prompt and the K completions a labeler would rank: a `completions` record, as `generate` writes.
CandidateSet = Completions

# The candidate sets -> per set, an array (members, K) of predicted rewards.
Scorer = Callable[[Sequence[CandidateSet]], Sequence[np.ndarray]]


def _flat(sets: Sequence[CandidateSet]) -> tuple[list[Text], list[str]]:
    """(prompt, completion) of every candidate of every set, in order."""
    prompts = [s.prompt for s in sets for _ in s.completions]
    return prompts, [c if isinstance(c, str) else plain_text(c) for s in sets for c in s.completions]


def _per_set(sets: Sequence[CandidateSet], flat: np.ndarray) -> list[np.ndarray]:
    """(members, all candidates) -> per set, its (members, K) columns."""
    bounds = np.cumsum([0] + [len(s.completions) for s in sets])
    return [flat[:, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def sources_scorer(sources: Sequence[RewardSource]) -> Scorer:
    """A scorer from reward sources, one ensemble member each: `[rm]` for uncertainty with one
    reward model, several (e.g. reward models trained with different seeds) for disagreement."""

    def score(sets: Sequence[CandidateSet]) -> list[np.ndarray]:
        prompts, texts = _flat(sets)
        return _per_set(sets, np.stack([src.score(prompts, texts).float().cpu().numpy() for src in sources]))

    return score


def head_ensemble_scorer(rm: RewardModel, pairs: Sequence[Pair], members: int = 5, seed: int = 0) -> Scorer:
    """Disagreement's ensemble at almost no cost: `members` linear heads (`HeadEnsemble`) on what
    `rm`'s own score head reads (`RewardModel.features`), each fitted on its own bootstrap sample
    of `pairs` (the labels so far); where the labels leave the reward undetermined, they differ."""
    from rlhfkit.rewards.ensemble import HeadEnsemble

    if not pairs:
        raise UserError("select=disagreement: no labeled pairs yet to fit the ensemble on")
    prompts = [p.prompt for p in pairs]
    chosen = rm.features(prompts, [p.chosen for p in pairs]).numpy()
    ensemble = HeadEnsemble(members=members, seed=seed).fit(
        chosen, rm.features(prompts, [p.rejected for p in pairs]).numpy()
    )

    def score(sets: Sequence[CandidateSet]) -> list[np.ndarray]:
        return _per_set(sets, ensemble.predict(rm.features(*_flat(sets)).numpy()))

    return score


def _members(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim == 1:
        r = r[None, :]  # one reward model
    if r.ndim != 2:
        raise ValueError(f"rewards must be (members, K) or (K,), got shape {r.shape}")
    return r


def _pair_index(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(k, 1)


def uncertainty_scores(rewards: Sequence[np.ndarray]) -> np.ndarray:
    """Per set, the smallest |mean predicted margin| over its candidate pairs (smaller: less sure).
    A set with fewer than 2 candidates has nothing to compare: +inf (never chosen first)."""
    out = np.full(len(rewards), math.inf)
    for n, r in enumerate(rewards):
        mean = _members(r).mean(axis=0)
        a, b = _pair_index(len(mean))
        if len(a):
            out[n] = np.abs(mean[a] - mean[b]).min()
    return out


def disagreement_scores(rewards: Sequence[np.ndarray]) -> np.ndarray:
    """Per set, the largest variance over the ensemble members of a pair's predicted preference
    σ(r_a − r_b) (larger: the members disagree more). Sets with < 2 candidates: -inf."""
    out = np.full(len(rewards), -math.inf)
    for n, r in enumerate(rewards):
        m = _members(r)
        if m.shape[0] < 2:
            raise UserError("select=disagreement needs an ensemble of 2 or more reward models (or heads)")
        a, b = _pair_index(m.shape[1])
        if len(a):
            prefer = 1.0 / (1.0 + np.exp(-(m[:, a] - m[:, b])))  # (members, pairs)
            out[n] = prefer.var(axis=0).max()
    return out


def rank_by(scores: np.ndarray, budget: int, largest: bool) -> list[int]:
    """The `budget` indexes with the smallest (or largest) scores, best first; ties in index order."""
    keys = -scores if largest else scores
    order = np.argsort(keys, kind="stable")
    return [int(i) for i in order[: max(0, budget)]]


def select_prompts(
    candidates: Sequence[CandidateSet],
    budget: int,
    method: Method,
    scorer: Scorer | None = None,
    seed: int = 0,
) -> list[int]:
    """Indexes into `candidates` of the sets to send for labeling, most informative first: at most
    `budget` of them (every one for `all`). `scorer` is needed by uncertainty and disagreement."""
    if method not in METHODS:
        raise UserError(f"select={method!r}: expected one of {', '.join(METHODS)}")
    if budget < 0:
        raise UserError(f"select budget must be 0 or more, got {budget}")
    n = len(candidates)
    if method == "all":
        return list(range(n))
    if method == "random":
        return random.Random(seed).sample(range(n), min(budget, n))
    if scorer is None:
        raise UserError(f"select={method} needs a scorer (the reward model, or an ensemble of reward heads)")
    rewards = list(scorer(candidates))
    if len(rewards) != n:
        raise ValueError(f"the scorer gave {len(rewards)} reward arrays for {n} candidate sets")
    if method == "uncertainty":
        return rank_by(uncertainty_scores(rewards), budget, largest=False)
    return rank_by(disagreement_scores(rewards), budget, largest=True)
