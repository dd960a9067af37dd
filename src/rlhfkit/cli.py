"""`rlhfkit COMMAND [ARG ...] [--config FILE.yaml] [--resume] [KEY=VALUE ...]`

One dialect for every command: a command is a stage (`ppo`) or a sub-command (`cai label`,
`data pairs`), each with one pydantic config and a run function; the CLI loads the config (the
YAML file, then the KEY=VALUE overrides), and the run function does the rest. So every setting is
a config field, `rlhfkit COMMAND --help` lists them all (types, choices, defaults), and a few
commands take their main arguments without a key (`rlhfkit data validate FILE`).

A group may have a command of its own: `rlhfkit serve [KEY=VALUE ...]` runs the server, `rlhfkit
serve add-user NAME` is one of its admin sub-commands.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

from rlhfkit import __version__
from rlhfkit.errors import UserError


@dataclass(frozen=True)
class Command:
    """Where a command lives: `module.<config>` is its config class, `module.<run>(config)` runs it.
    `positional`: config fields that leading arguments without `KEY=` fill, in order."""

    module: str
    help: str
    config: str = "Config"
    run: str = "run"
    positional: tuple[str, ...] = ()


# The registry: adding a command is adding a line here.
COMMANDS: dict[str, Command] = {
    "pretrain": Command("rlhfkit.stages.pretrain", "train a tokenizer and a causal LM from scratch on text"),
    "sft": Command("rlhfkit.stages.sft", "supervised fine-tuning on demonstrations (loss on responses only)"),
    "generate": Command("rlhfkit.stages.generate", "sample K completions per prompt"),
    "serve": Command("rlhfkit.stages.serve", "the human-feedback web app (and its admin commands)"),
    "serve run": Command("rlhfkit.stages.serve", "run the server (what `rlhfkit serve` alone does)"),
    "serve init": Command("rlhfkit.stages.serve", "create or upgrade the database", "InitConfig", "run_init"),
    "serve create-owner": Command(
        "rlhfkit.stages.serve", "create the site owner (the first user)", "CreateOwnerConfig", "run_create_owner",
        positional=("username",),
    ),  # fmt: skip
    "serve add-user": Command(
        "rlhfkit.stages.serve", "create a user, optionally adding them to a project", "AddUserConfig",
        "run_add_user", positional=("username",),
    ),  # fmt: skip
    "serve add-users": Command(
        "rlhfkit.stages.serve", "create users from a CSV file: username,role,project[,password]", "AddUsersConfig",
        "run_add_users", positional=("file",),
    ),  # fmt: skip
    "serve add-member": Command(
        "rlhfkit.stages.serve", "add an existing user to a project (or change their role)", "AddMemberConfig",
        "run_add_member", positional=("username", "project"),
    ),  # fmt: skip
    "serve create-project": Command(
        "rlhfkit.stages.serve", "create a project", "CreateProjectConfig", "run_create_project",
        positional=("name",),
    ),  # fmt: skip
    "serve import": Command(
        "rlhfkit.stages.serve", "import completions (or prompts) JSONL into a project", "ImportConfig",
        "run_import", positional=("project", "file"),
    ),  # fmt: skip
    "serve export": Command(
        "rlhfkit.stages.serve", "export a project's data as JSONL", "ExportConfig", "run_export",
        positional=("project", "kind", "out"),
    ),  # fmt: skip
    "serve export-chat": Command(
        "rlhfkit.stages.serve", "export the chat page's feedback as JSONL", "ExportChatConfig", "run_export_chat",
        positional=("kind", "out"),
    ),  # fmt: skip
    "serve api-key": Command(
        "rlhfkit.stages.serve", "print a new API key for a user", "ApiKeyConfig", "run_api_key",
        positional=("username",),
    ),  # fmt: skip
    "aggregate": Command("rlhfkit.stages.aggregate", "consensus, agreement and pairs from human rankings"),
    "rm": Command("rlhfkit.stages.rm", "train a reward model on pairs, rankings or ratings"),
    "dpo": Command("rlhfkit.stages.dpo", "DPO / IPO / hinge on preference pairs, against a frozen reference"),
    "kto": Command(
        "rlhfkit.stages.dpo", "KTO on unpaired desirable/undesirable answers (from pairs)", "KTOConfig", "run_kto"
    ),
    "ppo": Command("rlhfkit.stages.ppo", "PPO against a reward, with a KL penalty to the starting model"),
    "eval": Command("rlhfkit.stages.eval", "compare models on held-out prompts: reward, gold utility, toxicity, KL"),
    "cai revise": Command(
        "rlhfkit.stages.cai", "Constitutional AI: critique-and-revise -> SFT data + pairs", "ReviseConfig", "run_revise"
    ),
    "cai label": Command(
        "rlhfkit.stages.cai", "RLAIF: a judge compares completions under principles -> pairs", "LabelConfig",
        "run_label",
    ),  # fmt: skip
    "cai mix": Command("rlhfkit.stages.cai", "human + AI preference pairs, AI pairs weighted", "MixConfig", "run_mix"),
    "loop": Command("rlhfkit.stages.loop", "rounds: fresh prompts -> labeling server -> RM -> PPO -> eval, resumable"),
    "demo": Command("rlhfkit.stages.demo", "run the whole loop on the embedded default data"),
    "demo-personal": Command(
        "rlhfkit.stages.demo_personal", "personalisation demo: users with opposite tastes, a policy per user vs one"
    ),
    "data validate": Command(
        "rlhfkit.stages.data", "check a data file: the record count or the first error", "ValidateConfig",
        "run_validate", positional=("file",),
    ),  # fmt: skip
    "data pairs": Command("rlhfkit.stages.data", "rankings of K completions -> preference pairs", "PairsConfig",
                          "run_pairs"),  # fmt: skip
    "data export": Command(
        "rlhfkit.stages.data", "pairs, KTO rows or ratings -> a file TRL's trainers take as it is", "ExportConfig",
        "run_export", positional=("file",),
    ),  # fmt: skip
}


def _groups() -> dict[str, list[str]]:
    """Command groups (`cai`, `data`) -> their sub-commands."""
    groups: dict[str, list[str]] = {}
    for name in COMMANDS:
        if " " in name:
            group, sub = name.split(" ", 1)
            groups.setdefault(group, []).append(sub)
    return groups


def _group_listing(group: str) -> list[str]:
    subs = _groups().get(group, [])
    width = max(map(len, subs), default=0) + 1
    return [f"  {sub:<{width}} {COMMANDS[f'{group} {sub}'].help}" for sub in subs]


def _command_help(name: str, command: Command, module: Any) -> str:
    from rlhfkit.config import describe_fields

    cls = getattr(module, command.config)
    args = "".join(f" [{p.upper()}]" for p in command.positional)
    lines = [f"usage: rlhfkit {name}{args} [--config FILE.yaml] [--resume] [KEY=VALUE ...]", ""]
    doc = inspect.cleandoc((cls.__doc__ if command.config != "Config" else module.__doc__) or command.help)
    lines += [doc.strip(), "", "Config fields (set in the YAML file or as KEY=VALUE overrides, e.g. train.lr=1e-4):"]
    rows = describe_fields(cls)
    width = max(len(r[0]) for r in rows) if rows else 10
    for dotted, type_name, default, desc in rows:
        lines.append(f"  {dotted:<{width}}  {type_name} = {default}" + (f"  ({desc})" if desc else ""))
    subs = _group_listing(name)
    if subs:
        lines += ["", f"sub-commands (`rlhfkit {name} COMMAND --help` for theirs):", *subs]
    return "\n".join(lines)


def _overrides(name: str, command: Command, cls: Any, rest: list[str]) -> list[str]:
    """KEY=VALUE overrides from the arguments after the options: leading bare values fill
    `command.positional`; a `--flag` is refused with the KEY=VALUE spelling it meant."""
    overrides, positional = [], list(command.positional)
    for arg in rest:
        if arg.startswith("-"):
            from rlhfkit.config import describe_fields

            key, _, value = arg.lstrip("-").partition("=")
            key = key.replace("-", "_")
            row = next((row for row in describe_fields(cls) if row[0].rsplit(".", 1)[-1] == key), None)
            if row is not None:
                key = row[0]
            # A bare switch (`--no-password`) meant its boolean setting turned on.
            hint = f"{key}={value or ('true' if row is not None and row[1] == 'bool' else 'VALUE')}"
            raise UserError(f"unknown flag {arg}; settings are KEY=VALUE, e.g. {hint} (see `rlhfkit {name} --help`)")
        if "=" not in arg and positional:
            overrides.append(f"{positional.pop(0)}={arg}")
        else:
            overrides.append(arg)
    return overrides


def run_command(name: str, argv: list[str]) -> int:
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    if any(a in ("-h", "--help") for a in argv):
        print(_command_help(name, command, module))
        return 0
    parser = argparse.ArgumentParser(prog=f"rlhfkit {name}", add_help=False)
    parser.add_argument("--config", "-c", default=None)
    parser.add_argument("--resume", action="store_true")
    args, rest = parser.parse_known_args(argv)
    cls = getattr(module, command.config)
    overrides = _overrides(name, command, cls, rest)
    if args.resume:
        overrides.append("resume=true")
    from rlhfkit.config import load_config

    config = load_config(cls, args.config, overrides)
    getattr(module, command.run)(config)
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
    groups = _groups()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"rlhfkit {__version__}: RLHF, the whole loop in one tool.\n")
        print("usage: rlhfkit COMMAND [ARG ...] [--config FILE.yaml] [--resume] [KEY=VALUE ...]\n")
        print("commands:")
        width = max(map(len, COMMANDS)) + 1
        for name, command in COMMANDS.items():
            print(f"  {name:<{width}} {command.help}")
        print("\n`rlhfkit COMMAND --help` lists every config field of that command.")
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name in groups:
        sub = rest[0] if rest else ""
        if f"{name} {sub}" in COMMANDS:
            name, rest = f"{name} {sub}", rest[1:]
        elif name in COMMANDS and (sub == "" or sub.startswith("-") or "=" in sub):
            pass  # the group's own command (`rlhfkit serve port=8080`, `rlhfkit serve --help`)
        elif sub in ("", "-h", "--help"):
            print(f"usage: rlhfkit {name} COMMAND ...\n\ncommands:")
            print("\n".join(_group_listing(name)))
            return 0
        else:
            print(f"rlhfkit: unknown command `{name} {sub}`; one of: {', '.join(groups[name])}", file=sys.stderr)
            return 2
    if name not in COMMANDS:
        known = dict.fromkeys(n.split(" ")[0] for n in COMMANDS)
        print(f"rlhfkit: unknown command {name!r}; one of: {', '.join(known)}", file=sys.stderr)
        return 2
    _quiet_libraries()
    try:
        return run_command(name, rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
