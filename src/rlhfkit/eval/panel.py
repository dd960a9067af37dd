"""Simulated labelers: stand-ins for people, for the demo and the tests only (never the trainers).

Each labeler ranks candidates by the hidden gold utility plus its own Gaussian noise, calls two
candidates a tie when their noisy utilities are within `tie_margin`, and flags a set unusable when
every candidate is clearly bad. One careless labeler ranks at random. So the panel disagrees the
way real labelers do, and its agreement is a realistic ceiling for the reward model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rlhfkit.feedback.aggregate import dense_ranks
from rlhfkit.feedback.client import FeedbackClient


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


def judge(labeler: SimulatedLabeler, utilities: Sequence[float], rng: random.Random) -> tuple[list[int], bool]:
    """(ranking, unusable) for one set of candidates, as this labeler would give them."""
    if labeler.careless:
        return dense_ranks([rng.random() for _ in utilities], tol=0.0), False
    noisy = [u + rng.gauss(0.0, labeler.noise) for u in utilities]
    unusable = max(noisy) < labeler.unusable_below
    return dense_ranks(noisy, tol=labeler.tie_margin), unusable


def label_over_http(
    url: str,
    project_id: int,
    panel: list[SimulatedLabeler],
    password: str,
    utility: dict[tuple[str, str], float],
    seed: int = 0,
) -> dict[str, int]:
    """Every labeler logs in to the real server and ranks items until none is left for them.

    `utility[(prompt_id, candidate_text)]` is the hidden gold utility. The labelers work at the
    same time (one thread each), as people would; returns the number of judgments per labeler.
    """

    def work(i: int, labeler: SimulatedLabeler) -> int:
        rng = random.Random(seed * 1000 + i)
        done = 0
        with FeedbackClient.login(url, labeler.name, password) as client:
            while (item := client.next_item(project_id)) is not None:
                cands = item["candidates"]
                ranks, unusable = judge(labeler, [utility[(item["prompt_id"], c["text"])] for c in cands], rng)
                client.submit(
                    project_id,
                    item["item_id"],
                    {c["id"]: r for c, r in zip(cands, ranks, strict=True)},
                    unusable=unusable,
                )
                done += 1
        return done

    with ThreadPoolExecutor(len(panel)) as pool:
        counts = list(pool.map(work, range(len(panel)), panel))
    return {labeler.name: n for labeler, n in zip(panel, counts, strict=True)}
