"""The GPU check (bench/gpu_check.sh): PPO on a ~100M-parameter model and the inference stages'
placement, on one accelerator, in a few minutes. No download: the model is built from a config.

Asserts, and exits non-zero when one fails:
- PPO under bf16 autocast (`train.mixed_precision=bf16`, gradient checkpointing on): the first
  update's ratio is 1 (step 1 has one minibatch per epoch and one epoch, so its logged
  `approx_kl`/`clipfrac` are those of the rollout's own policy: approx_kl < 1e-10, clipfrac 0),
  and every logged loss is finite;
- `generate` and `eval` (device=auto) put their models on the accelerator: eval's results.json
  names the device, and on CUDA the peak memory allocated during each stage is at least the
  model's weights.
Prints tokens/s of the PPO steps and the peak GPU memory, and writes OUTPUT/gpu_check.json.

`--device cpu --tiny` runs the same code on a 2-layer model in seconds (the test suite runs it, so
this script is not dead code on machines without a GPU):

    PYTHONPATH=src python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

WORDS = ["tea", "water", "kind", "answer", "question", "leaves", "boil", "steep", "minutes", "clear", "good"]


def corpus(n: int) -> list[str]:
    """Deterministic word salad: enough text to train a byte-level BPE tokenizer."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 9)) for i in range(n)]


def build_model(out: Path, tiny: bool) -> tuple[Path, int]:
    """A fresh GPT-2 saved to OUT/model: 12 layers x 768 (~88M parameters), or 2 x 64 with --tiny."""
    from rlhfkit.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

    tokenizer = train_tokenizer(corpus(400), vocab_size=400 if tiny else 4096)
    size = dict(n_layer=2, d_model=64, n_head=4) if tiny else dict(n_layer=12, d_model=768, n_head=12)
    model = build_tiny_model(TinyModelConfig(arch="gpt2", max_positions=256, **size), tokenizer)
    path = out / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def e_share(prompt: Any, completion: str) -> float:
    return 10 * completion.count("e") / max(1, len(completion))


def check_ppo(model: Path, prompts: Path, out: Path, tiny: bool) -> dict[str, float]:
    from rlhfkit.engine.metrics import read_metrics
    from rlhfkit.rewards.base import FunctionReward
    from rlhfkit.stages.ppo import Config, train_ppo

    batch, new_tokens, steps = (8, 8, 3) if tiny else (64, 64, 6)
    cfg = Config.model_validate(
        {
            "output_dir": str(out / "ppo"),
            "prompts": str(prompts),
            "model": {"path": str(model), "gradient_checkpointing": True},
            "sampling": {"max_new_tokens": new_tokens, "max_prompt_tokens": 32, "batch_size": batch},
            "ppo": {"batch_size": batch, "mini_batch_size": batch, "micro_batch_size": batch // 4, "epochs": 1},
            "stop": {"max_steps": steps},
            "train": {"mixed_precision": "bf16", "lr": 1e-5, "log_every": 1},
            "log_samples_every": 0,
        }
    )
    t0 = time.perf_counter()
    train_ppo(cfg, reward=FunctionReward(e_share))
    seconds = time.perf_counter() - t0
    rows = read_metrics(out / "ppo" / "metrics.jsonl")
    assert len(rows) == steps, f"{len(rows)} metrics rows for {steps} steps"
    first = rows[0]
    assert first["approx_kl"] < 1e-10 and first["clipfrac"] == 0.0, f"ratio != 1 at the first update: {first}"
    for row in rows:
        for key in ("policy_loss", "value_loss", "reward", "kl"):
            assert math.isfinite(row[key]), f"step {row['step']}: {key} = {row[key]}"
    return {
        "ppo_steps": steps,
        "ppo_seconds": seconds,
        "ppo_tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:]) / max(1, len(rows) - 1),
        "first_update_approx_kl": first["approx_kl"],
    }


def check_placement(model: Path, prompts: Path, out: Path, n_params: int, device: str) -> dict[str, Any]:
    """generate and eval with device=auto; on CUDA, each stage's peak memory holds the weights."""
    import torch

    from rlhfkit.models.loading import ModelConfig
    from rlhfkit.models.sampling import SamplingConfig
    from rlhfkit.stages import eval as eval_stage
    from rlhfkit.stages import generate

    sampling = SamplingConfig(max_new_tokens=16, max_prompt_tokens=32)
    cuda = device == "cuda"
    peaks = {}
    for stage in ("generate", "eval"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if stage == "generate":
            generate.run(
                generate.Config(
                    output_dir=str(out / "generate"), prompts=str(prompts), k=2, limit=8,
                    model=ModelConfig(path=str(model)), sampling=sampling,
                )
            )  # fmt: skip
        else:
            results = eval_stage.run(
                eval_stage.Config(
                    output_dir=str(out / "eval"), models={"a": str(model)}, prompts=str(prompts), limit=8,
                    gold=False, sampling=sampling, bootstrap=10,
                )
            )  # fmt: skip
            assert results["device"].startswith(device), f"eval ran on {results['device']}, not {device}"
        if cuda:
            peaks[stage] = torch.cuda.max_memory_allocated()
            assert peaks[stage] >= 4 * n_params, f"{stage}: peak {peaks[stage]} B < the float32 weights"
    return {f"{k}_peak_bytes": v for k, v in peaks.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and a few small steps (CPU smoke run)")
    p.add_argument("--out", default="runs/gpu-check")
    a = p.parse_args(argv)
    import torch

    from rlhfkit.models.device import resolve_device

    if resolve_device("auto").type != a.device:
        raise SystemExit(f"--device {a.device}: device=auto resolves to {resolve_device('auto')} on this machine")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(corpus(64))))
    model, n_params = build_model(out, a.tiny)
    report: dict[str, Any] = {"device": a.device, "params": n_params}
    if a.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
    report.update(check_ppo(model, prompts, out, a.tiny))
    if a.device == "cuda":
        report["ppo_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    report.update(check_placement(model, prompts, out, n_params, a.device))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    peak = report.get("ppo_peak_gpu_bytes")
    print(
        f"gpu check passed on {report.get('gpu', a.device)}: {n_params / 1e6:.1f}M params, "
        f"PPO {report['ppo_tokens_per_s']:.0f} tokens/s" + (f", peak GPU memory {peak / 2**30:.2f} GiB" if peak else "")
    )
    return report


if __name__ == "__main__":
    main()
