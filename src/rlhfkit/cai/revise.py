"""Phase 1 of Constitutional AI: respond, critique the response under a principle, revise; repeat.

Each round samples one principle for each prompt, asks the model for a critique of its current
response and then for a revision; the revision becomes the current response. A round restarts from
(prompt, current response) rather than growing one ever longer conversation, so prompts stay short.
An empty revision (a model that failed to answer) keeps the previous response.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from rlhfkit.cai.constitution import Constitution
from rlhfkit.cai.prompts import critique_messages, few_shot_messages, render, revision_messages
from rlhfkit.data.chat import render_prompt
from rlhfkit.data.formats import Demonstration, Pair, Text, text_key, text_to_json
from rlhfkit.models.sampling import SamplingConfig, check_length_budget, sample, truncation_warning


def generate(model: Any, tokenizer: Any, texts: list[str], sampling: SamplingConfig) -> list[str]:
    """One sampled continuation per rendered text (stripped, cut at a stop string); warns of cut prompts."""
    s = sample(model, tokenizer, texts, sampling, num_samples=1, desc="cai revise: sampling")
    if s.prompts_truncated:
        print(truncation_warning(s.prompts_truncated, len(texts), sampling))
    return s.texts


def critique_and_revise(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Text],
    constitution: Constitution,
    sampling: SamplingConfig,
    revisions: int = 1,
    few_shot: int = -1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One trace per prompt: `{prompt, initial, rounds: [{principle, critique, revision}], final}`."""
    check_length_budget(model.config, sampling)
    rng = random.Random(seed)
    shots = few_shot_messages(constitution, few_shot)
    initial = generate(
        model, tokenizer, [render_prompt(tokenizer, p, sampling.prompt_template) for p in prompts], sampling
    )
    current = list(initial)
    rounds: list[list[dict[str, str]]] = [[] for _ in prompts]
    for _ in range(revisions):
        principles = [constitution.sample(rng) for _ in prompts]
        critiques = generate(
            model,
            tokenizer,
            [
                render(tokenizer, critique_messages(p, r, c, shots))
                for p, r, c in zip(prompts, current, principles, strict=True)
            ],
            sampling,
        )
        revised = generate(
            model,
            tokenizer,
            [
                render(tokenizer, revision_messages(p, r, c, k, shots))
                for p, r, c, k in zip(prompts, current, principles, critiques, strict=True)
            ],
            sampling,
        )
        for i, (principle, critique, revision) in enumerate(zip(principles, critiques, revised, strict=True)):
            rounds[i].append({"principle": principle.name, "critique": critique, "revision": revision})
            if revision:
                current[i] = revision
    return [
        {"prompt": text_to_json(p), "initial": a, "rounds": r, "final": b}
        for p, a, r, b in zip(prompts, initial, rounds, current, strict=True)
    ]


def to_records(traces: Sequence[dict[str, Any]], prompts: Sequence[Text]) -> tuple[list[Demonstration], list[Pair]]:
    """SFT demonstrations {prompt, response: final} and pairs {chosen: final, rejected: initial}.

    A prompt whose final response is empty gives neither; one whose response never changed gives no pair.
    """
    demos: list[Demonstration] = []
    pairs: list[Pair] = []
    for trace, prompt in zip(traces, prompts, strict=True):
        final, initial = trace["final"], trace["initial"]
        if not final:
            continue
        demos.append(Demonstration(prompt=prompt, response=final))
        if text_key(final) != text_key(initial):
            pairs.append(Pair(prompt=prompt, chosen=final, rejected=initial))
    return demos, pairs
