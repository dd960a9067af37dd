"""The report of a demo run folder: reads what each stage wrote and lays it out in `report.html`.

The gold utility along PPO is computed here, after the fact, from the responses PPO logged at
each step (`ppo/samples.jsonl`): the trainer itself never sees the gold judges.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rlhfkit.config import atomic_write_text
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.eval.report import Report, hacking_check, plot_bars, plot_curves, plot_overoptimisation, table
from rlhfkit.models.device import resolve_device
from rlhfkit.sim.run_folder import RunFolder


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def gold_along_ppo(samples_path: Path) -> dict[int, float]:
    """Mean gold utility of the responses logged at each PPO step."""
    from rlhfkit.eval.gold import GoldJudge

    rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    judge = GoldJudge(device=resolve_device("auto"))
    scores = judge.score([r["prompt"] for r in rows], [r["response"] for r in rows]).tolist()
    by_step: dict[int, list[float]] = defaultdict(list)
    for r, s in zip(rows, scores, strict=True):
        by_step[r["step"]].append(s)
    return {step: sum(v) / len(v) for step, v in sorted(by_step.items())}


def write_demo_report(run_dir: Path, timings: dict[str, float] | None = None) -> Path:
    run = RunFolder(Path(run_dir))
    report = Report("rlhfkit demo: RLHF end to end on the embedded default")
    ev = _json(run.results("eval"))
    agreement = _json(run.agreement)
    rm = _json(run.results("rm"))
    ppo = _json(run.results("ppo"))
    pre = _json(run.results("pretrain"))

    # ---- headline numbers
    rows = []
    if ev:
        for name, m in ev["models"].items():
            rows.append([name, m.get("gold"), m.get("reward"), m.get("toxicity"), m.get("kl"), m.get("length")])
        body = table(["model", "gold utility", "reward (RM)", "toxicity", "KL to SFT", "length (tokens)"], rows)
        for pair, comp in ev["comparisons"].items():
            for key, c in comp.items():
                body += (
                    f"<p>{html.escape(pair)} by <b>{key}</b>: win rate {c['win_rate']:.2f}, mean difference "
                    f"{c['mean_diff']:+.3f} (95% bootstrap CI {c['ci_low']:+.3f} .. {c['ci_high']:+.3f})</p>"
                )
        n = ev.get("samples_per_prompt", 1)
        each = f", {n} samples each (compared per prompt)" if n > 1 else ""
        report.add(f"Baseline (SFT) vs aligned (PPO) on {ev['n_prompts']} held-out prompts{each}", body)

    # ---- over-optimisation picture
    metrics_file = run.stage("ppo") / "metrics.jsonl"
    metrics = read_metrics(metrics_file) if metrics_file.exists() else []
    metrics = [m for m in metrics if "reward" in m]
    samples = run.stage("ppo") / "samples.jsonl"
    if metrics and samples.exists():
        gold = gold_along_ppo(samples)
        steps = [s for s in gold if any(m["step"] == s for m in metrics)]
        by_step = {m["step"]: m for m in metrics}
        proxy = [by_step[s]["reward"] for s in steps]
        gold_v = [gold[s] for s in steps]
        kl = [by_step[s]["kl"] for s in steps]
        check = hacking_check(steps, proxy, gold_v)
        verdict = (
            "<p class='warn'>Reward hacking: the proxy reward kept rising after the gold utility peaked "
            f"at step {check['peak_step']}; stop there.</p>"
            if check["hacking"]
            else f"<p class='ok'>No reward hacking seen: gold utility peaked at step {check['peak_step']} "
            "and had not fallen while the proxy rose.</p>"
        )
        report.add(
            "Proxy reward vs gold utility along PPO (the reward-hacking monitor)",
            plot_overoptimisation(steps, proxy, gold_v, kl, ppo.get("steps"), check["peak_step"])
            + verdict
            + f"<p>PPO stopped after {ppo.get('steps')} steps: {html.escape(str(ppo.get('stop_reason')))}.</p>",
        )
        report.add(
            "PPO training curves",
            plot_curves(
                metrics,
                [("kl", "KL per response"), ("entropy", "entropy"), ("response_length", "length"), ("beta", "β")],
            ),
        )

    # ---- reward model vs the labelers' ceiling
    if rm and agreement:
        ceiling = agreement.get("pairwise_agreement_strict")
        report.add(
            "Reward model accuracy vs the labelers' own agreement",
            plot_bars({"RM held-out accuracy": rm.get("valid_accuracy", 0.0)}, "pairwise accuracy", "accuracy", ceiling)
            + "<p>A reward model cannot be much more accurate than its labelers agree with each other "
            "(strict pairwise agreement between labelers, ties excluded, is the dashed line).</p>",
        )
    if agreement:
        body = table(
            ["measure", "value"],
            [
                ["judgments", agreement["judgments"]],
                ["items with 2+ labelers", agreement["items_with_2plus"]],
                ["pairwise agreement (ties count)", agreement["pairwise_agreement"]],
                ["pairwise agreement (strict)", agreement["pairwise_agreement_strict"]],
                ["Krippendorff's α (ordinal)", agreement["krippendorff_alpha_ordinal"]],
                ["Kendall's W (mean per item)", agreement["kendalls_w_mean"]],
            ],
        )
        body += table(
            ["labeler", "items", "agreement with the others' consensus"],
            [[n, v["items_judged"], v["agreement"]] for n, v in agreement["labelers"].items()],
        )
        report.add("Labeler agreement", body)

    # ---- toxicity and samples
    if ev:
        report.add(
            "Toxicity before and after",
            plot_bars({n: m.get("toxicity", 0.0) for n, m in ev["models"].items()}, "toxicity", "P(offensive)"),
        )
        first = [json.loads(line) for line in (run.stage("eval") / "samples.jsonl").read_text().splitlines()]
        names = list(ev["models"])
        rows = []
        for r in [r for r in first if r.get("sample", 0) == 0][:12]:
            prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
            rows.append([prompt] + [f"{r[n]['response']}  [gold {r[n].get('gold', 0):+.2f}]" for n in names])
        report.add("Before / after, same prompts", table(["prompt", *names], rows).replace("<td>", "<td class='text'>"))

    # ---- where the time went
    info = []
    if pre:
        info.append(
            ["pretraining perplexity (held-out / unigram)", f"{pre['valid_ppl']:.2f} / {pre['unigram_ppl']:.2f}"]
        )
    for k, v in (timings or {}).items():
        info.append([f"time: {k}", f"{v:.0f} s"])
    if info:
        report.add("Run", table(["", ""], info))
    path = run.report
    atomic_write_text(path, report.html())
    return path
