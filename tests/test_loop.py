"""`rlhfkit loop`: rounds end to end against a real labeling server (the simulated panel labels over
HTTP), resumed after kill -9, and its bad-input errors. Tiny untrained models keep each run short."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rlhfkit.config import load_config
from rlhfkit.errors import UserError
from rlhfkit.stages import loop
from testutil import CLI, loop_inputs, loop_overrides, subprocess_env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return loop_inputs(tmp_path_factory.mktemp("loop-inputs"))


def config(out: Path, inputs: dict[str, Path], *extra: str) -> loop.Config:
    return load_config(loop.Config, None, loop_overrides(out, inputs, *extra))


def final(out: Path) -> dict[str, Any]:
    """What must not depend on interruptions: every round's labels, pairs and metrics."""
    rows = json.loads((out / "results.json").read_text())["rounds"]
    labels = [(out / f"round-{n}/labels/judgments.jsonl").read_text() for n in (1, 2)]
    return {"rows": rows, "labels": labels}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> dict[str, Path]:
    """An uninterrupted 2-round run, and a copy of its folder (database included) after round 1."""
    out = tmp_path_factory.mktemp("loop-straight")
    loop.run(config(out, inputs, "rounds=1"))
    after1 = tmp_path_factory.mktemp("loop-after-1") / "run"
    shutil.copytree(out, after1)
    loop.run(config(out, inputs))  # round 2 (round 1 is done: a re-run with more rounds continues)
    return {"straight": out, "after1": after1}


def start_cli(out: Path, inputs: dict[str, Path], *extra: str) -> subprocess.Popen:
    log = (out.parent / f"{out.name}.log").open("w")
    cmd = [*CLI, "loop", *loop_overrides(out, inputs, *extra)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(PYTHONUNBUFFERED="1"))


def wait_for(proc: subprocess.Popen, ready: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the loop exited before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_rounds_on_the_embedded_server(runs: dict[str, Path]) -> None:
    out = runs["straight"]
    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [1, 2] and results["stopped"] is None
    for n in (1, 2):
        d = out / f"round-{n}"
        prompts = [json.loads(line)["id"] for line in (d / "prompts.jsonl").read_text().splitlines()]
        assert len(prompts) == 4
        items = [json.loads(line) for line in (d / "labels/completions.jsonl").read_text().splitlines()]
        assert sorted(i["prompt_id"] for i in items) == sorted(prompts)
        assert all(len(i["completions"]) == 3 for i in items)
        assert rows[n - 1]["judgments"] == 4 * 5  # every item by the whole panel, this batch only
        for path in ("rm/model/config.json", "ppo/model/config.json", "eval/results.json"):
            assert (d / path).exists(), path
    # fresh prompts each round
    ids = [{json.loads(x)["id"] for x in (out / f"round-{n}/prompts.jsonl").read_text().splitlines()} for n in (1, 2)]
    assert not ids[0] & ids[1]
    # round 2: the policy started from round 1's, the RM retrained on both rounds' training pairs,
    # and the previous RM was scored on the new pairs
    assert "previous_rm_accuracy" in rows[1] and "vs_previous" in rows[1] and "vs_previous" not in rows[0]
    train1 = (out / "round-1/rm-data/train.jsonl").read_text().splitlines()
    train2 = (out / "round-2/rm-data/train.jsonl").read_text().splitlines()
    assert set(train1) < set(train2)
    ev = json.loads((out / "round-2/eval/results.json").read_text())
    assert set(ev["models"]) == {"sft", "round-1", "round-2"}
    assert {"round-2_vs_sft", "round-2_vs_round-1"} <= set(ev["comparisons"])
    assert "Rounds" in (out / "report.html").read_text()


@pytest.mark.slow
def test_kill_during_labeling_then_rerun_gives_the_same_labels_and_metrics(
    runs: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    from rlhfkit.data.formats import read_records
    from rlhfkit.feedback.client import FeedbackClient
    from rlhfkit.sim.panel import default_panel, gold_utility, label_over_http

    out = tmp_path / "run"
    shutil.copytree(runs["after1"], out)
    # round 2 with people labeling: the loop imports the batch and waits; two of them label it all
    proc = start_cli(out, inputs, "labels.labelers=human")
    try:
        wait_for(proc, (out / "round-2/labels/imported.json").exists, "round 2's batch")
        log = (out.parent / "run.log").read_text()
        url = log.split("embedded labeling server on ")[-1].split()[0]
        server = json.loads((out / "server/server.json").read_text())
        utility = gold_utility(read_records(out / "round-2/candidates/completions.jsonl", "completions"))
        label_over_http(url, server["project"], default_panel()[:2], server["password"], utility, seed=0 + 2)
        with FeedbackClient(url, api_key=server["api_key"]) as owner:
            p = owner.progress(server["project"], batch="round-2")
        assert (p["judgments"], p["items_complete"]) == (8, 0)  # half-labeled: 2 of 5 labelers
    finally:
        proc.kill()  # kill -9
        proc.wait()
    assert not (out / "round-2/labels/completions.jsonl").exists()
    # as if killed between the import and its record: the server is asked, nothing is imported twice
    (out / "round-2/labels/imported.json").unlink()
    loop.run(config(out, inputs))  # the simulated panel's other three finish the batch
    assert final(out) == final(runs["straight"])
    # the labels given before the kill were kept (not relabeled in a new database), none twice
    with sqlite3.connect(out / "server/feedback.db") as con:
        rows = con.execute(
            "SELECT u.username, j.id FROM judgments j JOIN users u ON u.id = j.user_id "
            "JOIN items i ON i.id = j.item_id WHERE i.batch = 'round-2' ORDER BY j.id"
        ).fetchall()
    assert {name for name, _ in rows[:8]} == {"alice", "bob"} and len(rows) == 20


@pytest.mark.slow
def test_kill_during_ppo_then_rerun_gives_the_same_metrics(
    runs: dict[str, Path], inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs["after1"], out)
    proc = start_cli(out, inputs)
    try:
        wait_for(proc, lambda: any((out / "round-2/ppo/checkpoints").glob("step-*")), "PPO checkpoint in round 2")
        proc.kill()  # kill -9
        proc.wait()
    finally:
        proc.kill()
    assert not (out / "round-2/ppo/results.json").exists(), "PPO finished before the kill: the test proves nothing"
    capsys.readouterr()
    loop.run(config(out, inputs))
    assert "resumed from" in capsys.readouterr().out  # PPO went on from its checkpoint
    assert final(out) == final(runs["straight"])


# ---- bad input: one line naming the problem, nothing half-written, resumable after the fix


def test_unknown_candidate_source(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"candidates\[1\]\.model: 'nope' is neither one of current, previous, sft"):
        loop.run(config(out, inputs, "candidates=[{model: sft, k: 2}, {model: nope}]"))
    assert not out.exists()


def test_resume_false_refuses_an_existing_run(runs: dict[str, Path], inputs: dict[str, Path]) -> None:
    with pytest.raises(UserError, match=r"^resume=false: .* already holds rounds; give a new output_dir"):
        loop.run(config(runs["straight"], inputs, "resume=false"))


def test_server_down(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    server = ["server.url=http://127.0.0.1:9", "server.api_key=k", "server.project=1"]
    with pytest.raises(UserError, match=r"^server\.url: cannot reach http://127\.0\.0\.1:9 .*start the server") as e:
        loop.run(config(out, inputs, *server))
    assert "\n" not in str(e.value) and not out.exists()


def test_wrong_api_key_and_project(inputs: dict[str, Path], tmp_path: Path) -> None:
    from rlhfkit.feedback.client import FeedbackClient
    from rlhfkit.sim.embedded import OWNER, live_server, new_database, panel_project

    db, _, password = new_database(tmp_path / "server")
    with live_server(tmp_path / "server", db) as server, FeedbackClient.login(server.url, OWNER, password) as owner:
        project = panel_project(owner, "p", 2, [], password)["id"]
        key = owner.create_api_key()
        out = tmp_path / "run"
        bad = [f"server.url={server.url}", "server.api_key=not-the-key", f"server.project={project}"]
        with pytest.raises(UserError, match=r"^server\.api_key: .* refused it \(401"):
            loop.run(config(out, inputs, *bad))
        with pytest.raises(UserError, match=r"^server\.project: .* has no project 999"):
            loop.run(config(out, inputs, f"server.url={server.url}", f"server.api_key={key}", "server.project=999"))
    db.dispose()
    assert not out.exists()


def test_pool_runs_out(runs: dict[str, Path], inputs: dict[str, Path], tmp_path: Path) -> None:
    out, pool = tmp_path / "run", tmp_path / "pool.jsonl"
    shutil.copytree(runs["straight"], out)
    shutil.copy(inputs["pool"], pool)
    cfg = config(out, inputs, "rounds=3", f"pool={pool}")
    with pytest.raises(UserError, match=r"^pool: round 3 needs 4 fresh prompts, but only 2 of the 10 .* were never"):
        loop.run(cfg)
    assert not (out / "round-3").exists()
    with pool.open("a") as f:  # the fix: more prompts
        f.writelines(json.dumps({"id": f"new{i}", "prompt": f"New question {i}?"}) + "\n" for i in range(2))
    fresh = loop.fresh_prompts(cfg, loop.Round(out, 3))
    used = {json.loads(x)["id"] for n in (1, 2) for x in (out / f"round-{n}/prompts.jsonl").read_text().splitlines()}
    assert len(fresh) == 4 and not {p.id for p in fresh} & used


@pytest.mark.slow
def test_batch_timeout_then_resume(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^labels: batch round-1 has 0 of 4 items labeled after labels\.timeout_s="):
        loop.run(config(out, inputs, "rounds=1", "labels.labelers=human", "labels.timeout_s=0.3"))
    assert (out / "round-1/labels/imported.json").exists() and not (out / "round-1/labels/completions.jsonl").exists()
    results = loop.run(config(out, inputs, "rounds=1"))  # the fix: someone labels (here the simulated panel)
    assert results["rounds"][0]["items"] == 4 and results["rounds"][0]["judgments"] == 4 * 5  # imported once


def test_uncertainty_selection_labels_the_sets_the_last_reward_model_is_least_sure_about(
    runs: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    from itertools import combinations

    from rlhfkit.data.formats import read_records
    from rlhfkit.rewards.model import RewardModel

    out = tmp_path / "run"
    shutil.copytree(runs["straight"], out)
    cfg = config(out, inputs, "rounds=3", "select=uncertainty", "prompts_per_round=1", "select_from=2")
    run, r = loop.Loop(cfg, inputs["sft"]), loop.Round(out, 3)
    run.choose_prompts(r)
    run.generate(r)
    run.select(r)
    sets = read_records(r.offered_candidates, "completions")
    assert len(sets) == 2  # the 2 prompts the pool has left
    rm = RewardModel.load(out / "round-2/rm/model")

    def smallest_margin(s: Any) -> float:
        scores = rm.score([s.prompt] * len(s.completions), s.completions).tolist()
        return min(abs(a - b) for a, b in combinations(scores, 2))

    expected = min(sets, key=smallest_margin).prompt_id
    assert [p.id for p in read_records(r.prompts, "prompts")] == [expected]
    assert [c.prompt_id for c in read_records(r.candidates, "completions")] == [expected]


def test_disagreement_selection_labels_the_sets_an_ensemble_on_the_last_reward_model_disagrees_on(
    runs: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    from rlhfkit.data.formats import read_records
    from rlhfkit.labels.select import disagreement_scores
    from rlhfkit.rewards.ensemble import HeadEnsemble
    from rlhfkit.rewards.model import RewardModel

    out = tmp_path / "run"
    shutil.copytree(runs["straight"], out)
    cfg = config(out, inputs, "rounds=3", "select=disagreement", "prompts_per_round=1", "select_from=2")
    run, r = loop.Loop(cfg, inputs["sft"]), loop.Round(out, 3)
    run.choose_prompts(r)
    run.generate(r)
    run.select(r)
    sets = read_records(r.offered_candidates, "completions")
    assert len(sets) == 2
    # 5 heads on round 2's reward model, fitted on the pairs it learned from (rounds 1 and 2: retrain)
    rm = RewardModel.load(out / "round-2/rm/model")
    pairs = read_records(out / "round-2/rm-data/train.jsonl", "pairs")
    assert pairs == loop.rm_training_pairs(cfg, loop.Round(out, 2))
    prompts = [p.prompt for p in pairs]
    heads = HeadEnsemble(members=5, seed=cfg.seed + 3).fit(
        rm.features(prompts, [p.chosen for p in pairs]).numpy(),
        rm.features(prompts, [p.rejected for p in pairs]).numpy(),
    )

    def spread(s: Any) -> float:
        features = rm.features([s.prompt] * len(s.completions), s.completions).numpy()
        return float(disagreement_scores([heads.predict(features)])[0])

    spreads = [spread(s) for s in sets]
    assert spreads[0] != spreads[1]
    expected = sets[max(range(2), key=lambda i: spreads[i])].prompt_id
    assert [p.id for p in read_records(r.prompts, "prompts")] == [expected]


@pytest.mark.parametrize("override", ["rm.output_dir=x", "rm.model.path=x", "ppo.resume=true", "ppo.ref_model=x"])
def test_settings_the_loop_fills_each_round_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"{key}: `rlhfkit loop` sets it each round; leave it out"):
        load_config(loop.Config, None, [override])
    assert key in (loop.__doc__ or "")  # and `rlhfkit loop --help` lists it
