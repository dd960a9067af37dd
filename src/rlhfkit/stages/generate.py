"""Sampling: K candidate completions per prompt, written in the completions format.

Reads a prompts file (`{id, prompt}` lines), renders each prompt (template or chat template),
samples `k` completions with temperature / top-k / top-p, and writes
`OUTPUT_DIR/completions.jsonl` (`{prompt_id, prompt, completions: [...]}`), ready to be ranked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from tqdm.auto import tqdm

from rlhfkit.config import StrictModel, save_config
from rlhfkit.data.chat import render_prompt
from rlhfkit.data.formats import Completions, read_records, write_records
from rlhfkit.models.loading import ModelConfig, load_causal_lm
from rlhfkit.models.sampling import SamplingConfig, sample


class Config(StrictModel):
    output_dir: str = "runs/generate"
    prompts: str = Field("", description="prompts file (JSONL {id, prompt}) or dataset folder")
    k: int = Field(4, ge=2, description="candidates per prompt")
    seed: int = 0
    limit: int = Field(0, ge=0, description="use only the first N prompts (0 = all)")
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()


def run(cfg: Config) -> Path:
    from rlhfkit.errors import UserError

    if not cfg.prompts:
        raise UserError("prompts: no prompts file given; set prompts=FILE.jsonl")
    records = read_records(cfg.prompts, "prompts")
    if cfg.limit:
        records = records[: cfg.limit]
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    model, tokenizer = load_causal_lm(cfg.model)
    torch.manual_seed(cfg.seed)
    rendered = [render_prompt(tokenizer, r.prompt, cfg.sampling.prompt_template) for r in records]
    chunk = max(1, cfg.sampling.batch_size // cfg.k)
    results: list[Completions] = []
    for start in tqdm(range(0, len(records), chunk), desc="generate", unit="batch"):
        batch = records[start : start + chunk]
        s = sample(model, tokenizer, rendered[start : start + chunk], cfg.sampling, num_samples=cfg.k)
        for i, rec in enumerate(batch):
            texts = s.texts[i * cfg.k : (i + 1) * cfg.k]
            results.append(Completions(prompt_id=rec.id, prompt=rec.prompt, completions=texts))
    path = write_records(out / "completions.jsonl", results)
    print(f"wrote {len(results)} prompts x {cfg.k} completions to {path}")
    return path
