"""Data tools: check a file before a long run, and turn rankings into preference pairs.

    rlhfkit data validate FILE [--kind KIND]
    rlhfkit data pairs --rankings R.jsonl --completions C.jsonl --output PAIRS.jsonl

`validate` reads the whole file (JSONL or a `datasets` folder) with the same checks every stage
uses; without --kind the format is guessed from the first record. `pairs` writes every pair of
differently ranked candidates, preferred first; ties and rankings marked unusable give no pairs.
"""

from __future__ import annotations

import argparse

from rlhfkit.data.formats import FORMATS, detect_kind, first_record, read_records, write_records
from rlhfkit.errors import UserError
from rlhfkit.labels.pairs import pairs_with_counts


def validate(source: str, kind: str | None = None) -> str:
    """Read and check a whole file; returns the summary line."""
    if kind is None:
        try:
            kind = detect_kind(first_record(source))
        except ValueError as e:
            raise UserError(f"{source}: first record: {e}; pass --kind") from None
    records = read_records(source, kind)
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


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a data file: prints the record count or the first error")
    v.add_argument("file", help="JSONL file or datasets folder")
    v.add_argument("--kind", choices=list(FORMATS), help="the format (default: guessed from the first record)")
    p = sub.add_parser("pairs", help="turn rankings of K completions into preference pairs")
    p.add_argument("--rankings", required=True, help="rankings JSONL (or datasets folder)")
    p.add_argument("--completions", required=True, help="the completions that were ranked")
    p.add_argument("--output", required=True, help="pairs JSONL to write")
    args = parser.parse_args(argv)
    if args.command == "validate":
        print(validate(args.file, args.kind))
    else:
        print(pairs(args.rankings, args.completions, args.output))
    return 0
