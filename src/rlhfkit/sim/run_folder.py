"""Where `rlhfkit demo` keeps each stage's output inside one run folder.

One place that spells the layout out: the demo writes there, the report and the tests read there.
Each stage writes into its own folder (`rlhfkit STAGE output_dir=...`), with its `results.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhfkit.stages.loop import Round

STAGES = ("pretrain", "sft", "generate", "feedback", "aggregate", "rm", "ppo", "rloo", "grpo", "dpo", "eval")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def stage(self, name: str) -> Path:
        """The output_dir of stage `name` (one of STAGES), or `data` for the generated corpus."""
        return self.root / name

    def results(self, name: str) -> Path:
        return self.stage(name) / "results.json"

    def model(self, name: str) -> Path:
        """The model a training stage (pretrain, sft, rm, ppo, rloo, grpo, dpo) saved."""
        return self.stage(name) / "model"

    def round(self, n: int) -> Round:
        """Round n of the demo's rounds (`rounds=N`). Round 1 is the demo's own stages (generate …
        ppo, eval; its policy is `ppo`), with its summary in `round-1/`; rounds 2+ are `rlhfkit
        loop` rounds in `round-N/`, built on it."""
        from rlhfkit.stages.loop import Round

        first = Round(self.root, 1)
        first.name, first.labeled = "ppo", self.completions
        first.aggregate, first.pairs = self.stage("aggregate"), self.pairs
        first.rm, first.ppo, first.eval = self.stage("rm"), self.stage("ppo"), self.stage("eval")
        first.first = first  # its siblings find it
        return first.sibling(n)

    def rounds(self) -> list[Round]:
        """The rounds finished so far (each with its `round.json`), in order."""
        done = []
        while (r := self.round(len(done) + 1)).row.exists():
            done.append(r)
        return done

    @property
    def completions(self) -> Path:
        return self.stage("generate") / "completions.jsonl"

    @property
    def feedback_summary(self) -> Path:
        return self.stage("feedback") / "summary.json"

    @property
    def pairs(self) -> Path:
        return self.stage("aggregate") / "pairs.jsonl"

    @property
    def agreement(self) -> Path:
        return self.stage("aggregate") / "agreement.json"

    @property
    def timings(self) -> Path:
        """Wall-clock and CPU seconds of each stage that ran."""
        return self.root / "timings.json"

    @property
    def summary(self) -> Path:
        """The report's numbers, machine-readable (the algorithm comparison, the stage times)."""
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"
