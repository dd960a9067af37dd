"""Data tools: check a file before a long run, and turn rankings into preference pairs.

    rlhfkit data validate FILE [kind=KIND]
    rlhfkit data pairs rankings=R.jsonl completions=C.jsonl output=PAIRS.jsonl
    rlhfkit data export FILE output=TRL.jsonl [prompt_template=...]

`validate` reads the whole file (JSONL or a `datasets` folder) with the same checks every stage
uses; without `kind` the format is guessed from the first record. `pairs` writes every pair of
differently ranked candidates, preferred first; ties and rankings marked unusable give no pairs.
`export` turns pairs, KTO rows (`{prompt, completion, label}`) or ratings into a file TRL's
trainers take as it is: prompts rendered as the policy sees them, plus `raw_prompt`, the same
columns on every row (`rlhfkit.data.trl`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhfkit.config import StrictModel
from rlhfkit.data.chat import PROMPT_TEMPLATE
from rlhfkit.data.formats import FORMATS, Unpaired, detect_kind, first_record, read_records, write_jsonl, write_records
from rlhfkit.data.trl import trl_pairs, trl_ratings, trl_unpaired
from rlhfkit.errors import UserError
from rlhfkit.labels.pairs import pairs_with_counts


def validate(source: str, kind: str | None = None, strict: bool = False) -> str:
    """Read and check a whole file; returns the summary line."""
    if kind is None:
        try:
            kind = detect_kind(first_record(source))
        except ValueError as e:
            raise UserError(f"{source}: first record: {e}; set kind=...") from None
    records = read_records(source, kind, strict=strict)
    return f"OK: {len(records)} records of {kind}"


def pairs(rankings: str, completions: str, output: str) -> str:
    """Write the pairs of `rankings` (of `completions`) to `output`; returns the summary line.

    Everything is checked before the output is written, so a bad input leaves no file behind.
    """
    result, counts = pairs_with_counts(read_records(rankings, "rankings"), read_records(completions, "completions"))
    if not result:
        raise UserError(f"{rankings}: no pairs: every ranking is all ties or marked unusable")
    write_records(output, result)
    same_text = counts["identical_text_pairs_skipped"]
    return (
        f"wrote {len(result)} pairs to {output}: {counts['tied_pairs_dropped']} tied pairs dropped, "
        f"{counts['rankings_unusable_skipped']} unusable rankings skipped"
        + (f", {same_text} pairs of identical texts skipped" if same_text else "")
    )


def export(source: str, output: str, template: str = PROMPT_TEMPLATE) -> str:
    """Write `source` (pairs, KTO rows or ratings) as TRL rows to `output`; returns the summary line."""
    first = first_record(source)
    if "score" in first:
        rows = trl_ratings(read_records(source, "ratings", strict=False), template)
    else:
        records = read_records(source, "pairs", strict=False, pair_unpaired=False)
        unpaired = [r for r in records if isinstance(r, Unpaired)]
        if unpaired and len(unpaired) < len(records):
            raise UserError(f"{source}: mixes pairs and unpaired {{prompt, completion, label}} rows; export them apart")
        rows = trl_unpaired(unpaired, template) if unpaired else trl_pairs(records, template)
    write_jsonl(output, rows)
    return f"wrote {len(rows)} TRL rows to {output}"


class ValidateConfig(StrictModel):
    """`rlhfkit data validate FILE`: read and check a whole data file before a long run."""

    file: str = Field(description="JSONL file or datasets folder")
    kind: Literal[tuple(FORMATS)] | None = Field(  # type: ignore[valid-type]  (the format names)
        None, description="the format; empty = guessed from the first record"
    )
    strict: bool = Field(False, description="unused columns are an error (default: ignored, named once in the log)")


class PairsConfig(StrictModel):
    """`rlhfkit data pairs`: rankings of K completions -> preference pairs, preferred first."""

    rankings: str = Field(description="rankings JSONL (or datasets folder)")
    completions: str = Field(description="the completions that were ranked")
    output: str = Field(description="pairs JSONL to write")


class ExportConfig(StrictModel):
    """`rlhfkit data export FILE output=OUT.jsonl`: pairs, KTO rows or ratings -> a file for TRL's trainers."""

    file: str = Field(description="pairs, KTO {prompt, completion, label} or ratings (JSONL or datasets folder)")
    output: str = Field(description="JSONL to write")
    prompt_template: str = Field(PROMPT_TEMPLATE, description="the policy's ('chat': conversations for TRL to render)")


def run_export(cfg: ExportConfig) -> None:
    print(export(cfg.file, cfg.output, cfg.prompt_template))


def run_validate(cfg: ValidateConfig) -> None:
    print(validate(cfg.file, cfg.kind, cfg.strict))


def run_pairs(cfg: PairsConfig) -> None:
    print(pairs(cfg.rankings, cfg.completions, cfg.output))
