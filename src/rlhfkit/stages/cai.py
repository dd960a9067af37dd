"""Constitutional AI: AI-written demonstrations and AI preference labels, guided by a constitution.

    rlhfkit cai revise [--config FILE.yaml] [KEY=VALUE ...]   critique-and-revise -> SFT data + pairs
    rlhfkit cai label  [--config FILE.yaml] [KEY=VALUE ...]   a judge labels completions -> pairs
    rlhfkit cai mix    [--config FILE.yaml] [KEY=VALUE ...]   human + AI pairs, AI pairs weighted
    rlhfkit cai COMMAND --help                                every config field of COMMAND
(the commands are in the CLI's registry, `rlhfkit.cli.COMMANDS`)

`revise` writes OUTPUT_DIR/demonstrations.jsonl (train `rlhfkit sft` on it), pairs.jsonl (revised
chosen over original) and traces.jsonl (every critique and revision, to read). `label` writes
OUTPUT_DIR/pairs.jsonl, whose margin is logit(p) of the judge's probability p that chosen is
better (p = σ(margin)), and judgements.jsonl (both orders' probabilities, the principle asked).
Those pairs train `rlhfkit rm` exactly like human pairs (RLAIF); `mix` combines both kinds.
The constitution is a YAML file (constitution=FILE); empty = the default that ships with rlhfkit.
See docs/cai.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from rlhfkit.cai.constitution import load_constitution
from rlhfkit.cai.judge import Judge, ModelJudge, RewardJudge, label, mix_pairs
from rlhfkit.cai.revise import critique_and_revise, to_records
from rlhfkit.config import StrictModel, save_config
from rlhfkit.data.formats import read_records, write_jsonl, write_records
from rlhfkit.errors import UserError
from rlhfkit.models.device import DEVICE_HELP, Device, place, resolve_device
from rlhfkit.models.loading import ModelConfig, fit_to_positions, load_causal_lm
from rlhfkit.models.sampling import SamplingConfig
from rlhfkit.rewards.build import RewardConfig, build_reward


class CAISamplingConfig(SamplingConfig):
    """Critiques and revisions run longer than the default rollouts, and a bit cooler.

    Few-shot critique prompts are long: 2048 prompt tokens suit real instruct models (4k positions
    and more). On a model with fewer positions `cai revise` stops up front with an error naming both
    fields, rather than shrinking the budget to fit: that would silently cut the few-shot examples
    and the instructions out of every critique prompt.
    """

    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.7, gt=0)
    max_prompt_tokens: int = Field(2048, gt=0, description="longer prompts keep their end (counted)")


class ReviseConfig(StrictModel):
    """`rlhfkit cai revise`: red-team prompts -> response -> critique -> revision (x revisions)."""

    output_dir: str = "runs/cai-revise"
    prompts: str = Field("", description="prompts file (JSONL {id, prompt}), e.g. red-team prompts")
    constitution: str = Field("", description="constitution YAML; empty = the shipped default")
    revisions: int = Field(1, ge=1, description="critique-and-revise rounds per prompt")
    few_shot: int = Field(-1, description="few-shot examples from the constitution to show (-1 = all, 0 = none)")
    seed: int = 0
    limit: int = Field(0, ge=0, description="use only the first N prompts (0 = all)")
    model: ModelConfig = ModelConfig()
    sampling: CAISamplingConfig = CAISamplingConfig()
    device: Device = Field("auto", description=DEVICE_HELP)


class JudgeConfig(StrictModel):
    model: ModelConfig = Field(ModelConfig(), description="a causal LM asked (A) or (B)")
    reward: RewardConfig = Field(RewardConfig(), description="or: any reward source, p = σ(r_first − r_second)")
    batch_size: int = Field(8, gt=0)
    max_tokens: int = Field(2048, gt=0, description="longer judge prompts keep their end")


class LabelConfig(StrictModel):
    """`rlhfkit cai label`: a judge compares candidates under sampled principles -> preference pairs."""

    output_dir: str = "runs/cai-label"
    completions: str = Field("", description="completions file {prompt_id, prompt, completions: [...]}")
    constitution: str = Field("", description="constitution YAML; empty = the shipped default")
    pairs: Literal["all", "sampled"] = Field("all", description="every candidate pair, or one sampled per prompt")
    min_confidence: float = Field(0.0, ge=0, lt=0.5, description="drop pairs with |p − 0.5| ≤ this")
    seed: int = 0
    limit: int = Field(0, ge=0, description="use only the first N prompts (0 = all)")
    judge: JudgeConfig = JudgeConfig()
    device: Device = Field("auto", description=DEVICE_HELP)


class MixConfig(StrictModel):
    """`rlhfkit cai mix`: one pairs file of human pairs plus AI pairs at a chosen weight."""

    human: str = Field("", description="human pairs file")
    ai: str = Field("", description="AI pairs file (from `rlhfkit cai label` or `cai revise`)")
    ai_weight: float = Field(1.0, ge=0, description="weight of one AI pair relative to one human pair")
    output: str = Field("", description="pairs file to write")
    seed: int = 0


def _device_model(cfg: ModelConfig, device: torch.device) -> tuple[Any, Any]:
    model, tokenizer = load_causal_lm(cfg)
    return place(model, device), tokenizer


def run_revise(cfg: ReviseConfig) -> Path:
    if not cfg.prompts:
        raise UserError("prompts: no prompts file given; set prompts=FILE.jsonl")
    constitution = load_constitution(cfg.constitution)
    records = read_records(cfg.prompts, "prompts")
    records = records[: cfg.limit] if cfg.limit else records
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    model, tokenizer = _device_model(cfg.model, resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    prompts = [r.prompt for r in records]
    traces = critique_and_revise(
        model, tokenizer, prompts, constitution, cfg.sampling, cfg.revisions, cfg.few_shot, cfg.seed
    )
    demos, pairs = to_records(traces, prompts)
    write_jsonl(out / "traces.jsonl", [{"id": r.id, **t} for r, t in zip(records, traces, strict=True)])
    write_records(out / "demonstrations.jsonl", demos)
    write_records(out / "pairs.jsonl", pairs)
    print(f"{len(records)} prompts, {cfg.revisions} round(s): {len(demos)} demonstrations, {len(pairs)} pairs in {out}")
    return out


def build_judge(cfg: JudgeConfig, device: torch.device) -> Judge:
    if bool(cfg.model.path) == bool(cfg.reward.sources):
        raise UserError("judge: give exactly one judge: judge.model.path=MODEL or judge.reward.sources=[...]")
    if cfg.model.path:
        model, tokenizer = _device_model(cfg.model, device)
        max_tokens, note = fit_to_positions(model.config, cfg.max_tokens, "judge.max_tokens")
        if note:
            print(f"note: {note}")
        return ModelJudge(model, tokenizer, batch_size=cfg.batch_size, max_tokens=max_tokens)
    return RewardJudge(build_reward(cfg.reward, device))


def run_label(cfg: LabelConfig) -> Path:
    if not cfg.completions:
        raise UserError("completions: no completions file given; set completions=FILE.jsonl")
    constitution = load_constitution(cfg.constitution)
    records = read_records(cfg.completions, "completions")
    records = records[: cfg.limit] if cfg.limit else records
    out = Path(cfg.output_dir)
    judge = build_judge(cfg.judge, resolve_device(cfg.device))
    save_config(cfg, out)
    pairs, judgements = label(judge, records, constitution, cfg.pairs, cfg.min_confidence, cfg.seed)
    if not pairs:
        raise UserError(
            f"{cfg.completions}: the judge expressed no preference on any pair ({len(judgements)} compared)"
        )
    write_jsonl(out / "judgements.jsonl", judgements)
    write_records(out / "pairs.jsonl", pairs)
    print(f"{len(judgements)} pairs judged, {len(pairs)} kept in {out / 'pairs.jsonl'}")
    return out


def run_mix(cfg: MixConfig) -> Path:
    for key in ("human", "ai", "output"):
        if not getattr(cfg, key):
            raise UserError(
                f"{key}: not given; `rlhfkit cai mix human=H.jsonl ai=A.jsonl ai_weight=0.5 output=M.jsonl`"
            )
    human, ai = read_records(cfg.human, "pairs"), read_records(cfg.ai, "pairs")
    mixed = mix_pairs(human, ai, cfg.ai_weight, cfg.seed)
    path = write_records(cfg.output, mixed)
    print(
        f"wrote {len(mixed)} pairs to {path}: {len(human)} human, {len(mixed) - len(human)} AI (weight {cfg.ai_weight})"
    )
    return path
