"""The whole RLHF loop on the embedded default data, offline, in one run folder.

    data → base model → sft → generate K candidates → feedback (the real server; a simulated panel
    ranks over HTTP) → aggregate → reward model → ppo (and rloo, grpo, dpo) → eval → report.html

The base model is the one shipped in the package (`rlhfkit/data/base_model`, made by `rlhfkit
pretrain --config` on its `pretrain.yaml`: pretraining was ~40% of the demo's time), or with
`base_model=pretrain` trained again in the run folder from the same recipe (`pretrain.*`).
`algorithms=[ppo,rloo,dpo]` trains each algorithm from the same SFT model and the same labels
(rloo/grpo/ppo with the same reward model, dpo on the pairs directly) and compares them on the
held-out prompts (gold utility, toxicity, KL to SFT, CPU time): a table and a plot in the report
and `OUTPUT_DIR/results.json`.

Each stage writes into `OUTPUT_DIR/<stage>/` and is skipped when its output already exists, so a
re-run resumes where the last one stopped (`resume=false` redoes everything). Every stage's
settings are reachable as overrides, e.g. `ppo.stop.max_steps=60` or `sft.train.lr=3e-4`; `seed`
is every stage's seed (training order, initialisation, sampling, the panel), while the data split
is the corpus seed the base model was pretrained on (`pretrain.data.corpus_seed`), so that the
held-out prompts stay unseen by the base model.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from rlhfkit.config import StrictModel, atomic_write_text, load_config, save_config
from rlhfkit.data.formats import PromptRecord, read_records, write_records
from rlhfkit.errors import UserError
from rlhfkit.models.device import Device
from rlhfkit.models.sampling import SamplingConfig
from rlhfkit.rewards.build import RewardConfig, RewardSpec
from rlhfkit.sim.run_folder import RunFolder
from rlhfkit.stages import aggregate as aggregate_stage
from rlhfkit.stages import dpo as dpo_stage
from rlhfkit.stages import eval as eval_stage
from rlhfkit.stages import generate as generate_stage
from rlhfkit.stages import loop as loop_stage
from rlhfkit.stages import ppo as ppo_stage
from rlhfkit.stages import pretrain as pretrain_stage
from rlhfkit.stages import rm as rm_stage
from rlhfkit.stages import sft as sft_stage

if TYPE_CHECKING:
    from rlhfkit.sim.panel import SimulatedLabeler


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

# The shipped base model: `model/` and the recipe that made it (`pretrain.yaml`, its one source:
# `base_model=pretrain` trains the same recipe, and a test checks the shipped files against it).
BASE_MODEL = Path(__file__).resolve().parent.parent / "data" / "base_model"
ALGORITHMS = ("ppo", "rloo", "grpo", "dpo")
Algorithm = Literal["ppo", "rloo", "grpo", "dpo"]


def base_model_recipe() -> pretrain_stage.Config:
    """The pretraining config of the shipped base model, as `rlhfkit pretrain --config` reads it."""
    return load_config(pretrain_stage.Config, BASE_MODEL / "pretrain.yaml")


def _recipe_settings(cfg: pretrain_stage.Config) -> dict[str, Any]:
    """What decides the model a pretraining config makes (not where it writes or whether it resumes)."""
    return cfg.model_dump(exclude={"output_dir", "model_dir", "resume"})


class Config(StrictModel):
    output_dir: str = "runs/demo"
    seed: int = Field(0, description="every stage's seed (the data split is pretrain.data.corpus_seed)")
    resume: bool = Field(True, description="reuse finished stages (false = redo everything)")
    base_model: Literal["shipped", "pretrain"] = Field(
        "shipped", description="shipped = the package's base model; pretrain = train it again with `pretrain`"
    )
    algorithms: list[Algorithm] = Field(
        default_factory=lambda: ["ppo"], description="trained from the same SFT model and labels, then compared"
    )
    # Sizes for 2 CPU cores and about 10 minutes in all; tiny models learn with larger LRs.
    pretrain: pretrain_stage.Config = base_model_recipe()
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
    # rloo/grpo: PPO's settings with K responses per prompt and no critic (same batch of 64 responses).
    group_size: int = Field(4, ge=2, description="rloo/grpo: responses per prompt (ppo.ppo.num_generations)")
    # DPO from the same SFT model on the aggregated pairs. A model this small needs a far larger lr than
    # DPO's default for real models (1e-6); one epoch, as the reward model's first.
    dpo: dpo_stage.Config = dpo_stage.Config(
        train=dpo_stage.PreferenceTrainConfig(lr=5e-5, epochs=1, batch_size=16, warmup_steps=5, log_every=10)
    )
    # 4 samples per held-out prompt: rude answers are rare, and the toxicity comparison needs them.
    eval: eval_stage.Config = eval_stage.Config(samples_per_prompt=4, sampling=_sampling(eval_stage.Config().sampling))
    # Rounds 2+ (`rlhfkit loop`'s machinery): fresh prompts, candidates of the current, previous and SFT
    # policies, the panel over HTTP, the reward model retrained on every round's pairs, PPO on from the
    # current policy with KL to SFT (the rm.*, ppo.*, eval.* settings above). 150 prompts: about what
    # round 1 costs after SFT.
    rounds: int = Field(2, ge=1, description="rounds of feedback; round 1 is the pipeline above, 2+ label new samples")
    prompts_per_round: int = Field(150, gt=0, description="rounds 2+: fresh prompts labeled per round")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.algorithms or len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError(f"algorithms={self.algorithms}: name each of {', '.join(ALGORITHMS)} at most once")
        if self.rounds > 1 and "ppo" not in self.algorithms:
            raise ValueError(f"rounds={self.rounds}: later rounds continue PPO's policy; add ppo to algorithms")
        if self.base_model == "shipped" and _recipe_settings(self.pretrain) != _recipe_settings(base_model_recipe()):
            raise ValueError(
                "pretrain.* settings differ from the shipped base model's recipe "
                f"({BASE_MODEL / 'pretrain.yaml'}): add base_model=pretrain to train a base model with them"
            )
        return self


def rl_config(cfg: Config, algorithm: str) -> ppo_stage.Config:
    """The demo's PPO settings run as `algorithm` (ppo, rloo or grpo), validated like a `ppo.*` override."""
    data = cfg.ppo.model_dump()
    data["ppo"].update(algorithm=algorithm, num_generations=1 if algorithm == "ppo" else cfg.group_size)
    return ppo_stage.Config.model_validate(data)


class Runner:
    """Runs stages in order, skipping finished ones, and times each (wall clock and this process's
    CPU time, all threads): kept in `timings.json`, so a resumed run still reports every stage."""

    def __init__(self, run: RunFolder, resume: bool):
        self.run, self.resume = run, resume
        self.timings: dict[str, dict[str, float]] = (
            json.loads(run.timings.read_text()) if resume and run.timings.exists() else {}
        )

    def stage(self, name: str, done: Path | bool, fn: Callable[[], Any]) -> Path:
        """Run stage `name` unless resuming and it is `done` (the file it writes last exists)."""
        folder = self.run.stage(name)
        if self.resume and (done.exists() if isinstance(done, Path) else done):
            print(f"[demo] {name}: reusing {folder}")
            return folder
        print(f"\n[demo] ===== {name} =====")
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.timings[name] = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
        atomic_write_text(self.run.timings, json.dumps(self.timings, indent=2))
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
    from rlhfkit.feedback.client import FeedbackClient
    from rlhfkit.loop.labeling import save_embedded
    from rlhfkit.sim.embedded import OWNER, live_server, new_database, panel_project
    from rlhfkit.sim.panel import default_panel, gold_utility, label_over_http

    utility = gold_utility(read_records(completions, "completions"), device)
    db, db_url, password = new_database(out)
    panel = panel or default_panel()
    with live_server(out, db) as server:
        print(f"[demo] feedback server on {server.url} (database {out / 'feedback.db'})")
        with FeedbackClient.login(server.url, OWNER, password) as owner:
            project = panel_project(owner, "demo", cfg.overlap, panel, password)
            save_embedded(out, owner, password, project["id"])  # later rounds label on this server
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
    """pretrain (or the shipped base model) → SFT → candidates for labeling, each skipped when done;
    returns the SFT model. The start that `rlhfkit demo` and `rlhfkit demo-personal` share."""
    run = runner.run

    def pretrain() -> None:
        d = cfg.pretrain.data.model_copy(
            update={"train_files": [str(data["pretrain_train"])], "valid_files": [str(data["pretrain_valid"])]}
        )
        c = cfg.pretrain.model_copy(deep=True)
        c.output_dir, c.model_dir, c.data = str(run.stage("pretrain")), "", d
        c.resume = cfg.resume and (run.stage("pretrain") / "checkpoints").exists()
        pretrain_stage.run(c)

    if cfg.base_model == "pretrain":
        runner.stage("pretrain", run.results("pretrain"), pretrain)
    base = run.model("pretrain") if cfg.base_model == "pretrain" else BASE_MODEL / "model"

    def sft() -> None:
        c = cfg.sft.model_copy(deep=True)
        c.output_dir, c.model.path, c.data.train = str(run.stage("sft")), str(base), str(data["sft"])
        c.train.seed = cfg.seed
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


def rounds_config(cfg: Config, run: RunFolder, data: dict[str, Path], sft_model: Path) -> loop_stage.Config:
    """`rlhfkit loop`'s settings for rounds 2+: the demo's reward-model, PPO and eval settings and
    its sampling. The pool: the labeling prompts round 1 left, then the PPO prompts (round 1 labels
    all 300 labeling prompts by default; labeling prompts that PPO also trains on is what
    InstructGPT does)."""
    pool = run.stage("data") / "prompts" / "rounds.jsonl"
    write_records(pool, read_records(data["prompts_label"], "prompts") + read_records(data["prompts_ppo"], "prompts"))
    sources = (("current", 2), ("previous", 1), ("sft", 1))
    return loop_stage.Config(
        output_dir=str(run.root),
        seed=cfg.seed,
        device=cfg.eval.device,
        sft=str(sft_model),
        pool=str(pool),
        rounds=cfg.rounds,
        prompts_per_round=cfg.prompts_per_round,
        candidates=[loop_stage.CandidateSource(model=m, k=k, sampling=cfg.generate.sampling) for m, k in sources],
        rm=loop_stage.RoundRMConfig.model_validate(cfg.rm.model_dump()),
        ppo=loop_stage.RoundPPOConfig.model_validate(
            {**rl_config(cfg, "ppo").model_dump(), "prompts": str(data["prompts_ppo"])}
        ),
        eval=cfg.eval.model_copy(update={"prompts": str(data["prompts_heldout"])}),
    )


def later_rounds(cfg: Config, runner: Runner, data: dict[str, Path], sft_model: Path) -> None:
    """Rounds 2..`rounds` with `rlhfkit loop`'s steps (each skipped when done), labeled by the panel
    on the server of round 1's feedback; each round is one timed stage (`round-N`). Round 1's
    summary (`round-1/round.json`: its labels, reward model and eval, as the loop counts them) first."""
    from rlhfkit.loop.labeling import ServerConfig, connect

    run = runner.run
    lcfg = rounds_config(cfg, run, data, sft_model)
    first = run.round(1)
    loop = loop_stage.Loop(lcfg, sft_model, first)
    if not cfg.resume:  # the stages before were redone: so are the rounds built on them
        for n in range(1, cfg.rounds + 1):
            shutil.rmtree(run.round(n).dir, ignore_errors=True)
    labeled = read_records(run.completions, "completions")
    loop.step(first, "prompts", first.prompts, lambda: write_records(first.prompts, [
        PromptRecord(id=c.prompt_id, prompt=c.prompt) for c in labeled
    ]))  # fmt: skip
    loop.step(first, "rm shift", first.shift, lambda: loop.distribution_shift(first))
    loop.step(first, "summary", first.row, lambda: loop.row(first))
    todo = [loop.round(n) for n in range(2, cfg.rounds + 1)]
    if all(r.row.exists() for r in todo):  # nothing to label: no server
        for r in todo:
            runner.stage(r.batch, True, lambda: None)
        return
    folder = run.stage("feedback")
    if not (folder / "server.json").exists():
        raise UserError(
            f"{folder}: made by an older rlhfkit (no server.json), so later rounds cannot label on its "
            "server; give a new output_dir or rounds=1"
        )
    with connect(ServerConfig(), folder) as lab:
        for r in todo:
            runner.stage(r.batch, r.row, functools.partial(loop.run_round, r, lab))


def run(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    run = RunFolder(out)
    save_config(cfg, out)
    runner = Runner(run, cfg.resume)
    from rlhfkit.data.corpus import build_default_data

    # The corpus of the base model's pretraining: its held-out prompts are the ones it never saw.
    data = build_default_data(run.stage("data"), seed=cfg.pretrain.data.corpus_seed)
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

    def rl(algorithm: str) -> None:
        c = rl_config(cfg, algorithm)
        c.output_dir, c.prompts, c.model.path = str(run.stage(algorithm)), str(data["prompts_ppo"]), str(sft_model)
        c.reward, c.train.seed = reward, cfg.seed
        c.resume = cfg.resume and (run.stage(algorithm) / "checkpoints").exists()
        ppo_stage.run(c)

    def dpo() -> None:
        c = cfg.dpo.model_copy(deep=True)
        c.output_dir, c.model.path, c.data.pairs = str(run.stage("dpo")), str(sft_model), str(run.pairs)
        c.train.seed = cfg.seed
        c.resume = cfg.resume and (run.stage("dpo") / "checkpoints").exists()
        dpo_stage.run(c)

    for algorithm in cfg.algorithms:
        train = dpo if algorithm == "dpo" else functools.partial(rl, algorithm)
        runner.stage(algorithm, run.results(algorithm), train)

    models = {"sft": str(sft_model), **{a: str(run.model(a)) for a in cfg.algorithms}}

    def evaluate() -> None:
        c = cfg.eval.model_copy(deep=True)
        c.output_dir, c.prompts, c.seed = str(run.stage("eval")), str(data["prompts_heldout"]), cfg.seed
        c.models, c.reference, c.reward = models, str(sft_model), reward
        eval_stage.run(c)

    evaluated = json.loads(run.results("eval").read_text())["models"] if run.results("eval").exists() else {}
    runner.stage("eval", list(evaluated) == list(models), evaluate)

    if cfg.rounds > 1:
        later_rounds(cfg, runner, data, sft_model)

    from rlhfkit.sim.report import write_demo_report

    report = write_demo_report(out)
    print(f"\n[demo] report: {report} (numbers in {run.summary})")
    times = ", ".join(f"{k} {v['seconds']:.0f} (CPU {v['cpu_seconds']:.0f})" for k, v in runner.timings.items())
    print(f"[demo] stage times (s): {times}")
    return report
