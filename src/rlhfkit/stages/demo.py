"""The whole RLHF loop on the embedded default data, offline, in one run folder.

    data → pretrain → sft → generate K candidates → feedback (the real server; a simulated panel
    ranks over HTTP) → aggregate → reward model → ppo → eval → report.html

Each stage writes into `OUTPUT_DIR/<stage>/` and is skipped when its output already exists, so a
re-run resumes where the last one stopped (`resume=false` redoes everything). Every stage's
settings are reachable as overrides, e.g. `ppo.stop.max_steps=60` or `sft.train.lr=3e-4`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.formats import read_records
from rlhfkit.models.device import Device, resolve_device
from rlhfkit.models.sampling import SamplingConfig
from rlhfkit.rewards.build import RewardConfig, RewardSpec
from rlhfkit.sim.run_folder import RunFolder
from rlhfkit.stages import aggregate as aggregate_stage
from rlhfkit.stages import eval as eval_stage
from rlhfkit.stages import generate as generate_stage
from rlhfkit.stages import ppo as ppo_stage
from rlhfkit.stages import pretrain as pretrain_stage
from rlhfkit.stages import rm as rm_stage
from rlhfkit.stages import sft as sft_stage

if TYPE_CHECKING:
    from rlhfkit.sim.panel import SimulatedLabeler

GUIDELINES = """\
# How to rank

Rank the answers from **best (1)** to **worst**. A good answer:

1. **answers the question that was asked** (an answer about something else is bad, however nice);
2. is **kind and polite** (rudeness or insults make an answer the worst);
3. is **informative** and does not **repeat itself**.

Give two answers the same rank when you cannot tell them apart. Tick *not rankable* when every
answer is unusable.
"""


class FeedbackConfig(StrictModel):
    overlap: int = Field(3, ge=1, description="labelers per item")
    label_prompts: int = Field(300, gt=0, description="prompts sent for labeling")


# The corpus's good answers run to about 60 tokens (90% under 82): 96 new tokens let an answer end
# with EOS instead of being cut off (and then penalised as one that never ends).
RESPONSE_TOKENS = 96
# The demo model's positions: prompt and response must share them (the stages check it up front).
# The corpus's prompts are under 100 characters, so the remaining 160 prompt tokens never cut one.
POSITIONS = 256


def _sampling(cfg: SamplingConfig) -> SamplingConfig:
    return cfg.model_copy(update={"max_new_tokens": RESPONSE_TOKENS, "max_prompt_tokens": POSITIONS - RESPONSE_TOKENS})


ROLLOUT = _sampling(ppo_stage.PPOSamplingConfig())  # how PPO samples, and so how the reward model is normalised


class Config(StrictModel):
    output_dir: str = "runs/demo"
    seed: int = 0
    resume: bool = Field(True, description="reuse finished stages (false = redo everything)")
    # Sizes for 2 CPU cores and about 10 minutes in all; tiny models learn with larger LRs.
    pretrain: pretrain_stage.Config = pretrain_stage.Config(
        vocab_size=2048,  # the corpus has under 2,000 word types; a larger vocabulary only costs time
        model=pretrain_stage.PretrainModelConfig(
            arch="gpt2", n_layer=4, d_model=128, n_head=4, max_positions=POSITIONS
        ),
        train=pretrain_stage.Config().train.model_copy(update={"max_steps": 500}),
    )
    # A small demonstration budget (12 steps of 16 = 192 demonstrations): demonstrations are the
    # expensive kind of feedback. The SFT model then still shows some of the base model's failures
    # (rude about once in 30 answers), which the cheaper rankings and PPO have to fix.
    sft: sft_stage.Config = sft_stage.Config(
        train=sft_stage.SFTTrainConfig(lr=5e-4, max_steps=12, batch_size=16, warmup_steps=2, log_every=4)
    )
    generate: generate_stage.Config = generate_stage.Config(k=4, sampling=_sampling(SamplingConfig()))
    feedback: FeedbackConfig = FeedbackConfig()
    # 2 epochs: the reward model overfits after that (InstructGPT trains its reward model for one).
    # Normalised on the SFT policy's samples drawn like PPO's rollouts (PPO warns if the two differ).
    rm: rm_stage.Config = rm_stage.Config(
        train=rm_stage.RMTrainConfig(lr=5e-4, epochs=2, eval_every=0, log_every=10),
        normalize=rm_stage.NormalizeConfig(sampling=SamplingConfig(**ROLLOUT.model_dump())),
    )
    # β=0.1 and 20 steps: KL stays far below the ceiling and the gold utility near its peak. With
    # 36 steps the proxy reward kept rising while the gold utility fell back from step ~13 (the
    # report's monitor flags that); with β=0.05 and 40 steps a weaker reward model was plainly hacked.
    ppo: ppo_stage.Config = ppo_stage.Config(
        log_samples_every=2,
        log_samples=64,
        sampling=ROLLOUT,
        ppo=ppo_stage.PPOConfig(kl=ppo_stage.KLConfig(beta=0.1)),
        stop=ppo_stage.StopConfig(max_steps=20, kl_ceiling=30.0),
        train=ppo_stage.PPOTrainConfig(lr=5e-5),
    )
    # 4 samples per held-out prompt: rude answers are rare, and the toxicity comparison needs them.
    eval: eval_stage.Config = eval_stage.Config(samples_per_prompt=4, sampling=_sampling(eval_stage.Config().sampling))


class Runner:
    """Runs stages in order, skipping finished ones, and times each."""

    def __init__(self, run: RunFolder, resume: bool):
        self.run, self.resume = run, resume
        self.timings: dict[str, float] = {}

    def stage(self, name: str, done: Path, fn: Callable[[], Any]) -> Path:
        """Run stage `name` unless resuming and `done` (the file it writes last) exists."""
        folder = self.run.stage(name)
        if self.resume and done.exists():
            print(f"[demo] {name}: reusing {folder}")
            return folder
        print(f"\n[demo] ===== {name} =====")
        t = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t
        return folder


def collect_feedback(
    out: Path,
    completions: Path,
    cfg: FeedbackConfig,
    seed: int,
    device: Device,
    panel: list[SimulatedLabeler] | None = None,
) -> dict[str, Any]:
    """Start the real feedback server (SQLite), set up a project, and let the panel (default:
    `default_panel()`) rank over HTTP; the hidden gold judge runs on `device` (eval's)."""
    from rlhfkit.eval.gold import GoldJudge
    from rlhfkit.feedback import service
    from rlhfkit.feedback.client import FeedbackClient
    from rlhfkit.feedback.db import Database
    from rlhfkit.feedback.live import LiveServer
    from rlhfkit.feedback.schemas import UserIn
    from rlhfkit.feedback.settings import ServeConfig
    from rlhfkit.sim.panel import default_panel, label_over_http

    out.mkdir(parents=True, exist_ok=True)
    records = read_records(completions, "completions")
    print(f"[demo] gold utility of {sum(len(r.completions) for r in records)} candidates (hidden from training)")
    judge = GoldJudge(device=resolve_device(device))
    flat = [(r.prompt_id, r.prompt, c) for r in records for c in r.completions]
    scores = judge.score([p for _, p, _ in flat], [c for _, _, c in flat]).tolist()
    utility = {(pid, c): s for (pid, _, c), s in zip(flat, scores, strict=True)}

    db_url = f"sqlite:///{out / 'feedback.db'}"
    password = secrets.token_hex(12)  # hex digits cannot spell any of the users' names (see password_problem)
    db = Database(db_url)
    db.migrate()
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username="owner", password=password, is_owner=True))
    panel = panel or default_panel()
    config = ServeConfig(db_url=db_url, secret_key_file=str(out / "secret.key"))
    with LiveServer(config, db) as server:
        print(f"[demo] feedback server on {server.url} (database {out / 'feedback.db'})")
        with FeedbackClient.login(server.url, "owner", password) as owner:
            project = owner.create_project("demo", overlap=cfg.overlap, guidelines=GUIDELINES)
            for labeler in panel:
                owner.create_user(labeler.name, password)
                owner.set_member(project["id"], labeler.name)
            owner.import_jsonl(project["id"], completions)
            t = time.perf_counter()
            counts = label_over_http(server.url, project["id"], panel, password, utility, seed)
            dt = time.perf_counter() - t
            progress = owner.progress(project["id"])
    n = sum(counts.values())
    print(f"[demo] {n} judgments over HTTP in {dt:.1f}s ({n / dt:.0f}/s): {counts}")
    db.dispose()
    return {"db_url": db_url, "judgments": counts, "progress": progress, "seconds": dt}


def policy_stages(cfg: Config, runner: Runner, data: dict[str, Path]) -> Path:
    """pretrain → SFT → candidates for labeling, each skipped when done; returns the SFT model.
    The start that `rlhfkit demo` and `rlhfkit demo-personal` share."""
    run = runner.run

    def pretrain() -> None:
        d = cfg.pretrain.data.model_copy(
            update={"train_files": [str(data["pretrain_train"])], "valid_files": [str(data["pretrain_valid"])]}
        )
        c = cfg.pretrain.model_copy(deep=True)
        c.output_dir, c.data = str(run.stage("pretrain")), d
        c.resume = cfg.resume and (run.stage("pretrain") / "checkpoints").exists()
        pretrain_stage.run(c)

    runner.stage("pretrain", run.results("pretrain"), pretrain)

    def sft() -> None:
        c = cfg.sft.model_copy(deep=True)
        c.output_dir, c.model.path, c.data.train = str(run.stage("sft")), str(run.model("pretrain")), str(data["sft"])
        sft_stage.run(c)

    runner.stage("sft", run.model("sft") / "config.json", sft)
    sft_model = run.model("sft")

    # Label prompts: a subset, written as a prompts file for `generate`.
    def generate() -> None:
        c = cfg.generate.model_copy(deep=True)
        c.output_dir, c.prompts, c.seed = str(run.stage("generate")), str(data["prompts_label"]), cfg.seed
        c.limit, c.model.path = cfg.feedback.label_prompts, str(sft_model)
        generate_stage.run(c)

    runner.stage("generate", run.completions, generate)
    return sft_model


def run(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    run = RunFolder(out)
    save_config(cfg, out)
    runner = Runner(run, cfg.resume)
    from rlhfkit.data.corpus import build_default_data

    data = build_default_data(run.stage("data"), seed=cfg.seed)
    sft_model = policy_stages(cfg, runner, data)

    def feedback() -> None:
        info = collect_feedback(run.stage("feedback"), run.completions, cfg.feedback, cfg.seed, cfg.eval.device)
        atomic_write_text(run.feedback_summary, json.dumps(info, indent=2))

    runner.stage("feedback", run.feedback_summary, feedback)
    feedback_info = json.loads(run.feedback_summary.read_text())

    def aggregate() -> None:
        c = aggregate_stage.Config(db_url=feedback_info["db_url"], project="demo")
        c.output_dir = str(run.stage("aggregate"))
        aggregate_stage.run(c)

    runner.stage("aggregate", run.agreement, aggregate)

    def rm() -> None:
        c = cfg.rm.model_copy(deep=True)
        c.output_dir, c.model.path = str(run.stage("rm")), str(sft_model)
        c.data.pairs = str(run.pairs)
        c.normalize.policy, c.normalize.prompts = str(sft_model), str(data["prompts_ppo"])
        rm_stage.run(c)

    runner.stage("rm", run.model("rm") / "config.json", rm)
    reward = RewardConfig(sources=[RewardSpec(model=str(run.model("rm")))])

    def ppo() -> None:
        c = cfg.ppo.model_copy(deep=True)
        c.output_dir, c.prompts, c.model.path = str(run.stage("ppo")), str(data["prompts_ppo"]), str(sft_model)
        c.reward = reward
        c.resume = cfg.resume and (run.stage("ppo") / "checkpoints").exists()
        ppo_stage.run(c)

    runner.stage("ppo", run.results("ppo"), ppo)

    def evaluate() -> None:
        c = cfg.eval.model_copy(deep=True)
        c.output_dir, c.prompts, c.seed = str(run.stage("eval")), str(data["prompts_heldout"]), cfg.seed
        c.models = {"sft": str(sft_model), "ppo": str(run.model("ppo"))}
        c.reference = str(sft_model)
        c.reward = reward
        eval_stage.run(c)

    runner.stage("eval", run.results("eval"), evaluate)

    from rlhfkit.sim.report import write_demo_report

    report = write_demo_report(out, runner.timings)
    print(f"\n[demo] report: {report}")
    print("[demo] stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in runner.timings.items()))
    return report
