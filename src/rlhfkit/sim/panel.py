"""Simulated labelers: stand-ins for people, for the demo and the tests only (never the trainers).

Each labeler ranks candidates by the hidden gold utility plus its own Gaussian noise, calls two
candidates a tie when their noisy utilities are within `tie_margin`, and flags a set unusable when
every candidate is clearly bad. One careless labeler ranks at random. So the panel disagrees the
way real labelers do, and its agreement is a realistic ceiling for the reward model.

A labeler may have a taste of their own (`length_taste`: longer or shorter answers), added to
the gold utility (`eval.gold.taste_utility`): two groups with opposite tastes are what a
personalised reward model can learn apart and a pooled one cannot (`rlhfkit demo-personal`).

The noise levels are calibrated so that two careful labelers agree on about 70% of the pairs they
both order (on the demo's candidates), like InstructGPT's labelers (72.6% ± 1.5%, Ouyang et al.
2022); the careless one pulls the panel's agreement below that.

Labeling is deterministic: a labeler's noise on an item depends only on (seed, labeler, prompt,
candidate texts), and the labelers take turns (round-robin), so the same seed gives the same
labels however fast the server answers. (Concurrent labelers are exercised by the feedback server's own tests and
`bench/feedback_load.py`.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from rlhfkit.data.formats import Completions
from rlhfkit.eval.gold import taste_utility
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.labels.consensus import dense_ranks
from rlhfkit.models.device import Device


@dataclass(frozen=True)
class SimulatedLabeler:
    name: str
    noise: float  # std of the Gaussian added to each candidate's utility
    careless: bool = False  # ranks at random
    tie_margin: float = 0.1
    unusable_below: float = -3.0  # flag the set when every candidate's utility is below this
    length_taste: float = 0.0  # > 0 likes longer answers, < 0 shorter ones (eval.gold.taste_utility)


def default_panel() -> list[SimulatedLabeler]:
    return [
        SimulatedLabeler("alice", noise=0.15),
        SimulatedLabeler("bob", noise=0.2),
        SimulatedLabeler("carol", noise=0.3),
        SimulatedLabeler("dave", noise=0.4),
        SimulatedLabeler("erin", noise=0.0, careless=True),
    ]


def judge(labeler: SimulatedLabeler, utilities: Sequence[float], rng: random.Random) -> tuple[list[int], bool]:
    """(ranking, unusable) for one set of candidates, as this labeler would give them."""
    if labeler.careless:
        return dense_ranks([rng.random() for _ in utilities], tol=0.0), False
    noisy = [u + rng.gauss(0.0, labeler.noise) for u in utilities]
    unusable = max(noisy) < labeler.unusable_below
    return dense_ranks(noisy, tol=labeler.tie_margin), unusable


def gold_utility(records: list[Completions], device: Device = "auto") -> dict[tuple[str, str], float]:
    """The hidden gold utility of every candidate, `(prompt_id, text) -> utility`: what the simulated
    panel ranks by (never shown to training); the judge runs on `device`."""
    from rlhfkit.eval.gold import GoldJudge
    from rlhfkit.models.device import resolve_device

    flat = [(r.prompt_id, r.prompt, c) for r in records for c in r.completions]
    print(f"gold utility of {len(flat)} candidates (hidden from training)")
    scores = GoldJudge(device=resolve_device(device)).score([p for _, p, _ in flat], [c for _, _, c in flat]).tolist()
    return {(pid, c): s for (pid, _, c), s in zip(flat, scores, strict=True)}


def label_over_http(
    url: str,
    project_id: int,
    panel: list[SimulatedLabeler],
    password: str,
    utility: dict[tuple[str, str], float],
    seed: int = 0,
) -> dict[str, int]:
    """Every labeler logs in to the real server; they take turns ranking the next item the server
    gives them until none is left. Returns the number of judgments per labeler.

    `utility[(prompt_id, candidate_text)]` is the hidden gold utility.
    """
    counts = {labeler.name: 0 for labeler in panel}
    with ExitStack() as stack:
        clients = {lab.name: stack.enter_context(FeedbackClient.login(url, lab.name, password)) for lab in panel}
        active = list(panel)
        while active:
            for labeler in list(active):
                client = clients[labeler.name]
                item = client.next_item(project_id)
                if item is None:
                    active.remove(labeler)
                    continue
                # the server shows candidates in a per-labeler random order (against position bias)
                cands = sorted(item["candidates"], key=lambda c: (c["text"], c["id"]))
                rng = random.Random(f"{seed}/{labeler.name}/{item['prompt_id']}")
                gold = [utility[(item["prompt_id"], c["text"])] for c in cands]
                own = [taste_utility(u, c["text"], labeler.length_taste) for u, c in zip(gold, cands, strict=True)]
                ranks, unusable = judge(labeler, own, rng)
                client.submit(
                    project_id,
                    item["item_id"],
                    {c["id"]: r for c, r in zip(cands, ranks, strict=True)},
                    unusable=unusable,
                )
                counts[labeler.name] += 1
    return counts
