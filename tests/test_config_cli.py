"""Configs and the command line: every mistake a user can make gets `error: ...` naming the field
(or file:line), exit status 2 and no traceback; bad data files leave no output behind."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.config import atomic_write_text, load_config, save_config
from rlhfkit.data.formats import read_records
from rlhfkit.errors import UserError
from rlhfkit.stages import generate, pretrain
from testutil import CLI, subprocess_env


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- help


def test_top_level_help_lists_every_stage(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for stage in ("pretrain", "generate", "data"):
        assert f"\n  {stage} " in out
    assert run_cli(capsys)[1] == out  # no arguments: the same help


def test_stage_help_lists_fields_with_the_stage_defaults(capsys):
    code, out, _ = run_cli(capsys, "pretrain", "--help")
    assert code == 0
    assert out.startswith("usage: rlhfkit pretrain [--config FILE.yaml] [--resume] [KEY=VALUE ...]")
    for field in ("output_dir", "vocab_size", "data.block_size", "data.train_files", "model.arch", "train.save_every"):
        assert f"\n  {field} " in out
    # pretraining's own defaults for its train section, not TrainConfig's class defaults
    assert "train.lr                float = 0.002" in out
    assert "train.max_steps         int = 800  (optimizer steps; 0 = derive from epochs)" in out


def test_stage_help_shows_choices_and_optional_sections(capsys):
    out = " ".join(run_cli(capsys, "ppo", "--help")[1].split())  # column padding does not matter
    assert "train.scheduler {cosine|linear|constant} = 'cosine'" in out
    assert "ppo.kl.kind {k1|k2|k3} | None = None" in out
    # optional sections: a row of their own, then their fields with the values they take once set
    assert "ppo.kl.adaptive AdaptiveKLConfig | None = None" in out
    assert "ppo.kl.adaptive.target float = 6.0" in out and "model.lora.r int = 8" in out
    for unused in ("train.batch_size", "train.max_steps", "train.epochs"):  # PPO's sizes live in ppo/stop
        assert f"{unused} " not in out


def test_an_unknown_setting_names_the_one_meant(capsys):
    code, _, err = run_cli(capsys, "sft", "train.epoch=3", "train.batch_sise=4")
    assert code == 2
    assert "train.epoch: unknown setting; did you mean train.epochs?" in err
    assert "train.batch_sise: unknown setting; did you mean train.batch_size?" in err


def test_unknown_stage(capsys):
    code, _, err = run_cli(capsys, "pretrian")
    assert code == 2 and "unknown command 'pretrian'; one of: pretrain, " in err


# ----------------------------------------------------------------------------- config errors


def test_bad_override_in_a_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [*CLI, "pretrain", "train.lr=fast", f"output_dir={tmp_path / 'out'}"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: config (with overrides train.lr=fast ")
    assert "  train.lr: Input should be a valid number" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "  train.lrr: unknown setting; did you mean train.lr?"),
        ("train.max_steps=ten", "  train.max_steps: Input should be a valid integer"),
        ("train.max_steps=-1", "  train.max_steps: Input should be greater than or equal to 0"),
        ("model.arch=gpt5", "  model.arch: Input should be 'gpt2', 'llama', 'qwen2' or 'mistral'"),
        ("train=5", "  train: Input should be a valid dictionary or instance of TrainConfig"),
        ("train.lr.x=5", "override 'train.lr.x=5': 'lr' is not a section"),
        ("trainlr", "override 'trainlr': expected KEY=VALUE, e.g. train.lr=1e-4"),
        ("train..lr=1", "override 'train..lr=1': empty key"),
        ("--max-steps=5", "unknown flag --max-steps=5; settings are KEY=VALUE, e.g. train.max_steps=5"),
    ],
)
def test_bad_overrides_name_the_field(capsys, tmp_path, override, message):
    code, out, err = run_cli(capsys, "pretrain", f"output_dir={tmp_path / 'out'}", override)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_bad_yaml_files(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\nmodel: {}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "pretrain", "--config", str(bad))
    assert code == 2 and err.startswith(f"error: {bad}:3: YAML syntax error: ")

    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- model\n", encoding="utf-8")
    assert run_cli(capsys, "pretrain", "-c", str(listed))[2] == (
        f"error: {listed}: the top level must be a mapping of config sections\n"
    )
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 0.1\n  warmup: 5\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "pretrain", "-c", str(unknown))
    expected = f"error: {unknown}: invalid config\n  train.warmup: unknown setting; did you mean train.warmup_steps?\n"
    assert code == 2 and err == expected

    binary = tmp_path / "latin1.yaml"
    binary.write_bytes(b"output_dir: caf\xe9\n")
    assert run_cli(capsys, "pretrain", "-c", str(binary))[2].startswith(f"error: {binary}: not UTF-8 text")
    missing = tmp_path / "missing.yaml"
    assert run_cli(capsys, "pretrain", "-c", str(missing))[2] == f"error: {missing}: config file not found\n"


def test_yaml_then_overrides_keep_the_stage_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n  lr: 0.01\ndata:\n  block_size: 32\n", encoding="utf-8")
    cfg = load_config(pretrain.Config, path, ["train.lr=3e-4", "model.arch=llama", "resume=true"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.data.block_size) == (5, 3e-4, 32)
    assert cfg.model.arch == "llama" and cfg.resume is True
    # Untouched keys of a touched section keep pretraining's defaults (not TrainConfig's).
    assert (cfg.train.warmup_steps, cfg.train.batch_size, cfg.train.log_every) == (50, 32, 20)
    assert load_config(pretrain.Config, None, ["train.seed=3"]).train.lr == 2e-3
    # A section that defaults to None is created by setting one of its keys.
    lora = load_config(generate.Config, None, ["model.lora.r=4"]).model.lora
    assert lora is not None and (lora.r, lora.alpha) == (4, 16)
    assert load_config(generate.Config, None, ["sampling.stop=[END, '###']"]).sampling.stop == ["END", "###"]


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(generate.Config, None, ["k=3", "sampling.top_p=0.9", "model.lora.r=2", "prompts=p.jsonl"])
    path = save_config(cfg, tmp_path / "run")
    assert load_config(generate.Config, path) == cfg
    assert yaml.safe_load(path.read_text())["sampling"]["top_p"] == 0.9


def test_atomic_write_replaces_whole_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a" / "f.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new content")
    assert path.read_text() == "new content"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


# ----------------------------------------------------------------------------- rlhfkit data

COMPLETIONS = [
    {"prompt_id": "p1", "prompt": "Say hi", "completions": ["Hi!", "Hello.", "Go away."]},
    {"prompt_id": "p2", "prompt": "Say bye", "completions": ["Bye.", "Later."]},
]
RANKINGS = [
    {"prompt_id": "p1", "labeler": "ann", "ranking": [1, 1, 2]},
    {"prompt_id": "p1", "labeler": "bob", "ranking": [2, 1, 3]},
    {"prompt_id": "p2", "labeler": "ann", "ranking": [1, 2], "unusable": True},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_data_validate_detects_the_kind(capsys, tmp_path):
    completions = jsonl(tmp_path / "c.jsonl", COMPLETIONS)
    assert run_cli(capsys, "data", "validate", completions) == (0, "OK: 2 records of completions\n", "")
    rankings = jsonl(tmp_path / "r.jsonl", RANKINGS)
    assert run_cli(capsys, "data", "validate", rankings, "kind=rankings")[1] == "OK: 3 records of rankings\n"


def test_data_validate_a_datasets_folder(capsys, tmp_path):
    import datasets

    datasets.Dataset.from_list(RANKINGS).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()  # the progress bar of saving
    assert run_cli(capsys, "data", "validate", str(tmp_path / "ds")) == (0, "OK: 3 records of rankings\n", "")


def test_data_validate_reports_the_first_error(capsys, tmp_path):
    path = jsonl(tmp_path / "r.jsonl", [*RANKINGS, {"prompt_id": "p2", "labeler": "bob", "ranking": [1, 3]}])
    code, out, err = run_cli(capsys, "data", "validate", path)
    assert (code, out) == (2, "")
    assert err == f"error: {path}:4: ranking: ranks must be dense (1, 2, 2, 3 - no gaps); got [1, 3]\n"
    weird = jsonl(tmp_path / "w.jsonl", [{"question": "?"}])
    assert run_cli(capsys, "data", "validate", weird)[2] == (
        f"error: {weird}: first record: keys ['question'] match no known format "
        "(prompts, demonstrations, completions, rankings, pairs, ratings); set kind=...\n"
    )


def test_data_pairs_writes_pairs_and_counts(capsys, tmp_path):
    out_path = tmp_path / "out" / "pairs.jsonl"
    code, out, err = run_cli(
        capsys,
        "data",
        "pairs",
        f"rankings={jsonl(tmp_path / 'r.jsonl', RANKINGS)}",
        f"completions={jsonl(tmp_path / 'c.jsonl', COMPLETIONS)}",
        f"output={out_path}",
    )
    assert (code, err) == (0, "")
    # ann: 2 pairs + 1 tie; bob: 3 pairs; p2 unusable.
    assert out == f"wrote 5 pairs to {out_path}: 1 tied pairs dropped, 1 unusable rankings skipped\n"
    pairs = [(p.chosen, p.rejected) for p in read_records(out_path, "pairs")]
    assert pairs == [
        ("Hi!", "Go away."),
        ("Hello.", "Go away."),
        ("Hello.", "Hi!"),
        ("Hi!", "Go away."),
        ("Hello.", "Go away."),
    ]


@pytest.mark.parametrize(
    ("bad_ranking", "message"),
    [
        (
            {"prompt_id": "p3", "labeler": "cy", "ranking": [1, 2]},
            "prompt_id: unknown id 'p3' (not in the completions)",
        ),
        ({"prompt_id": "p1", "labeler": "cy", "ranking": [1, 2]}, "ranking: ranks 2 candidates but prompt 'p1' has 3"),
        ({"prompt_id": "p1", "labeler": "cy", "rank": [1, 2, 3]}, "ranking: missing required key"),
    ],
)
def test_data_pairs_with_bad_rankings_writes_nothing(capsys, tmp_path, bad_ranking, message):
    rankings = tmp_path / "r.jsonl"
    rankings.write_text("".join(json.dumps(r) + "\n" for r in RANKINGS) + "\n" + json.dumps(bad_ranking) + "\n")
    out_path = tmp_path / "pairs.jsonl"
    argv = [f"rankings={rankings}", f"completions={jsonl(tmp_path / 'c.jsonl', COMPLETIONS)}"]
    code, out, err = run_cli(capsys, "data", "pairs", *argv, f"output={out_path}")
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {rankings}:5: {message}")  # line 4 is blank
    assert not out_path.exists()


def test_data_pairs_with_only_ties_is_an_error(capsys, tmp_path):
    rankings = jsonl(tmp_path / "r.jsonl", [{"prompt_id": "p2", "labeler": "ann", "ranking": [1, 1]}])
    out_path = tmp_path / "pairs.jsonl"
    argv = [f"rankings={rankings}", f"completions={jsonl(tmp_path / 'c.jsonl', COMPLETIONS)}", f"output={out_path}"]
    assert run_cli(capsys, "data", "pairs", *argv)[0] == 2
    assert not out_path.exists()


def test_data_usage_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, "data", "pairs", "rankings=r.jsonl")
    assert code == 2 and "completions: missing required key" in err and "output: missing required key" in err
    code, _, err = run_cli(capsys, "data", "pairs", "--rankings", "r.jsonl")  # one dialect: KEY=VALUE
    assert code == 2 and "unknown flag --rankings; settings are KEY=VALUE, e.g. rankings=VALUE" in err


def test_generate_with_malformed_prompts_writes_nothing(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Yo"\n', encoding="utf-8")
    out_dir, model = tmp_path / "gen", tiny_model_dir("gpt2")
    capsys.readouterr()  # what building the model printed
    code, _, err = run_cli(capsys, "generate", f"prompts={prompts}", f"output_dir={out_dir}", f"model.path={model}")
    assert code == 2
    assert err.startswith(f"error: {prompts}:2: invalid JSON: ")
    assert not out_dir.exists()


def test_generate_without_prompts_or_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", f"output_dir={tmp_path / 'g'}")
    assert code == 2 and err == "error: prompts: no prompts file given; set prompts=FILE.jsonl\n"
    prompts = jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi"}])
    code, _, err = run_cli(capsys, "generate", f"prompts={prompts}", f"output_dir={tmp_path / 'g'}")
    assert code == 2 and err == "error: model.path: no model given; set model.path=FOLDER_OR_HUB_ID\n"


def test_user_error_is_an_exception_for_library_callers():
    with pytest.raises(UserError):
        load_config(pretrain.Config, None, ["vocab_size=10"])
