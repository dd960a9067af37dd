"""Rounds on the demo task: does a second round of feedback, on the PPO policy's own outputs, help?

Builds the demo's start (its corpus, the shipped base model, SFT) in OUT/start, then runs
`rlhfkit loop` from that SFT model with the demo's reward-model, PPO and eval settings: `--rounds`
rounds of `--prompts-per-round` fresh prompts from the demo's labeling pool, candidates from the
current policy (2), the previous one (1) and SFT (1), labeled by the simulated panel over HTTP on
an embedded server, evaluated on `--eval-prompts` held-out prompts (100) x `--eval-samples` (2).
Prints one row per round.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/loop_rounds.py --seed 0 --out runs/rounds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhfkit.config import load_config
from rlhfkit.data.corpus import build_default_data
from rlhfkit.sim.run_folder import RunFolder
from rlhfkit.stages import demo, loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/rounds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts-per-round", type=int, default=150)
    ap.add_argument(
        "--pool-add-ppo",
        action="store_true",
        help="label from the demo's labeling prompts and its PPO prompts (800, not 300): room for larger rounds",
    )
    ap.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts in each round's evaluation")
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt (more: narrower CIs)")
    args = ap.parse_args()
    out = Path(args.out)
    d = demo.Config(output_dir=str(out / f"start-s{args.seed}"), seed=args.seed)
    run = RunFolder(Path(d.output_dir))
    data = build_default_data(run.stage("data"), seed=d.pretrain.data.corpus_seed)
    sft_model = demo.policy_stages(d, demo.Runner(run, True), data)

    pool = data["prompts_label"]
    if args.pool_add_ppo:
        pool = out / f"pool-s{args.seed}.jsonl"
        pool.write_text(data["prompts_label"].read_text() + data["prompts_ppo"].read_text())
    overrides = [
        f"output_dir={out / f's{args.seed}'}",
        f"seed={args.seed}",
        f"sft={sft_model}",
        f"pool={pool}",
        f"prompts_per_round={args.prompts_per_round}",
        f"rounds={args.rounds}",
    ]
    cfg = load_config(loop.Config, None, overrides)
    cfg.rm = loop.RoundRMConfig.model_validate(d.rm.model_dump())
    cfg.ppo = loop.RoundPPOConfig.model_validate({**d.ppo.model_dump(), "prompts": str(data["prompts_ppo"])})
    heldout = {"prompts": str(data["prompts_heldout"]), "limit": args.eval_prompts}
    cfg.eval = cfg.eval.model_validate({**d.eval.model_dump(), **heldout, "samples_per_prompt": args.eval_samples})
    sources = (("current", 2), ("previous", 1), ("sft", 1))
    cfg.candidates = [loop.CandidateSource(model=m, k=k, sampling=d.generate.sampling) for m, k in sources]
    loop.run(cfg)

    rows = json.loads((Path(cfg.output_dir) / "results.json").read_text())["rounds"]
    print(f"\nseed {args.seed}: round, gold vs SFT (95% CI), gold vs previous round (95% CI),")
    print("  RM held-out accuracy, previous RM's accuracy on the new pairs")
    for r in rows:
        sft, prev = r["vs_sft"]["gold"], r.get("vs_previous", {}).get("gold")
        vs_prev = f"{prev['mean_diff']:+.3f} [{prev['ci_low']:+.3f}, {prev['ci_high']:+.3f}]" if prev else "-"
        print(
            f"  {r['round']}: {sft['mean_diff']:+.3f} [{sft['ci_low']:+.3f}, {sft['ci_high']:+.3f}]  {vs_prev}  "
            f"{r['rm_accuracy_heldout']:.3f}  {r.get('previous_rm_accuracy', float('nan')):.3f}"
        )


if __name__ == "__main__":
    main()
