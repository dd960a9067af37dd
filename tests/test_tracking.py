"""Experiment trackers (`train.report_to`, through accelerate) and progress: TensorBoard by default,
none on request, a clear error for one that is not installed, W&B offline and MLflow's file store
where installed; a progress line every `log_every` steps when stderr is not a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.engine.progress import Progress


def run_sft(tmp_path: Path, model_dir: Path, *extra: str) -> tuple[int, Path]:
    tmp_path.mkdir(exist_ok=True)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Say {w}", "response": w}) + "\n" for w in "abcdefgh"))
    out = tmp_path / "out"
    code = main(["sft", f"model.path={model_dir}", f"data.train={demos}", f"output_dir={out}", "data.valid_fraction=0",
                 "train.batch_size=2", "train.max_steps=4", "train.log_every=2", *extra])  # fmt: skip
    return code, out


def test_tensorboard_gets_every_logged_row_by_default(tiny_model_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out = run_sft(tmp_path, tiny_model_dir("gpt2"))
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    logged = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    scalars = [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")]
    assert scalars == [(r["step"], r["loss"]) for r in logged]
    # no terminal here: no bar (a library's own bars aside), one line per logged step with its loss
    err = capsys.readouterr().err
    assert "sft:" not in "".join(part for part in err.split("\n") if "\r" in part)
    lines = [line for line in err.splitlines() if line.startswith("sft: ")]
    assert [line.split(" (")[0] for line in lines] == ["sft: 2/4", "sft: 4/4"]
    assert f"loss {logged[-1]['loss']:.4f}" in lines[-1]


def test_no_trackers_and_missing_trackers(tiny_model_dir, tmp_path, capsys):
    code, out = run_sft(tmp_path, tiny_model_dir("gpt2"), "train.report_to=[]")
    assert code == 0 and not (out / "tensorboard").exists() and (out / "metrics.jsonl").exists()
    missing = [name for name in ("wandb", "mlflow", "trackio") if not _installed(name)]
    if not missing:
        pytest.skip("every tracker is installed")
    code, out = run_sft(tmp_path / "missing", tiny_model_dir("gpt2"), f"train.report_to=[{missing[0]}]")
    assert code == 2 and not (out / "model").exists()
    assert f"error: train.report_to: {missing[0]} not installed (pip install {missing[0]})" in capsys.readouterr().err


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_wandb_offline_run(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, _ = run_sft(tmp_path, tiny_model_dir("gpt2"), "train.report_to=[wandb]", "train.tracker_project=rlhfkit-test")
    assert code == 0
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert any(f.stat().st_size > 0 for f in run.glob("run-*.wandb"))


def test_mlflow_local_store(tiny_model_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, out = run_sft(tmp_path, tiny_model_dir("gpt2"), "train.report_to=[mlflow, tensorboard]",
                        "train.tracker_project=rlhfkit-test")  # fmt: skip
    assert code == 0 and (out / "tensorboard").exists()
    (run,) = mlflow.search_runs(experiment_names=["rlhfkit-test"], output_format="list")
    assert run.info.run_name == "out"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    logged = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    assert [(m.step, pytest.approx(m.value)) for m in history] == [(r["step"], r["loss"]) for r in logged]


def test_progress_prints_a_line_every_n_steps_without_a_terminal(capsys):
    with Progress(10, "work", every=3) as progress:
        for _ in range(10):
            progress.update()
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        "work: 3/10", "work: 6/10", "work: 9/10", "work: 10/10"
    ]  # fmt: skip
    with Progress(10, "quiet", every=0) as progress:  # a loop that prints its own lines
        progress.update(10)
    assert capsys.readouterr().err == ""
