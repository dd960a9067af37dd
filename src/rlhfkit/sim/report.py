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
from rlhfkit.eval.report import (
    Report,
    hacking_check,
    plot_bars,
    plot_curves,
    plot_overoptimisation,
    plot_tradeoff,
    table,
)
from rlhfkit.models.device import resolve_device
from rlhfkit.sim.run_folder import RunFolder

KL_BOOTSTRAP = 2000  # resamples of the held-out prompts for the KL's confidence interval


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


def algorithm_comparison(run: RunFolder, timings: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each trained model against the first evaluated one (SFT) on the held-out prompts: gold utility
    and toxicity as paired differences with bootstrap CIs (eval's), KL to SFT as a mean with a
    bootstrap CI over prompts (from eval's per-sample KL), and its training stage's time."""
    import numpy as np

    from rlhfkit.stages.eval import paired_comparison

    ev = _json(run.results("eval"))
    if not ev:
        return {}
    names = list(ev["models"])
    samples = [json.loads(line) for line in (run.stage("eval") / "samples.jsonl").read_text().splitlines() if line]
    out = {}
    for name in names[1:]:
        m, comp = ev["models"][name], ev["comparisons"][f"{name}_vs_{names[0]}"]
        kl = np.array([r[name]["kl"] for r in samples]).reshape(ev["n_prompts"], -1).mean(1)  # per prompt
        kl_ci = paired_comparison(np.zeros_like(kl), kl, KL_BOOTSTRAP, seed=0)
        out[name] = {
            "gold": m.get("gold"),
            "gold_vs_sft": comp.get("gold"),
            "toxicity": m.get("toxicity"),
            "toxicity_vs_sft": comp.get("toxicity"),
            "kl": {"mean": kl_ci["mean_diff"], "ci_low": kl_ci["ci_low"], "ci_high": kl_ci["ci_high"]},
            "length": m.get("length"),
            "train_seconds": timings.get(name, {}).get("seconds"),
            "train_cpu_seconds": timings.get(name, {}).get("cpu_seconds"),
        }
    return out


def _ci(c: dict[str, float] | None, key: str = "mean_diff") -> str:
    return f"{c[key]:+.3f} ({c['ci_low']:+.3f} .. {c['ci_high']:+.3f})" if c else "-"


def _triple(c: dict[str, float]) -> tuple[float, float, float]:
    return c["mean_diff"], c["ci_low"], c["ci_high"]


def algorithm_section(algos: dict[str, dict[str, Any]]) -> str:
    """The comparison table and the gold-gained vs KL-spent plot."""
    rows = []
    for name, a in algos.items():
        cpu, wall = a["train_cpu_seconds"], a["train_seconds"]
        rows.append(
            [
                name,
                _ci(a["gold_vs_sft"]),
                _ci(a["toxicity_vs_sft"]),
                _ci(a["kl"], "mean"),
                a["length"],
                f"{cpu:.0f} ({wall:.0f})" if cpu is not None else "reused (not timed)",
            ]
        )
    headers = ["algorithm", "gold vs SFT (95% CI)", "toxicity vs SFT (95% CI)", "KL to SFT (95% CI)", "length"]
    body = table([*headers, "training CPU s (wall s)"], rows)
    points = {
        name: (a["kl"]["mean"], a["kl"]["ci_low"], a["kl"]["ci_high"], *_triple(a["gold_vs_sft"]))
        for name, a in algos.items()
        if a["gold_vs_sft"]
    }
    if points:
        body += plot_tradeoff(points, "KL to SFT per response", "gold utility vs SFT")
    return body + (
        "<p>Every algorithm starts from the same SFT model and learns from the same labels: PPO, RLOO and GRPO "
        "through the same reward model, DPO from the aggregated pairs directly. Gold utility and toxicity are "
        "paired differences with SFT per held-out prompt; up and to the left is better (more gold for less "
        "KL). CPU time is the training stage's process time, all threads.</p>"
    )


def overoptimisation(ppo_dir: Path) -> str | None:
    """The proxy reward and the gold utility along one PPO run (from the responses it logged), KL
    to its reference, and the hacking verdict; None when the run logged no samples."""
    metrics_file, samples = ppo_dir / "metrics.jsonl", ppo_dir / "samples.jsonl"
    metrics = [m for m in read_metrics(metrics_file) if "reward" in m] if metrics_file.exists() else []
    if not metrics or not samples.exists():
        return None
    ppo = _json(ppo_dir / "results.json")
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
    return (
        plot_overoptimisation(steps, proxy, gold_v, kl, ppo.get("steps"), check["peak_step"])
        + verdict
        + f"<p>PPO stopped after {ppo.get('steps')} steps: {html.escape(str(ppo.get('stop_reason')))}.</p>"
    )


def _eval_samples(eval_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines() if line]


def answer_kinds(run: RunFolder) -> dict[str, dict[str, float]]:
    """Share of rude and of off-topic answers on the held-out prompts (`rlhfkit.eval.gold.answer_kinds`):
    every model of the demo's evaluation (SFT, round 1's `ppo`, the other algorithms) and each later
    round's policy, from its own round's evaluation."""
    from rlhfkit.eval.gold import answer_kinds as kinds

    sources = [(run.stage("eval"), list(_json(run.results("eval")).get("models", {})))]
    sources += [(r.eval, [r.name]) for r in run.rounds()[1:]]
    out = {}
    for folder, names in sources:
        rows = _eval_samples(folder) if names else []
        for name in names:
            out[name] = kinds([r[name]["toxicity"] for r in rows], [r[name]["relevance"] for r in rows])
    return out


def rounds_section(run: RunFolder, kinds: dict[str, dict[str, float]]) -> str:
    """Rounds: the loop's table, each reward model on its own round vs the next round's pairs, the
    rude/off-topic table, each round's PPO picture and the same held-out prompts answered by SFT
    and by each round's policy."""
    from rlhfkit.eval.gold import OFF_TOPIC_RELEVANCE, RUDE_P_OFFENSIVE
    from rlhfkit.loop.report import rounds_table

    rounds = run.rounds()
    rows = [_json(r.row) for r in rounds]
    body = rounds_table(rows)
    shift = [
        [f"round {a['round']}", a["rm_accuracy_heldout"], b.get("previous_rm_accuracy")]
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    body += "<h3>Each reward model on its own round's held-out pairs vs on the next round's pairs</h3>"
    body += table(["reward model of", "own round (held-out)", "next round (all its pairs)"], shift)
    names = ["sft", *(r.name for r in rounds)]
    labels = ["SFT", *(f"round {r.n}" for r in rounds)]
    body += (
        f"<h3>Rude and off-topic answers (gold judges; rude: P(offensive) &gt; {RUDE_P_OFFENSIVE:g}, "
        f"off-topic: MiniLM relevance &lt; {OFF_TOPIC_RELEVANCE:g})</h3>"
    )
    shares = [
        [label, kinds[n]["answers"], f"{kinds[n]['rude']:.1%}", f"{kinds[n]['off_topic']:.1%}"]
        for label, n in zip(labels, names, strict=True)
    ]
    body += table(["policy", "answers", "rude", "off-topic"], shares)
    for r in rounds:
        picture = overoptimisation(r.ppo)
        if picture:
            body += f"<h3>Round {r.n}: proxy reward vs gold utility along its PPO (KL to SFT)</h3>" + picture
    # the same held-out prompts (first sample) answered by SFT and by each round's policy
    answers: dict[str, dict[str, Any]] = {}
    for r in rounds:
        for row in _eval_samples(r.eval):
            if row.get("sample", 0) == 0:
                answers.setdefault(row["prompt_id"], {"prompt": row["prompt"], "sft": row["sft"]})[r.name] = row[r.name]
    samples = []
    for a in list(answers.values())[:8]:
        prompt = a["prompt"] if isinstance(a["prompt"], str) else a["prompt"][-1]["content"]
        samples.append([prompt] + [f"{a[n]['response']}  [gold {a[n].get('gold', 0):+.2f}]" for n in names])
    body += "<h3>Before / after by round, same prompts</h3>"
    return body + table(["prompt", *labels], samples).replace("<td>", "<td class='text'>")


def write_demo_report(run_dir: Path) -> Path:
    run = RunFolder(Path(run_dir))
    report = Report("rlhfkit demo: RLHF end to end on the embedded default")
    timings = _json(run.timings)
    ev = _json(run.results("eval"))
    agreement = _json(run.agreement)
    rm = _json(run.results("rm"))
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
        aligned = ", ".join(list(ev["models"])[1:])
        report.add(f"Baseline (SFT) vs aligned ({aligned}) on {ev['n_prompts']} held-out prompts{each}", body)
    algos = algorithm_comparison(run, timings)
    if len(algos) > 1:
        report.add("Algorithms compared: the same SFT model, the same labels", algorithm_section(algos))

    # ---- over-optimisation picture
    picture = overoptimisation(run.stage("ppo"))
    if picture:
        report.add("Proxy reward vs gold utility along PPO (the reward-hacking monitor)", picture)
        metrics = [m for m in read_metrics(run.stage("ppo") / "metrics.jsonl") if "reward" in m]
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
    for k, v in timings.items():
        info.append([f"time: {k}", f"{v['seconds']:.0f} s (CPU {v['cpu_seconds']:.0f} s)"])
    if info:
        report.add("Run", table(["", ""], info))
    kinds = answer_kinds(run)
    rounds = run.rounds()
    if len(rounds) > 1:
        report.add(f"Rounds: {len(rounds)} rounds of feedback on the current policy", rounds_section(run, kinds))
    summary = {
        "algorithms": algos,
        "rounds": [_json(r.row) for r in rounds],
        "answers": kinds,
        "timings": timings,
    }
    atomic_write_text(run.summary, json.dumps(summary, indent=2))
    path = run.report
    atomic_write_text(path, report.html())
    return path
