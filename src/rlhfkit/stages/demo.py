"""The demo on the embedded default: every stage that exists, end to end, offline, in one folder.

Today: generate the embedded corpus → pretrain a tiny causal LM on it → sample K completions for
the labeling prompts. Each stage writes into `OUTPUT_DIR/<stage>/`; a stage whose output already
exists is reused, so re-running resumes where the last run stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from rlhfkit.config import StrictModel, save_config
from rlhfkit.data.corpus import build_default_data
from rlhfkit.stages import generate as generate_stage
from rlhfkit.stages import pretrain as pretrain_stage


class Config(StrictModel):
    output_dir: str = "runs/demo"
    seed: int = 0
    resume: bool = Field(True, description="reuse finished stages (set false to redo everything)")
    pretrain: pretrain_stage.Config = pretrain_stage.Config()
    generate: generate_stage.Config = generate_stage.Config(limit=64)


def _stage(name: str, done_marker: Path, resume: bool) -> bool:
    """True if the stage must run; prints what is reused."""
    if resume and done_marker.exists():
        print(f"[{name}] reusing {done_marker.parent}")
        return False
    print(f"[{name}] running ...")
    return True


def run(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    data = build_default_data(out / "data", seed=cfg.seed)
    timings["data"] = time.perf_counter() - t

    pre = cfg.pretrain.model_copy(
        update={
            "output_dir": str(out / "pretrain"),
            "resume": cfg.resume and (out / "pretrain" / "checkpoints" / "latest").exists(),
            "data": cfg.pretrain.data.model_copy(
                update={"train_files": [str(data["pretrain_train"])], "valid_files": [str(data["pretrain_valid"])]}
            ),
        }
    )
    t = time.perf_counter()
    model_dir = out / "pretrain" / "model"
    if _stage("pretrain", out / "pretrain" / "results.json", cfg.resume):
        pretrain_stage.run(pre)
    timings["pretrain"] = time.perf_counter() - t

    gen = cfg.generate.model_copy(
        update={
            "output_dir": str(out / "generate"),
            "prompts": str(data["prompts_label"]),
            "model": cfg.generate.model.model_copy(update={"path": str(model_dir)}),
            "seed": cfg.seed,
        }
    )
    t = time.perf_counter()
    if _stage("generate", out / "generate" / "completions.jsonl", cfg.resume):
        generate_stage.run(gen)
    timings["generate"] = time.perf_counter() - t

    results = json.loads((out / "pretrain" / "results.json").read_text())
    first = json.loads((out / "generate" / "completions.jsonl").read_text().splitlines()[0])
    print("\n=== demo summary ===")
    print(f"run folder:          {out}")
    print(f"held-out perplexity: {results['valid_ppl']:.2f} (unigram baseline {results['unigram_ppl']:.2f})")
    print(f"completions:         {out / 'generate' / 'completions.jsonl'}")
    print(f"example prompt:      {first['prompt']}")
    for c in first["completions"]:
        print(f"  candidate:         {c}")
    print("timings (s):         " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return out
