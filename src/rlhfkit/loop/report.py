"""`OUTPUT_DIR/report.html` of `rlhfkit loop`: the per-round table and its curves (one self-contained page)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rlhfkit.config import atomic_write_text
from rlhfkit.eval.report import Report, plot_curves, table


def _ci(c: dict[str, Any]) -> str:
    g = c.get("gold")
    if not g:
        return "-"
    return f"{g['mean_diff']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}], wins {g['win_rate']:.2f}"


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """One line per round (`round.json`): labels, reward model, the policy on the held-out prompts;
    `rlhfkit loop`'s report and `rlhfkit demo`'s rounds section."""
    columns: list[tuple[str, Any]] = [
        ("round", lambda r: r["round"]),
        ("items", lambda r: r["items"]),
        ("judgments", lambda r: r["judgments"]),
        ("labeler agreement", lambda r: r["labeler_agreement"]),
        ("RM acc. (held-out)", lambda r: r["rm_accuracy_heldout"]),
        ("previous RM acc. (new pairs)", lambda r: r.get("previous_rm_accuracy", "-")),
        *((key, lambda r, key=key: r[key]) for key in ("gold", "sft_gold", "reward", "toxicity", "kl", "length")),
        ("gold vs SFT (95% CI)", lambda r: _ci(r["vs_sft"])),
        ("gold vs previous (95% CI)", lambda r: _ci(r.get("vs_previous", {}))),
    ]
    headers = [name for name, _ in columns]
    body = [[cell(r) for _, cell in columns] for r in rows]
    note = (
        "<p>Each round's policy on the same held-out prompts. <i>previous RM acc.</i>: the reward model of "
        "the round before, on this round's pairs (samples of policies it never saw). <i>reward</i>: the "
        "round's own reward model (the proxy), so not comparable across rounds; <i>gold</i> is.</p>"
    )
    return note + table(headers, body)


def write_loop_report(root: Path, results: dict[str, Any]) -> Path:
    rows = results["rounds"]
    report = Report(f"rlhfkit loop: {len(rows)} round(s)")
    note = rounds_table(rows)
    if results.get("stopped"):
        note += f"<p>Stopped early: {html.escape(results['stopped'])}</p>"
    report.add("Rounds", note)
    steps = [{**r, "step": r["round"]} for r in rows]
    curves = plot_curves(steps, [("gold", "gold utility"), ("reward", "reward (own RM)"), ("kl", "KL to SFT")])
    report.add("By round", curves)
    path = root / "report.html"
    atomic_write_text(path, report.html())
    return path
