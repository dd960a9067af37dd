"""Benchmark (not a test): rlhfkit's DPO training loop against TRL's DPOTrainer, on the same pairs,
model, batch size, steps, sequence length, loss (sigmoid, beta 0.1), dropout off and precomputed
reference log-probs.

    PYTHONPATH=src:TRL_DIR .venv/bin/python bench/dpo_vs_trl.py --threads 1     # defaults: GPT-2 4x256, 8k vocab
    .venv-bench/bin/python bench/dpo_vs_trl.py --steps 40 --repeats 3           # after `make bench-venv`

What is measured: each run is a fresh subprocess with the data, the freshly initialised model and the
helpers of bench/sft_rm_vs_trl.py (fp32, AdamW at a constant LR, dropout as the model has it,
one checkpoint at the end). Both libraries compute the reference log-probs once before training
(TRL: `precompute_ref_log_probs=True`, done when the trainer is built); only the training call
(`Engine.fit` / `Trainer.train`) is timed, so the figure is the DPO loop itself: one forward of
chosen + rejected, the loss and the update. Throughput is preference pairs per second and per
CPU-second; memory is the peak resident set size during that call and its growth. TRL tokenizes
the rendered prompt and answer texts itself, rlhfkit uses `encode_example`: the sequences can
differ by a token or so. Runs alternate between the libraries; the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from sft_rm_vs_trl import PeakRSS, make_assets, run_interleaved, train_config, trl_kwargs

BETA = 0.1


def ours_dpo(args: argparse.Namespace, root: Path, out: Path) -> PeakRSS:
    from rlhfkit.data.batching import sft_collate
    from rlhfkit.data.chat import encode_example
    from rlhfkit.engine.trainer import Engine
    from rlhfkit.models.loading import ModelConfig, disable_dropout, load_causal_lm
    from rlhfkit.stages.dpo import DPOOptions, dpo_collate, dpo_terms, reference_logps

    data = json.loads((root / "data.json").read_text())["pairs"]
    model, tok = load_causal_lm(ModelConfig(path=str(root / "model")))
    disable_dropout(model)  # as the stage does, and TRL's `disable_dropout=True`
    enc = {
        side: [encode_example(tok, p["prompt"], p[side], max_length=args.max_length)[:2] for p in data]
        for side in ("chosen", "rejected")
    }
    base = sft_collate(tok.pad_token_id)
    ref = {side: reference_logps(model, seqs, base, args.batch_size, "cpu") for side, seqs in enc.items()}
    model.train()
    items = [
        {"chosen": c, "rejected": r, "margin": 0.0, "ref_chosen": float(rc), "ref_rejected": float(rr)}
        for c, r, rc, rr in zip(enc["chosen"], enc["rejected"], ref["chosen"], ref["rejected"], strict=True)
    ]
    opts = DPOOptions(beta=BETA)

    def loss_fn(mdl: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        losses, _, _ = dpo_terms(mdl, batch, opts)
        return losses.mean(), {}

    engine = Engine(train_config(args), out)
    with PeakRSS() as m:
        engine.fit(model, items, dpo_collate(base), loss_fn)
    return m


def trl_dpo(args: argparse.Namespace, root: Path, out: Path) -> PeakRSS:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.data.chat import PROMPT_TEMPLATE
    from rlhfkit.models.loading import load_tokenizer

    data = json.loads((root / "data.json").read_text())["pairs"]
    tok = load_tokenizer(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    model.resize_token_embeddings(len(tok), mean_resizing=False)  # the pad token, as load_causal_lm adds
    rows = {
        "prompt": [PROMPT_TEMPLATE.format(prompt=p["prompt"]) for p in data],
        "chosen": [" " + p["chosen"] for p in data],
        "rejected": [" " + p["rejected"] for p in data],
    }
    cfg = DPOConfig(**trl_kwargs(args, out), beta=BETA, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict(rows), processing_class=tok)
    with PeakRSS() as m:
        trainer.train()
    return m


RUNS = {"rlhfkit-dpo": ours_dpo, "trl-dpo": trl_dpo}


def worker(args: argparse.Namespace) -> None:
    """One measured run, in its own process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        m = RUNS[args.worker](args, Path(args.assets), Path(out))
    result = {
        "pairs_per_s": args.steps * args.batch_size / m.seconds,
        "pairs_per_cpu_s": args.steps * args.batch_size / m.cpu_seconds,
        "peak_rss_mb": m.peak / 2**20,
        "train_rss_growth_mb": (m.peak - m.before) / 2**20,
    }
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        make_assets(Path(tmp), args)
        common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k != "worker"]
        results = run_interleaved(__file__, list(RUNS), tmp, common, args.repeats, "pairs_per_s")

    med = {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for name, rows in results.items()}
    print(
        f"\nDPO, GPT-2 {args.layers}x{args.d_model}, batch {args.batch_size} pairs, {args.steps} steps, max length "
        f"{args.max_length}, {args.threads} threads, median of {args.repeats}\n"
    )
    header = f"{'metric':<30}{'rlhfkit':>10}{'TRL':>10}{'rlhfkit/TRL':>13}"
    print(header + "\n" + "-" * len(header))
    ours, trl = med["rlhfkit-dpo"], med["trl-dpo"]
    for key, label in (
        ("pairs_per_s", "pairs/s (wall clock)"),
        ("pairs_per_cpu_s", "pairs/CPU-second"),
        ("peak_rss_mb", "peak RSS (MB)"),
        ("train_rss_growth_mb", "RSS growth in training (MB)"),
    ):
        print(f"{label:<30}{ours[key]:>10.1f}{trl[key]:>10.1f}{ours[key] / trl[key]:>13.2f}")


if __name__ == "__main__":
    main()
