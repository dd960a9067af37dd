"""Metrics a person can plot: one JSON object per line in `metrics.jsonl` (experiment trackers such as
TensorBoard are the engine's `report_to`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rlhfkit.config import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping the row
    return value


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, filename: str = "metrics.jsonl"):
        self.path = Path(out_dir) / filename
        self.enabled = enabled

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows the killed run logged after its last checkpoint (they will be redone)."""
        if self.enabled:
            truncate_jsonl(self.path, step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the rows of a JSONL log whose "step" is at most `step` (atomically; no file, nothing to do).

    Why: a resumed run redoes the steps after its last checkpoint, and a log must never hold a step twice.
    """
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
