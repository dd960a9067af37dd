"""Evaluation: compare models (e.g. SFT vs PPO) on held-out prompts.

For each model: sample `samples_per_prompt` responses per prompt (same seed for every model), then measure the
reward-model score (if a reward is given), the gold utility and its parts (if `gold=true`: the
independent judges of `rlhfkit.eval.gold`; toxicity is the profanity classifier's probability),
KL to the reference model on the model's own samples, response length and distinct-n diversity.
Each later model is compared with the first (the baseline; `baselines` adds more) prompt by prompt (each model's mean
over its samples of that prompt): win rate by gold utility and by reward, and the mean paired
difference with a bootstrap 95% confidence interval over prompts. Several samples per prompt
narrow the interval at the cost of generation time: a rare failure (a rude answer once in 25)
shows up in a sample of 200 only a handful of times.

A personalised policy answers as a user (`user=NAME`, or per model `users.NAME=USER`, e.g. only the
personalised one): its prompts are asked as that user (`data.chat.with_user`) and a personalised
reward model scores them as theirs; a prompt's own `user` applies otherwise.

Writes `OUTPUT_DIR/results.json` and `OUTPUT_DIR/samples.jsonl` (one row per prompt and sample,
with every model's response and scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.chat import asked_prompt, render_prompt
from rlhfkit.data.formats import read_records, text_to_json
from rlhfkit.errors import UserError
from rlhfkit.models.device import DEVICE_HELP, Device, model_device, place, resolve_device
from rlhfkit.models.loading import ModelConfig, load_causal_lm
from rlhfkit.models.sampling import Samples, SamplingConfig, check_length_budget, sample, truncation_warning
from rlhfkit.models.value import response_logits
from rlhfkit.rewards.build import RewardConfig, build_reward
from rlhfkit.rl.core import logprobs_from_logits, zero_padding


class Config(StrictModel):
    output_dir: str = "runs/eval"
    models: dict[str, str] = Field(default_factory=dict, description="name -> model folder; first = baseline")
    baselines: list[str] = Field(
        default_factory=list, description="more baselines: every model listed after one is compared with it too"
    )
    reference: str = Field("", description="model folder for KL; default: the first model")
    prompts: str = Field("", description="held-out prompts (JSONL or datasets, `path:split`): {id, prompt} or {prompt}")
    strict: bool = Field(False, description="unused columns are an error (default: ignored, named once in the log)")
    limit: int = Field(0, ge=0, description="use the first N prompts (0 = all)")
    samples_per_prompt: int = Field(1, gt=0, description="responses per prompt and model (averaged per prompt)")
    seed: int = 0
    gold: bool = Field(True, description="score with the gold judges (VADER, profanity, MiniLM)")
    reward: RewardConfig = RewardConfig()
    sampling: SamplingConfig = SamplingConfig(temperature=0.7)
    bootstrap: int = Field(2000, gt=0, description="bootstrap resamples for confidence intervals")
    device: Device = Field("auto", description=DEVICE_HELP)
    user: str = Field("", description="ask every prompt as this user (personalised policy and reward); empty = its own")
    users: dict[str, str] = Field(
        default_factory=dict,
        description="model name -> the user it answers, instead of `user` (e.g. only the personalised one)",
    )


@torch.no_grad()
def sequence_kl(model: Any, ref: Any, s: Samples, temperature: float, batch: int = 32) -> torch.Tensor:
    """Σ_t log π(y_t) − log π_ref(y_t) over each sampled response (k1, unbiased for KL(π‖π_ref)), on the CPU.

    The samples are on the CPU; each batch goes to the models' device (both models are placed on
    the same one)."""
    out = []
    device = model_device(model)
    ids = torch.cat([s.prompt_ids, s.response_ids], 1).to(device)
    mask = torch.cat([s.prompt_mask, s.response_mask], 1).to(device)
    labels, response_mask = s.response_ids.to(device), s.response_mask.bool().to(device)
    start = s.prompt_ids.shape[1]
    for i in range(0, len(s), batch):
        rows = slice(i, i + batch)
        lp = logprobs_from_logits(response_logits(model, ids[rows], mask[rows], start), labels[rows], temperature)
        ref_lp = logprobs_from_logits(response_logits(ref, ids[rows], mask[rows], start), labels[rows], temperature)
        out.append(zero_padding(lp - ref_lp, response_mask[rows]).sum(-1).cpu())
    return torch.cat(out)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over all responses: low = the model says the same things."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def paired_comparison(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Model b vs baseline a on the same prompts: win rate (ties count half) and the mean paired
    difference with a percentile-bootstrap 95% CI over prompts."""
    diff = b - a
    wins = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"win_rate": wins, "mean_diff": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def run(cfg: Config) -> dict[str, Any]:
    if not cfg.models:
        raise UserError("models: give at least one model, e.g. 'models={sft: runs/sft/model, ppo: runs/ppo/model}'")
    if not cfg.prompts:
        raise UserError("prompts: no prompts file given; set prompts=FILE.jsonl")
    unknown = sorted(set(cfg.users) - set(cfg.models))
    if unknown:
        raise UserError(f"users: {', '.join(unknown)} not in models ({', '.join(cfg.models)}); name models there")
    records = read_records(cfg.prompts, "prompts", strict=cfg.strict)[: cfg.limit or None]
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    names = list(cfg.models)
    unknown = [b for b in cfg.baselines if b not in cfg.models]
    if unknown:
        raise UserError(f"baselines: {', '.join(unknown)} not among models ({', '.join(names)})")
    device = resolve_device(cfg.device)
    ref_model, ref_tok = load_causal_lm(ModelConfig(path=cfg.reference or cfg.models[names[0]]))
    place(ref_model, device).eval()
    check_length_budget(ref_model.config, cfg.sampling)  # the reference reads every model's prompts + samples
    reward = build_reward(cfg.reward, device) if cfg.reward.sources else None
    judge = None
    if cfg.gold:
        from rlhfkit.eval.gold import GoldJudge

        judge = GoldJudge(device=device)
    per_model: dict[str, dict[str, np.ndarray]] = {}
    texts: dict[str, list[str]] = {}
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        model, tok = load_causal_lm(ModelConfig(path=cfg.models[name]))
        place(model, device).eval()
        check_length_budget(model.config, cfg.sampling)
        prompts = [asked_prompt(r, cfg.users.get(name, cfg.user)) for r in records]
        per_sample = [p for p in prompts for _ in range(cfg.samples_per_prompt)]  # `sample` groups rows by prompt
        rendered = [render_prompt(tok, p, cfg.sampling.prompt_template) for p in prompts]
        torch.manual_seed(cfg.seed)
        s = sample(model, tok, rendered, cfg.sampling, num_samples=cfg.samples_per_prompt, desc=f"eval {name}")
        if s.prompts_truncated:
            print(f"{name}: {truncation_warning(s.prompts_truncated, len(prompts), cfg.sampling)}")
        texts[name] = s.texts
        m: dict[str, np.ndarray] = {
            "kl": sequence_kl(model, ref_model, s, cfg.sampling.temperature).numpy(),
            "length": s.response_mask.sum(-1).float().numpy(),
            "ended": s.ended.float().numpy(),
        }
        if reward is not None:
            m["reward"] = reward.score(per_sample, s.texts).float().numpy()
        if judge is not None:
            parts = judge.components(per_sample, s.texts)
            m["gold"] = judge.utility(parts).numpy()
            m.update({k: v.numpy() for k, v in parts.items()})
        per_model[name] = m
        summary[name] = {k: float(v.mean()) for k, v in m.items()}
        summary[name]["distinct_1"] = distinct_n(s.texts, 1)
        summary[name]["distinct_2"] = distinct_n(s.texts, 2)
        summary[name]["prompts_truncated"] = s.prompts_truncated

    def per_prompt(name: str, key: str) -> np.ndarray:  # rows are grouped by prompt
        return per_model[name][key].reshape(len(records), cfg.samples_per_prompt).mean(1)

    comparisons = {
        f"{name}_vs_{b}": {
            key: paired_comparison(per_prompt(b, key), per_prompt(name, key), cfg.bootstrap, cfg.seed)
            for key in ("gold", "reward", "toxicity")
            if key in per_model[name]
        }
        for b in [names[0], *cfg.baselines]
        for name in names[names.index(b) + 1 :]
    }
    results = {
        "n_prompts": len(records),
        "samples_per_prompt": cfg.samples_per_prompt,
        "device": str(device),
        "models": summary,
        "comparisons": comparisons,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    rows = []
    for i in range(len(records) * cfg.samples_per_prompt):
        rec = records[i // cfg.samples_per_prompt]
        row: dict[str, Any] = {"prompt_id": rec.id, "prompt": text_to_json(rec.prompt)}
        if cfg.samples_per_prompt > 1:
            row["sample"] = i % cfg.samples_per_prompt
        for name in names:
            row[name] = {"response": texts[name][i], **{k: float(v[i]) for k, v in per_model[name].items()}}
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out / "samples.jsonl", "\n".join(rows) + "\n")
    _print_table(results)
    return results


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    n = results["samples_per_prompt"]
    title = f"evaluation on {results['n_prompts']} held-out prompts" + (f", {n} samples each" if n > 1 else "")
    table = Table(title=title)
    first = next(iter(results["models"].values()))
    keys = [k for k in ("gold", "reward", "toxicity", "kl", "length", "distinct_2") if k in first]
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for name, m in results["models"].items():
        table.add_row(name, *(f"{m[k]:.3f}" for k in keys))
    console = Console()
    console.print(table)
    for pair, comp in results["comparisons"].items():
        for key, c in comp.items():
            console.print(
                f"{pair} {key}: win rate {c['win_rate']:.2f}, mean diff {c['mean_diff']:+.3f} "
                f"(95% CI {c['ci_low']:+.3f} .. {c['ci_high']:+.3f})"
            )
