"""Benchmark (not a test): does choosing what to label (labels/select.py) make a better reward model
than labeling a random share, at the same number of judgments? (issue 18, item 2)

    PYTHONPATH=src .venv/bin/python bench/active_selection.py            # 3 seeds, budget 100
    PYTHONPATH=src .venv/bin/python bench/active_selection.py --seeds 2 --budget 80 --out table.md

The task is the demo's: prompts from the embedded corpus, each with K = 4 candidate answers of the
corpus's kinds (half good, the rest rude / unhelpful / off-topic / repetitive), scored by the gold
judges (eval/gold.py: sentiment, toxicity, relevance, repetition). A pool of candidate sets may be
sent for labeling; held-out sets on other prompts give the gold pairs the reward model is scored on
(every candidate pair whose gold utilities differ by more than 0.05).

Labeling: the simulated panel (sim/panel.py, four careful labelers with noise and one careless one,
in turn) ranks each chosen set with `judge` directly, not over HTTP: the same labels the server
would store, without a server. A judgment = one ranking of a set's K candidates; its untied pairs
are the training pairs (a set flagged unusable gives none, but the judgment is spent).

The reward model: an ensemble of 5 linear Bradley-Terry heads (rewards/ensemble.py) on frozen
all-MiniLM-L6-v2 features of (prompt, response): the response embedding and its elementwise product
with the prompt's (so relevance, one gold component, is within a linear head's reach: this is a
cheap RM, not the demo's GPT-2 one). Its accuracy is the ensemble mean's, on the held-out gold pairs.

Active learning: `--start` random judgments, then rounds of `--round` judgments chosen by the method
from the rest of the pool with the ensemble fitted on everything labeled so far, until `--budget`.
Every method starts from the same random judgments and labelers' noise (same seed), so the
comparison is paired. The confidence interval of a difference resamples the held-out sets (within
each seed, 2,000 times) and averages over seeds: it covers which held-out pairs were drawn, not the
training randomness, which the per-seed rows show.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhfkit.config import atomic_write_text
from rlhfkit.data.corpus import KINDS, RESPONDERS, all_prompts, decorate
from rlhfkit.eval.gold import GoldJudge, MiniLM
from rlhfkit.labels.select import CandidateSet, Method, select_prompts
from rlhfkit.rewards.ensemble import HeadEnsemble
from rlhfkit.sim.panel import default_panel, judge

K = 4
GOLD_TIE = 0.05  # held-out pairs closer than this in gold utility are left out (neither order is wrong)
METHODS: tuple[Method, ...] = ("random", "uncertainty", "disagreement")


@dataclass
class World:
    """One seed's candidate sets: gold utilities and features per candidate, (n_sets, K[, dim])."""

    sets: list[CandidateSet]
    utility: np.ndarray
    features: np.ndarray


def candidate_sets(rng: random.Random, prompts: list, n: int, tag: str) -> list[CandidateSet]:
    kinds_weights = [0.5] + [0.5 / (len(KINDS) - 1)] * (len(KINDS) - 1)
    out = []
    for i in range(n):
        prompt = decorate(rng, rng.choice(prompts))
        kinds = rng.choices(KINDS, weights=kinds_weights, k=K)
        texts = [RESPONDERS[kind](rng, prompt) for kind in kinds]
        out.append(CandidateSet(prompt_id=f"{tag}{i}", prompt=prompt.text, completions=texts))
    return out


class CachedEmbeddings:
    """The gold judge's MiniLM, each text embedded once: the features reuse the gold's embeddings
    (the bench's cost is embedding, on a shared 2-core machine)."""

    def __init__(self, minilm: MiniLM):
        self.minilm = minilm
        self.seen: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        new = list(dict.fromkeys(t for t in texts if t not in self.seen))
        if new:
            self.seen.update(zip(new, self.minilm.embed(new), strict=True))
        return torch.stack([self.seen[t] for t in texts]) if texts else torch.zeros(0, 384)


def build_world(sets: list[CandidateSet], gold: GoldJudge) -> World:
    prompts = [s.prompt for s in sets for _ in s.completions]
    texts = [c for s in sets for c in s.completions]
    utility = gold.score(prompts, texts).numpy().reshape(len(sets), K)
    p_emb = gold.minilm.embed([s.prompt for s in sets]).numpy()
    r_emb = gold.minilm.embed([t.strip() or "." for t in texts]).numpy().reshape(len(sets), K, -1)
    features = np.concatenate([r_emb, p_emb[:, None, :] * r_emb], axis=-1)
    return World(sets, utility, features)


def label(world: World, index: int, turn: int, seed: int) -> list[tuple[int, int, int]]:
    """The panel's next labeler ranks set `index`: its untied pairs as (set, preferred, other)."""
    panel = default_panel()
    labeler = panel[turn % len(panel)]
    rng = random.Random(f"{seed}/{labeler.name}/{world.sets[index].prompt_id}")
    ranks, unusable = judge(labeler, list(world.utility[index]), rng)
    if unusable:
        return []
    return [
        (index, a, b) if ranks[a] < ranks[b] else (index, b, a)
        for a in range(K)
        for b in range(a + 1, K)
        if ranks[a] != ranks[b]
    ]


def fit(world: World, pairs: list[tuple[int, int, int]], seed: int) -> HeadEnsemble:
    idx = np.array(pairs)
    chosen = world.features[idx[:, 0], idx[:, 1]]
    rejected = world.features[idx[:, 0], idx[:, 2]]
    return HeadEnsemble(members=5, seed=seed).fit(chosen, rejected)


def scorer_of(world: World, ens: HeadEnsemble, index_of: dict[str, int]):  # type: ignore[no-untyped-def]
    def score(sets):  # type: ignore[no-untyped-def]
        rows = [index_of[s.prompt_id] for s in sets]
        dim = world.features.shape[-1]
        flat = ens.predict(world.features[rows].reshape(-1, dim))  # (members, n*K)
        return list(flat.reshape(flat.shape[0], len(rows), K).transpose(1, 0, 2))

    return score


def gold_pairs(world: World) -> list[tuple[int, int, int]]:
    u = world.utility
    return [
        (i, a, b) if u[i, a] > u[i, b] else (i, b, a)
        for i in range(len(world.sets))
        for a in range(K)
        for b in range(a + 1, K)
        if abs(u[i, a] - u[i, b]) > GOLD_TIE
    ]


def correct(world: World, ens: HeadEnsemble, pairs: list[tuple[int, int, int]]) -> np.ndarray:
    """Per held-out gold pair, 1 where the ensemble's mean reward orders it like the gold."""
    idx = np.array(pairs)
    dim = world.features.shape[-1]
    mean = ens.predict(world.features.reshape(-1, dim)).mean(0).reshape(len(world.sets), K)
    return (mean[idx[:, 0], idx[:, 1]] > mean[idx[:, 0], idx[:, 2]]).astype(float)


def run_method(
    pool: World, held: World, held_pairs: list, method: Method, args: argparse.Namespace, seed: int
) -> tuple[dict[int, float], np.ndarray]:
    """Accuracy after each round (by judgments spent) and the final per-pair correctness."""
    index_of = {s.prompt_id: i for i, s in enumerate(pool.sets)}
    order = random.Random(seed).sample(range(len(pool.sets)), len(pool.sets))
    chosen = order[: args.start]  # the same random start for every method
    pairs = [p for turn, i in enumerate(chosen) for p in label(pool, i, turn, seed)]
    curve = {}
    while True:
        ens = fit(pool, pairs, seed)
        hits = correct(held, ens, held_pairs)
        curve[len(chosen)] = float(hits.mean())
        if len(chosen) >= args.budget:
            return curve, hits
        rest = [i for i in range(len(pool.sets)) if i not in set(chosen)]
        budget = min(args.round, args.budget - len(chosen))
        picked = select_prompts(
            [pool.sets[i] for i in rest], budget, method, scorer_of(pool, ens, index_of), seed=seed + len(chosen)
        )
        for i in picked:
            pairs += label(pool, rest[i], len(chosen), seed)
            chosen.append(rest[i])


def bootstrap_diff(
    hits: dict[int, dict[str, np.ndarray]], held: dict[int, list], a: str, b: str, n: int = 2000
) -> tuple[float, float, float]:
    """Mean over seeds of acc(a) − acc(b), and its 95% interval resampling held-out sets per seed."""
    rng = np.random.default_rng(0)
    point = statistics.mean(float(hits[s][a].mean() - hits[s][b].mean()) for s in hits)
    reps = np.zeros(n)
    for s in hits:
        set_of = np.array([p[0] for p in held[s]])
        sets = np.unique(set_of)
        members = [np.flatnonzero(set_of == x) for x in sets]
        diff = hits[s][a] - hits[s][b]
        for r in range(n):
            rows = np.concatenate([members[j] for j in rng.integers(len(sets), size=len(sets))])
            reps[r] += diff[rows].mean() / len(hits)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return point, float(lo), float(hi)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pool", type=int, default=250, help="candidate sets that may be sent for labeling")
    p.add_argument("--heldout", type=int, default=100, help="held-out candidate sets (other prompts)")
    p.add_argument("--start", type=int, default=20, help="random judgments before the first selection")
    p.add_argument("--round", type=int, default=20, help="judgments chosen per round")
    p.add_argument("--budget", type=int, default=100, help="judgments in all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench/active_selection.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    gold = GoldJudge()
    gold.minilm = CachedEmbeddings(gold.minilm)  # type: ignore[assignment]
    prompts = list(all_prompts())
    curves: dict[int, dict[str, dict[int, float]]] = {}
    hits: dict[int, dict[str, np.ndarray]] = {}
    held_pairs: dict[int, list] = {}
    ceiling: dict[int, float] = {}
    for seed in range(args.seeds):
        rng = random.Random(seed)
        shuffled = rng.sample(prompts, len(prompts))
        half = len(shuffled) // 2  # the held-out sets ask other prompts than the pool's
        pool = build_world(candidate_sets(rng, shuffled[:half], args.pool, "pool"), gold)
        held = build_world(candidate_sets(rng, shuffled[half:], args.heldout, "held"), gold)
        held_pairs[seed] = gold_pairs(held)
        curves[seed], hits[seed] = {}, {}
        for method in METHODS:
            curves[seed][method], hits[seed][method] = run_method(pool, held, held_pairs[seed], method, args, seed)
        everything = [p for turn in range(len(pool.sets)) for p in label(pool, turn, turn, seed)]
        ceiling[seed] = float(correct(held, fit(pool, everything, seed), held_pairs[seed]).mean())
        per_method = ", ".join(f"{m} {curves[seed][m]}" for m in METHODS)
        print(f"seed {seed}: {time.time() - started:.0f} s; accuracy by judgments: {per_method}", file=sys.stderr)

    budgets = sorted(curves[0]["random"])
    lines = [
        f"Held-out gold-pair accuracy of the reward model (5 linear BT heads on MiniLM features) by judgments "
        f"spent, mean over {args.seeds} seeds (per seed in brackets); pool {args.pool} sets of K={K}, "
        f"{args.start} random judgments then rounds of {args.round}; {len(held_pairs[0])} held-out gold pairs "
        f"(seed 0) on {args.heldout} sets of other prompts.",
        "",
        "| judgments | " + " | ".join(METHODS) + " |",
        "|---:|" + "---:|" * len(METHODS),
    ]
    for n in budgets:
        cells = []
        for m in METHODS:
            per = [curves[s][m][n] for s in curves]
            cells.append(f"{statistics.mean(per):.3f} ({', '.join(f'{x:.3f}' for x in per)})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    per = list(ceiling.values())
    lines += [
        "",
        f"All {args.pool} pool sets labeled (ceiling of this RM): {statistics.mean(per):.3f} "
        f"({', '.join(f'{x:.3f}' for x in per)}).",
        "",
        f"At {args.budget} judgments, difference to random (95% bootstrap CI over held-out sets, mean of seeds):",
        "",
    ]
    for m in METHODS[1:]:
        point, lo, hi = bootstrap_diff(hits, held_pairs, m, "random")
        lines.append(f"- {m} − random: {point:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    lines += ["", f"({time.time() - started:.0f} s, {args.threads} threads)"]
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(Path(args.out), table)


if __name__ == "__main__":
    main()
