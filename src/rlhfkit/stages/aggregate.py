"""`rlhfkit aggregate`: consensus, agreement and training data from several labelers' rankings.

Reads the raw judgments either from files (`rankings` JSONL, e.g. a `judgments` export, plus the
`completions` they rank) or straight from the feedback database (`db_url` and `project`, and
`batch` to take only some batches' items: records carry no batch, so files are filtered at export), and
writes to `output_dir`:
    consensus.jsonl   per-item consensus ranking (Bradley-Terry), with scores
    pairs.jsonl       preference pairs from the consensus, preferred first (with margins): `rlhfkit rm`'s input
    kto.jsonl         KTO-style {prompt, completion, label}
    trl/pairs.jsonl   the same pairs for TRL's RewardTrainer/DPOTrainer, trl/kto.jsonl for its KTOTrainer:
                      prompts rendered with `prompt_template` as the policy sees them, plus `raw_prompt`
                      (`rlhfkit.data.trl`)
    agreement.json    pairwise agreement, Krippendorff's alpha, Kendall's W, per-labeler agreement
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from sqlalchemy.engine import make_url

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.chat import PROMPT_TEMPLATE
from rlhfkit.data.formats import (
    Completions,
    Ranking,
    Unpaired,
    check_rankings,
    read_records,
    write_jsonl,
    write_records,
)
from rlhfkit.data.trl import trl_pairs, trl_unpaired
from rlhfkit.errors import UserError
from rlhfkit.labels.agreement import agreement_report
from rlhfkit.labels.consensus import DEFAULT_ALPHA, consensus, consensus_pairs, consensus_rows, kto_records


class Config(StrictModel):
    rankings: str | None = Field(None, description="rankings JSONL (raw judgments)")
    completions: str | None = Field(None, description="completions JSONL the rankings refer to")
    db_url: str | None = Field(None, description="or read from the feedback database (default: rlhfkit serve's) ...")
    project: str | None = Field(None, description="... this project (by name)")
    batch: str | None = Field(None, description="... only these batches' items (comma-separated names)")
    output_dir: str = Field("runs/aggregate", description="where the outputs go")
    margin: bool = Field(True, description="give each pair its consensus margin")
    alpha: float = Field(DEFAULT_ALPHA, gt=0, description="Bradley-Terry prior strength")
    prompt_template: str = Field(PROMPT_TEMPLATE, description="the policy's: the trl/ files carry prompts rendered")

    @model_validator(mode="after")
    def _one_source(self) -> Config:
        files = self.rankings is not None or self.completions is not None
        database = self.db_url is not None or self.project is not None
        if files == database:
            raise ValueError("give either rankings= and completions= (files) or db_url= and project= (database)")
        if files and (self.rankings is None or self.completions is None):
            raise ValueError("rankings= and completions= go together")
        if database and self.project is None:
            raise ValueError("db_url= needs project= (the project to aggregate)")
        if files and self.batch is not None:
            raise ValueError(
                "batch= filters a project in the database; rankings files do not name batches "
                "(export one batch with `rlhfkit serve export ... batch=NAME`)"
            )
        return self


def load(config: Config) -> tuple[list[Ranking], list[Completions]]:
    if config.rankings is not None and config.completions is not None:
        rankings = read_records(config.rankings, "rankings")
        completions = read_records(config.completions, "completions")
        check_rankings(rankings, completions, source=config.rankings)
        return rankings, completions
    from rlhfkit.feedback import service
    from rlhfkit.feedback.db import Database, normalize_url
    from rlhfkit.feedback.settings import default_db_url, display_url

    url = normalize_url(config.db_url or default_db_url())  # the same default as `rlhfkit serve`
    shown = display_url(url)
    print(f"database: {shown}", file=sys.stderr)
    database = make_url(url).database
    if url.startswith("sqlite") and not Path(str(database)).is_file():  # not a new, empty file
        raise UserError(f"{shown}: no such database (set db_url=, or $RLHFKIT_HOME as for `rlhfkit serve`)")
    db = Database(url)
    try:
        with db.session() as s:
            project = service.find_project(s, str(config.project))
            batches = service.batch_names([config.batch] if config.batch is not None else None, "batch=")
            service.check_batches(s, project, batches)
            return service.rankings_of(s, project, batches), service.completions_of(s, project, batches)
    except service.ServiceError as e:
        raise UserError(f"{shown}: {e.message}") from None
    finally:
        db.dispose()


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def run(config: Config) -> dict[str, Any]:
    rankings, completions = load(config)
    if not rankings:
        raise UserError("no judgments to aggregate yet")
    out = Path(config.output_dir)
    cons = consensus(rankings, config.alpha)
    report = agreement_report(rankings, config.alpha)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in consensus_rows(cons))
    atomic_write_text(out / "consensus.jsonl", lines)
    pairs = consensus_pairs(cons, completions, margin=config.margin)
    write_records(out / "pairs.jsonl", pairs)
    kto = kto_records(cons, completions)
    write_jsonl(out / "kto.jsonl", kto)
    write_jsonl(out / "trl" / "pairs.jsonl", trl_pairs(pairs, config.prompt_template))
    unpaired = [Unpaired.model_validate(r) for r in kto]
    write_jsonl(out / "trl" / "kto.jsonl", trl_unpaired(unpaired, config.prompt_template))
    atomic_write_text(out / "agreement.json", json.dumps(report, indent=2) + "\n")
    save_config(config, out)

    print(
        f"{report['judgments']} judgments on {report['items_judged']} items "
        f"({report['items_with_2plus']} with 2+ usable rankings, {report['unusable']} flagged)"
    )
    print(
        f"  pairwise agreement        {_fmt(report['pairwise_agreement'])}  "
        f"(strict {_fmt(report['pairwise_agreement_strict'])})"
    )
    print(f"  Krippendorff alpha (ord)  {_fmt(report['krippendorff_alpha_ordinal'])}")
    print(f"  Krippendorff alpha (pair) {_fmt(report['krippendorff_alpha_nominal_pairs'])}")
    print(f"  Kendall's W (mean)        {_fmt(report['kendalls_w_mean'])}")
    for name, st in report["labelers"].items():
        print(f"  {name:<24} {st['items_judged']:>5} items  agreement with others {_fmt(st['agreement'])}")
    print(f"wrote {len(cons)} consensus rankings, {len(pairs)} pairs, {len(kto)} KTO rows to {out}")
    return report
