"""Simulated labelers: stand-ins for people, for the demo and the tests only (never the trainers).

Each labeler ranks candidates by the hidden gold utility plus its own Gaussian noise, calls two
candidates a tie when their noisy utilities are within `tie_margin`, and flags a set unusable when
every candidate is clearly bad. One careless labeler ranks at random. So the panel disagrees the
way real labelers do, and its agreement is a realistic ceiling for the reward model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SimulatedLabeler:
    name: str
    noise: float  # std of the Gaussian added to each candidate's utility
    careless: bool = False  # ranks at random
    tie_margin: float = 0.1
    unusable_below: float = -3.0  # flag the set when every candidate's utility is below this


def default_panel() -> list[SimulatedLabeler]:
    return [
        SimulatedLabeler("alice", noise=0.25),
        SimulatedLabeler("bob", noise=0.4),
        SimulatedLabeler("carol", noise=0.6),
        SimulatedLabeler("dave", noise=0.8),
        SimulatedLabeler("erin", noise=0.0, careless=True),
    ]


def dense_ranks(values: Sequence[float], tie_margin: float) -> list[int]:
    """Rank 1 = highest value; a value within `tie_margin` of the previous one shares its rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0] * len(values)
    rank, prev = 0, None
    for i in order:
        if prev is None or prev - values[i] > tie_margin:
            rank += 1
        ranks[i] = rank
        prev = values[i]
    return ranks


def judge(labeler: SimulatedLabeler, utilities: Sequence[float], rng: random.Random) -> tuple[list[int], bool]:
    """(ranking, unusable) for one set of candidates, as this labeler would give them."""
    if labeler.careless:
        return dense_ranks([rng.random() for _ in utilities], 0.0), False
    noisy = [u + rng.gauss(0.0, labeler.noise) for u in utilities]
    unusable = max(noisy) < labeler.unusable_below
    return dense_ranks(noisy, labeler.tie_margin), unusable
