"""The HTML report of a run: one self-contained file (plots inlined as PNG), opens in any browser.

Sections: the over-optimisation picture (proxy reward and gold utility vs PPO step and vs KL,
with the stopping point and the gold peak marked: the reward-hacking monitor), training curves
(KL, entropy, length), reward-model accuracy next to the labelers' agreement ceiling, labeler
agreement, before/after samples for the same prompts, and toxicity before/after.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def hacking_check(steps: Sequence[int], proxy: Sequence[float], gold: Sequence[float], tol: float = 0.1) -> dict:
    """Reward hacking = the proxy still rises after the gold utility has peaked and fallen.

    Returns the gold peak's step and whether, after it, the proxy rose while gold fell by more
    than `tol` (in gold units): the point where a person should have stopped training.
    """
    if not gold:
        return {"peak_step": None, "hacking": False}
    peak = max(range(len(gold)), key=lambda i: gold[i])
    fell = gold[-1] < gold[peak] - tol
    rose = proxy[-1] > proxy[peak]
    return {"peak_step": steps[peak], "peak_gold": gold[peak], "final_gold": gold[-1], "hacking": bool(fell and rose)}


def plot_overoptimisation(
    steps: Sequence[int],
    proxy: Sequence[float],
    gold: Sequence[float],
    kl: Sequence[float],
    stop_step: int | None,
    peak_step: int | None,
) -> str:
    """Proxy (reward model) and gold utility vs PPO step and vs √KL (Gao et al., 2022)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ax.plot(steps, proxy, label="proxy reward (reward model)", color="tab:blue")
    ax.plot(steps, gold, label="gold utility (independent judges)", color="tab:orange")
    if stop_step is not None:
        ax.axvline(stop_step, color="grey", ls="--", label=f"stopped (step {stop_step})")
    if peak_step is not None:
        ax.axvline(peak_step, color="tab:green", ls=":", label=f"gold peak (step {peak_step})")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.set_title("reward vs step")
    ax = axes[1]
    root_kl = [max(k, 0.0) ** 0.5 for k in kl]
    ax.plot(root_kl, proxy, "o-", ms=3, label="proxy", color="tab:blue")
    ax.plot(root_kl, gold, "o-", ms=3, label="gold", color="tab:orange")
    ax.set_xlabel("√KL(policy ‖ reference)")
    ax.set_title("reward vs distance from the reference")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_curves(rows: Sequence[dict[str, Any]], keys: Sequence[tuple[str, str]]) -> str:
    """One small panel per (metric key, title) from metrics.jsonl rows."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3))
    for ax, (key, title) in zip(axes if len(keys) > 1 else [axes], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if pts:
            ax.plot(*zip(*pts, strict=True))
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    return _png(fig)


def plot_bars(values: dict[str, float], title: str, ylabel: str, ceiling: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(values), list(values.values()), color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(values)])
    if ceiling is not None:
        ax.axhline(ceiling, color="black", ls="--", label=f"labelers' agreement {ceiling:.2f}")
        ax.legend(fontsize=8)
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return _png(fig)


def plot_tradeoff(points: dict[str, tuple[float, float, float, float, float, float]], xlabel: str, ylabel: str) -> str:
    """One point per model: (x, x_low, x_high, y, y_low, y_high), with its CIs as error bars
    (e.g. gold utility gained vs KL spent, per algorithm)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, (x, xl, xh, y, yl, yh)) in enumerate(points.items()):
        ax.errorbar(
            [x],
            [y],
            xerr=[[x - xl], [xh - x]],
            yerr=[[y - yl], [yh - y]],
            fmt="o",
            capsize=3,
            color=f"C{i}",
            label=name,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _png(fig)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Report:
    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, heading: str, body_html: str) -> None:
        self.sections.append((heading, body_html))

    def html(self) -> str:
        css = (
            "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
            "h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}"
            "table{border-collapse:collapse;font-size:.9em;margin:.5em 0}"
            "td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}"
            "th{background:#f5f5f5}img{max-width:100%}.warn{color:#b00;font-weight:bold}.ok{color:#070}"
            "td.text{max-width:420px;white-space:pre-wrap}"
        )
        body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in self.sections)
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{css}</style></head><body><h1>{html.escape(self.title)}</h1>{body}</body></html>"
        )
