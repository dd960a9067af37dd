"""Sampling: K candidate completions per prompt, written in the completions format.

Reads a prompts file (`{id, prompt}` lines), renders each prompt (template or chat template),
samples `k` completions with temperature / top-k / top-p, and writes
`OUTPUT_DIR/completions.jsonl` (`{prompt_id, prompt, completions: [...]}`), ready to be ranked.

`extra_models` adds `k` completions of each further model to every prompt: labelers then compare
answers of several policies (InstructGPT ranked samples of several models), which shows the
reward model failures that one policy produces only rarely. The models must share the tokenizer's
chat format; the feedback server shows candidates in a random order, so the source is hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from rlhfkit.config import StrictModel, save_config
from rlhfkit.data.chat import asked_prompt, render_prompt
from rlhfkit.data.formats import Completions, read_records, write_records
from rlhfkit.engine.progress import track
from rlhfkit.models.device import DEVICE_HELP, Device, place, resolve_device
from rlhfkit.models.loading import ModelConfig, load_causal_lm
from rlhfkit.models.sampling import SamplingConfig, check_length_budget, sample, truncation_warning


class Config(StrictModel):
    output_dir: str = "runs/generate"
    prompts: str = Field("", description="prompts (JSONL or datasets folder, `path:split`): {id, prompt} or {prompt}")
    strict: bool = Field(False, description="unused columns are an error (default: ignored, named once in the log)")
    k: int = Field(4, ge=2, description="candidates per prompt")
    seed: int = 0
    limit: int = Field(0, ge=0, description="use only the first N prompts (0 = all)")
    model: ModelConfig = ModelConfig()
    extra_models: list[str] = Field(default_factory=list, description="more model folders, k completions each")
    user: str = Field("", description="ask every prompt as this user (a personalised policy); empty = a prompt's own")
    sampling: SamplingConfig = SamplingConfig()
    device: Device = Field("auto", description=DEVICE_HELP)


def sample_completions(
    model_cfg: ModelConfig,
    records: list[Any],
    k: int,
    sampling: SamplingConfig,
    seed: int,
    device: Device = "auto",
    user: str = "",
) -> list[list[str]]:
    """`k` completions of every prompt by one model (seeded: the same for the same inputs), each
    prompt asked as `user` when one is given (a personalised policy), else as its own.
    `rlhfkit loop` calls it once per candidate source, each with its own k and sampling."""
    model, tokenizer = load_causal_lm(model_cfg)
    place(model, resolve_device(device))
    check_length_budget(model.config, sampling)
    torch.manual_seed(seed)
    rendered = [render_prompt(tokenizer, asked_prompt(r, user), sampling.prompt_template) for r in records]
    chunk = max(1, sampling.batch_size // k)
    out: list[list[str]] = []
    truncated = 0
    for start in track(range(0, len(records), chunk), f"generate ({model_cfg.path})"):
        s = sample(model, tokenizer, rendered[start : start + chunk], sampling, num_samples=k)
        out += [s.texts[i : i + k] for i in range(0, len(s.texts), k)]
        truncated += s.prompts_truncated
    if truncated:
        print(truncation_warning(truncated, len(records), sampling))
    return out


def run(cfg: Config) -> Path:
    from rlhfkit.errors import UserError

    if not cfg.prompts:
        raise UserError("prompts: no prompts file given; set prompts=FILE.jsonl")
    records = read_records(cfg.prompts, "prompts", strict=cfg.strict)
    if cfg.limit:
        records = records[: cfg.limit]
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    models = [cfg.model, *(cfg.model.model_copy(update={"path": p}) for p in cfg.extra_models)]
    per_model = [sample_completions(m, records, cfg.k, cfg.sampling, cfg.seed, cfg.device, cfg.user) for m in models]
    results = [
        Completions(
            prompt_id=rec.id,
            prompt=asked_prompt(rec, cfg.user),
            completions=[t for texts in per_model for t in texts[i]],
        )
        for i, rec in enumerate(records)
    ]
    path = write_records(out / "completions.jsonl", results)
    print(f"wrote {len(results)} prompts x {cfg.k * len(per_model)} completions to {path}")
    return path
