"""`rlhfkit STAGE [--config FILE.yaml] [--resume] [section.key=value ...]`

Every stage is a module with a pydantic `Config` and a `run(config)`; the CLI only loads the
config (YAML, then dotted overrides), saves the resolved copy next to the outputs and calls `run`.
So every flag is a config field, and `rlhfkit STAGE --help` lists them all.

A module that needs its own sub-commands (e.g. the feedback server's admin tasks) may define
`cli(argv: list[str]) -> int` instead; it is then handed the remaining arguments untouched.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from rlhfkit import __version__
from rlhfkit.errors import UserError

# name -> (module, one-line help). Adding a stage is adding a line here.
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("rlhfkit.stages.pretrain", "train a tokenizer and a causal LM from scratch on text"),
    "sft": ("rlhfkit.stages.sft", "supervised fine-tuning on demonstrations (loss on responses only)"),
    "generate": ("rlhfkit.stages.generate", "sample K completions per prompt"),
    "serve": ("rlhfkit.stages.serve", "the human-feedback web app (and its admin commands)"),
    "aggregate": ("rlhfkit.stages.aggregate", "consensus, agreement and pairs from human rankings"),
    "rm": ("rlhfkit.stages.rm", "train a reward model on pairs, rankings or ratings"),
    "ppo": ("rlhfkit.stages.ppo", "PPO against a reward, with a KL penalty to the starting model"),
    "eval": ("rlhfkit.stages.eval", "compare models on held-out prompts: reward, gold utility, toxicity, KL"),
    "cai": ("rlhfkit.stages.cai", "Constitutional AI: critique-and-revise data, AI preference labels (RLAIF)"),
    "demo": ("rlhfkit.stages.demo", "run the whole loop on the embedded default data"),
    "data": ("rlhfkit.stages.data", "validate data files and convert rankings to pairs"),
}


def _stage_help(name: str, module: Any) -> str:
    from rlhfkit.config import describe_fields

    lines = [
        f"usage: rlhfkit {name} [--config FILE.yaml] [--resume] [KEY=VALUE ...]",
        "",
        (module.__doc__ or "").strip(),
        "",
        "Config fields (set in the YAML file or as KEY=VALUE overrides, e.g. train.lr=1e-4):",
    ]
    rows = describe_fields(module.Config)
    width = max(len(r[0]) for r in rows) if rows else 10
    for dotted, type_name, default, desc in rows:
        lines.append(f"  {dotted:<{width}}  {type_name} = {default}" + (f"  ({desc})" if desc else ""))
    return "\n".join(lines)


def run_stage(name: str, argv: list[str]) -> int:
    module = importlib.import_module(STAGES[name][0])
    if hasattr(module, "cli"):
        return int(module.cli(argv) or 0)
    if any(a in ("-h", "--help") for a in argv):
        print(_stage_help(name, module))
        return 0
    parser = argparse.ArgumentParser(prog=f"rlhfkit {name}", add_help=False)
    parser.add_argument("--config", "-c", default=None)
    parser.add_argument("--resume", action="store_true")
    args, rest = parser.parse_known_args(argv)
    unknown_flags = [a for a in rest if a.startswith("-")]
    if unknown_flags:
        raise UserError(
            f"unknown flag(s) {' '.join(unknown_flags)}; settings are KEY=VALUE overrides (see `rlhfkit {name} --help`)"
        )
    overrides = list(rest)
    if args.resume:
        overrides.append("resume=true")
    from rlhfkit.config import load_config

    config = load_config(module.Config, args.config, overrides)
    module.run(config)
    return 0


def _quiet_libraries() -> None:
    """Keep the console for our own progress: library warnings/bars only on errors.

    Environment variables rather than `transformers.utils.logging.disable_progress_bar()`:
    importing transformers takes seconds, and stages such as `serve` never need it (transformers
    and huggingface_hub read these when they are first imported).
    """
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("accelerate", "transformers", "peft", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported before (e.g. `main` called in-process): too late for the env
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"rlhfkit {__version__}: RLHF, the whole loop in one tool.\n")
        print("usage: rlhfkit STAGE [--config FILE.yaml] [--resume] [KEY=VALUE ...]\n")
        print("stages:")
        for name, (_, help_text) in STAGES.items():
            print(f"  {name:<10} {help_text}")
        print("\n`rlhfkit STAGE --help` lists every config field of that stage.")
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"rlhfkit: unknown stage {name!r}; one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    _quiet_libraries()
    try:
        return run_stage(name, rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
