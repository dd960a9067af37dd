"""`rlhfkit demo-personal`: personalisation end to end, offline, in one run folder.

    data → pretrain → sft → generate (the start of `rlhfkit demo`) → feedback: simulated users in
    groups with opposite tastes rank over HTTP, each by the gold utility plus their group's taste
    for answer length → their own pairs (the server's `labeler_pairs` export) → one personalised
    reward model (its pooled output is the pooled reward model) → PPO twice: pooled (from the SFT
    model; plain prompts, pooled reward), then personalised (from the pooled policy; each prompt
    asked by one of the users, scored as theirs) → eval on held-out prompts → per group,
    report.html and results.json

Per group the report compares, on that group's utility (gold + its length taste,
`eval.gold.taste_utility`), the personalised policy asked as a user of the group with the pooled
policy, prompt by prompt (win rate, mean difference, bootstrap 95% CI); and the reward model's
held-out accuracy on the group's pairs as each user's and pooled. Stages are skipped when done,
like `rlhfkit demo`; every setting is an override (`groups`, `noise`, `ppo.stop.max_steps=...`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.formats import PromptRecord, read_records, write_jsonl, write_records
from rlhfkit.eval.gold import taste_utility
from rlhfkit.rewards.build import RewardConfig, RewardSpec
from rlhfkit.sim.run_folder import RunFolder
from rlhfkit.stages import demo
from rlhfkit.stages import eval as eval_stage
from rlhfkit.stages import ppo as ppo_stage
from rlhfkit.stages import rm as rm_stage


class Group(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="also the eval model name of its policy")
    users: list[str] = Field(min_length=1, description="the simulated users (labelers) of the group")
    length_taste: float = Field(description="> 0: likes longer answers, < 0: shorter (eval.gold.taste_utility)")


class Config(demo.Config):
    output_dir: str = "runs/demo-personal"
    # Opposite tastes of equal strength: pooled, they cancel; a length taste of 1.5 outweighs most
    # differences in tone between candidates, as a real preference for brevity would.
    groups: list[Group] = [
        Group(name="concise", users=["cara", "cole"], length_taste=-1.5),
        Group(name="detailed", users=["dana", "drew"], length_taste=1.5),
    ]
    noise: float = Field(0.2, ge=0, description="std of each labeler's noise on their utility (sim.panel)")
    # Every user ranks every item: a personalised model needs each user's own judgments.
    feedback: demo.FeedbackConfig = demo.FeedbackConfig(overlap=4, label_prompts=200)
    rm: rm_stage.Config = demo.Config().rm.model_copy(update={"personalize": True})
    # 30 steps: the personalised policy has to learn answers that depend on who asks.
    ppo: ppo_stage.Config = demo.Config().ppo.model_copy(
        update={"stop": ppo_stage.StopConfig(max_steps=30, kl_ceiling=30.0)}
    )
    eval: eval_stage.Config = demo.Config().eval.model_copy(update={"limit": 100, "samples_per_prompt": 2})
    # The personalised policy adapts the pooled one rather than starting over from the SFT model:
    # the pooled policy already has what every user agrees on (the pooled reward), and PPO's KL to
    # its starting point keeps that while each user's difference is learned. From the SFT model, the
    # users' length heads (4x the pooled reward's spread) drown the pooled signal, and the concise
    # group lost to the pooled policy (README, *Measured numbers*; docs/personalization.md).
    personal_start: Literal["pooled", "sft"] = Field(
        "pooled", description="the personalised PPO run's start and KL reference: the pooled policy or the SFT model"
    )
    # The reward model normalises its pooled output only (mean 0, std 1 on the SFT model's samples);
    # a user's reward adds their head, whose spread is their own (on the demo's SFT samples 4x the
    # pooled one's), so the same ppo.kl.beta would hold the personalised run far more loosely.
    personal_normalize_rewards: bool = Field(
        True, description="normalise the personalised run's scores on its first rollout (ppo.ppo.normalize_rewards)"
    )

    @model_validator(mode="after")
    def _groups(self) -> Config:
        users = [u for g in self.groups for u in g.users]
        if len(self.groups) < 2 or len(set(users)) != len(users):
            raise ValueError("groups: at least two groups, and every user in exactly one")
        if self.feedback.overlap > len(users):
            raise ValueError(f"feedback.overlap {self.feedback.overlap} > the {len(users)} users")
        if "pooled" in {g.name for g in self.groups}:
            raise ValueError("groups: 'pooled' names the pooled policy; call the group something else")
        return self


def personal_prompts(source: Path, users: list[str], out: Path) -> Path:
    """The prompts file with every prompt asked by one of `users` in turn (the PPO prompts)."""
    records = read_records(source, "prompts")
    return write_records(
        out, [PromptRecord(id=r.id, prompt=r.prompt, user=users[i % len(users)]) for i, r in enumerate(records)]
    )


def export_labeler_pairs(db_url: str, out: Path) -> Path:
    """Each labeler's own pairs, as the server exports them (`labeler_pairs`: the user is the labeler)."""
    from rlhfkit.feedback import service
    from rlhfkit.feedback.db import Database

    db = Database(db_url)
    try:
        with db.session() as s:
            rows = service.export(s, service.find_project(s, "demo"), "labeler_pairs")
    finally:
        db.dispose()
    return write_jsonl(out, rows)


def group_results(cfg: Config, rm_results: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group: reward-model accuracy on its users' held-out pairs (as theirs and pooled), and its
    policy vs the pooled one on the group's utility (per prompt, samples averaged)."""
    out: dict[str, Any] = {}
    for g in cfg.groups:
        users = {u: rm_results["users"][u] for u in g.users if u in rm_results["users"]}
        n = sum(u["pairs"] for u in users.values())
        rm_acc = {
            "pairs": n,
            "personalised_accuracy": sum(u["accuracy"] * u["pairs"] for u in users.values()) / max(n, 1),
            "pooled_accuracy": sum(u["pooled_accuracy"] * u["pairs"] for u in users.values()) / max(n, 1),
        }
        per_prompt: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        words: dict[str, list[int]] = defaultdict(list)
        for row in samples:
            for model in ("pooled", g.name):
                answer = row[model]
                utility = taste_utility(answer["gold"], answer["response"], g.length_taste)
                per_prompt[row["prompt_id"]][model].append(utility)
                words[model].append(len(answer["response"].split()))
        pooled = np.array([np.mean(p["pooled"]) for p in per_prompt.values()])
        personal = np.array([np.mean(p[g.name]) for p in per_prompt.values()])
        comparison = eval_stage.paired_comparison(pooled, personal, cfg.eval.bootstrap, cfg.seed)
        out[g.name] = {
            "users": g.users,
            "asked_as": g.users[0],
            "length_taste": g.length_taste,
            "reward_model": rm_acc,
            "utility": {"pooled": float(pooled.mean()), "personalised": float(personal.mean())},
            "words": {"pooled": float(np.mean(words["pooled"])), "personalised": float(np.mean(words[g.name]))},
            "personalised_vs_pooled": comparison,
        }
    return out


def write_report(out: Path, results: dict[str, Any]) -> Path:
    from rlhfkit.eval.report import Report, table

    report = Report("rlhfkit demo-personal: a policy per user vs one for everyone")
    rows = []
    for name, g in results["groups"].items():
        c = g["personalised_vs_pooled"]
        rows.append([
            name, ", ".join(g["users"]), g["length_taste"], g["utility"]["pooled"], g["utility"]["personalised"],
            f"{c['mean_diff']:+.3f} ({c['ci_low']:+.3f} .. {c['ci_high']:+.3f})", c["win_rate"],
            g["words"]["pooled"], g["words"]["personalised"],
        ])  # fmt: skip
    report.add(
        "Policies on each group's own utility (gold + the group's length taste)",
        table(
            [
                "group",
                "users",
                "length taste",
                "pooled policy",
                "personalised policy",
                "difference (95% CI)",
                "win rate",
                "words (pooled)",
                "words (personalised)",
            ],
            rows,
        )  # fmt: skip
        + f"<p>{results['n_prompts']} held-out prompts, {results['samples_per_prompt']} samples each; the "
        "personalised policy is asked as the group's first user, the pooled one without a user.</p>",
    )
    rm_rows = [
        [name, acc["pairs"], acc["personalised_accuracy"], acc["pooled_accuracy"]]
        for name, acc in ((name, g["reward_model"]) for name, g in results["groups"].items())
    ]
    report.add(
        "Reward model: held-out accuracy on each group's pairs",
        table(["group", "held-out pairs", "as the user's (personalised)", "pooled (no user)"], rm_rows),
    )
    report.add("Stage times (s)", table(["stage", "seconds"], [[k, v] for k, v in results["timings"].items()]))
    path = out / "report.html"
    atomic_write_text(path, report.html())
    return path


def run(cfg: Config) -> Path:
    from rlhfkit.data.corpus import build_default_data
    from rlhfkit.sim.panel import SimulatedLabeler

    out = Path(cfg.output_dir)
    run = RunFolder(out)
    save_config(cfg, out)
    runner = demo.Runner(run, cfg.resume)
    data = build_default_data(run.stage("data"), seed=cfg.pretrain.data.corpus_seed)  # as demo.run: see there
    sft_model = demo.policy_stages(cfg, runner, data)
    pairs = run.stage("feedback") / "labeler_pairs.jsonl"

    def feedback() -> None:
        panel = [
            SimulatedLabeler(user, noise=cfg.noise, length_taste=g.length_taste) for g in cfg.groups for user in g.users
        ]
        info = demo.collect_feedback(
            run.stage("feedback"), run.completions, cfg.feedback, cfg.seed, cfg.eval.device, panel
        )
        export_labeler_pairs(info["db_url"], pairs)
        atomic_write_text(run.feedback_summary, json.dumps(info, indent=2))

    runner.stage("feedback", run.feedback_summary, feedback)

    def rm() -> None:
        c = cfg.rm.model_copy(deep=True)
        c.output_dir, c.model.path, c.data.pairs = str(run.stage("rm")), str(sft_model), str(pairs)
        c.normalize.policy, c.normalize.prompts = str(sft_model), str(data["prompts_ppo"])
        rm_stage.run(c)

    runner.stage("rm", run.results("rm"), rm)
    reward = RewardConfig(sources=[RewardSpec(model=str(run.model("rm")))])
    users = [u for g in cfg.groups for u in g.users]
    asked = personal_prompts(data["prompts_ppo"], users, run.stage("data") / "prompts_ppo_users.jsonl")

    def ppo(name: str, prompts: Path, start: Path, normalize: bool) -> None:
        c = cfg.ppo.model_copy(deep=True)
        c.output_dir, c.prompts, c.model.path = str(run.stage(name)), str(prompts), str(start)
        c.ppo.normalize_rewards = c.ppo.normalize_rewards or normalize
        c.reward = reward
        c.resume = cfg.resume and (run.stage(name) / "checkpoints").exists()
        ppo_stage.run(c)

    start = sft_model if cfg.personal_start == "sft" else run.model("ppo-pooled")
    runner.stage(
        "ppo-pooled", run.results("ppo-pooled"), lambda: ppo("ppo-pooled", data["prompts_ppo"], sft_model, False)
    )
    runner.stage(
        "ppo-personal",
        run.results("ppo-personal"),
        lambda: ppo("ppo-personal", asked, start, cfg.personal_normalize_rewards),
    )

    def evaluate() -> None:
        c = cfg.eval.model_copy(deep=True)
        c.output_dir, c.prompts, c.seed = str(run.stage("eval")), str(data["prompts_heldout"]), cfg.seed
        c.models = {
            "pooled": str(run.model("ppo-pooled")),
            **{g.name: str(run.model("ppo-personal")) for g in cfg.groups},
        }
        c.users = {g.name: g.users[0] for g in cfg.groups}
        c.reference, c.reward = str(sft_model), reward
        eval_stage.run(c)

    runner.stage("eval", run.results("eval"), evaluate)

    t = time.perf_counter()
    rm_results = json.loads(run.results("rm").read_text())
    samples = [json.loads(line) for line in (run.stage("eval") / "samples.jsonl").read_text().splitlines()]
    evaluation = json.loads(run.results("eval").read_text())
    results = {
        "groups": group_results(cfg, rm_results, samples),
        "n_prompts": evaluation["n_prompts"],
        "samples_per_prompt": evaluation["samples_per_prompt"],
        "reward_model_users": rm_results["users"],
        "eval": evaluation["comparisons"],
        "timings": {**runner.timings, "report": time.perf_counter() - t},
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    report = write_report(out, results)
    for name, g in results["groups"].items():
        c, acc = g["personalised_vs_pooled"], g["reward_model"]
        print(
            f"[demo-personal] {name}: personalised vs pooled policy on the group's utility {c['mean_diff']:+.3f} "
            f"(95% CI {c['ci_low']:+.3f} .. {c['ci_high']:+.3f}), win rate {c['win_rate']:.2f}; reward model "
            f"accuracy {acc['personalised_accuracy']:.3f} personalised, {acc['pooled_accuracy']:.3f} pooled"
        )
    print(f"\n[demo-personal] report: {report}")
    return report
