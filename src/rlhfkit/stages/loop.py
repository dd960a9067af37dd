"""`rlhfkit loop`: rounds of feedback on the *current* policy (iterated RLHF).

Each round, in `OUTPUT_DIR/round-N/`:

    fresh prompts from the pool → candidates of several policies (`candidates`) → the labeling
    server as batch `round-N` → wait for its labels → aggregate → reward model → PPO → eval

Why rounds: a reward model trained once, on the SFT model's samples, never sees what the PPO
policy writes, which is where it is wrong. Comparing the current, the previous and the SFT policy's
answers to new prompts teaches it the new distribution (InstructGPT; Bai et al. 2022).

- prompts: `prompts_per_round` of `pool` never labeled in an earlier round (each round's are in
  `round-N/prompts.jsonl`); when the pool runs out, the run stops with an error saying so. With
  `select=random|uncertainty|disagreement`, candidates are sampled for `select_from` fresh prompts
  and `prompts_per_round` of them are labeled (`rlhfkit.labels.select`; uncertainty: the smallest
  margin of the previous round's reward model; disagreement: the largest spread of 5 linear heads
  on that reward model's features, fitted on bootstrap samples of the pairs it learned from);
  the others stay fresh.
- reward model: `rm.mode=retrain` trains from the SFT model on every round's pairs; `continue`
  trains the last round's reward model on this round's pairs plus `rm.replay` of the earlier ones.
  Each round's pairs are split by prompt (`rm.data.valid_fraction`): the held-out part measures the
  new reward model, and the *previous* reward model is scored on all of the new round's pairs
  (how far the policy moved out of what it knew).
- PPO starts from the current policy; its KL reference is the SFT model (`ppo.reference=sft`) or
  the previous round's policy (`previous`).
- eval: on the same held-out prompts every round, the new policy against SFT and against the
  previous round (gold utility, toxicity, KL to SFT, length, win rates with bootstrap CIs).
- stop after `rounds`, or earlier when the gold gain over the previous round is below
  `stop.gold_plateau`, or the eval reward reaches `stop.reward`.

Set by the loop each round, so refused as overrides: rm.output_dir, rm.resume, rm.model.path,
rm.data.pairs, rm.data.valid, rm.normalize.policy, rm.normalize.prompts (ppo.prompts, else the
pool); ppo.output_dir, ppo.resume, ppo.model.path, ppo.ref_model (`ppo.reference`), ppo.reward
(the round's reward model); and eval.output_dir, eval.models, eval.reference, eval.reward.

Every step writes its output last, and a re-run (after Ctrl-C or kill -9) skips what is there:
it continues at the round and step where it stopped; a batch is sent to the server once (see
`rlhfkit.loop.labeling`), and labels already given are kept. `results.json` (one row per round)
and `report.html` are rewritten after each round.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.batching import split_by_prompt
from rlhfkit.data.formats import Completions, Pair, read_records, write_records
from rlhfkit.errors import UserError
from rlhfkit.loop.labeling import Labeling, LabelsConfig, ServerConfig, connect, simulated_labeling
from rlhfkit.models.device import DEVICE_HELP, Device, resolve_device
from rlhfkit.models.loading import ModelConfig
from rlhfkit.models.sampling import SamplingConfig
from rlhfkit.rewards.build import RewardConfig, RewardSpec
from rlhfkit.stages import aggregate as aggregate_stage
from rlhfkit.stages import eval as eval_stage
from rlhfkit.stages import ppo as ppo_stage
from rlhfkit.stages import rm as rm_stage
from rlhfkit.stages.generate import sample_completions

NAMED_SOURCES = ("current", "previous", "sft")


class CandidateSource(StrictModel):
    model: str = Field(description="current | previous (the policy before this one) | sft | a model folder")
    k: int = Field(1, ge=1, description="candidates of this model per prompt")
    sampling: SamplingConfig = SamplingConfig()


def _default_candidates() -> list[CandidateSource]:
    return [CandidateSource(model="current", k=2), CandidateSource(model="previous"), CandidateSource(model="sft")]


# What the loop sets in `rm.*` and `ppo.*` each round (the round's folders, the models it chains):
# an override would be silently replaced, so it is refused instead.
FILLED_EACH_ROUND = {
    "rm": ("output_dir", "resume", "model.path", "data.pairs", "data.valid", "normalize.policy", "normalize.prompts"),
    "ppo": ("output_dir", "resume", "model.path", "ref_model", "reward"),
}


def _refuse_filled(section: str, cfg: StrictModel, default: StrictModel) -> None:
    for dotted in FILLED_EACH_ROUND[section]:
        value, expected = cfg, default
        for part in dotted.split("."):
            value, expected = getattr(value, part), getattr(expected, part)
        if value != expected:
            raise ValueError(f"{section}.{dotted}: `rlhfkit loop` sets it each round; leave it out")


class RoundRMConfig(rm_stage.Config):
    """`rlhfkit rm`'s settings plus how rounds feed it; FILLED_EACH_ROUND["rm"] are the loop's."""

    mode: Literal["retrain", "continue"] = Field(
        "retrain", description="retrain from SFT on all rounds' pairs, or continue the last RM"
    )
    replay: float = Field(0.5, ge=0, le=1, description="mode=continue: share of earlier rounds' pairs replayed")

    @model_validator(mode="after")
    def _check(self) -> RoundRMConfig:
        _refuse_filled("rm", self, rm_stage.Config())
        return self


class RoundPPOConfig(ppo_stage.Config):
    """`rlhfkit ppo`'s settings; FILLED_EACH_ROUND["ppo"] are the loop's."""

    reference: Literal["sft", "previous"] = Field("sft", description="KL reference: SFT or the previous policy")

    @model_validator(mode="after")
    def _check(self) -> RoundPPOConfig:
        _refuse_filled("ppo", self, ppo_stage.Config())
        return self


class StopConfig(StrictModel):
    gold_plateau: float | None = Field(None, description="stop when the gold gain over the last round is below this")
    reward: float | None = Field(None, description="stop when the eval reward of the round's policy reaches this")


class Config(StrictModel):
    output_dir: str = "runs/loop"
    resume: bool = Field(True, description="continue the run in output_dir (false: refuse to touch an existing one)")
    seed: int = 0
    device: Device = Field(
        "auto", description="candidates, the previous RM's accuracy, the simulated panel: " + DEVICE_HELP
    )
    sft: str = Field("", description="the SFT model folder (KL anchor, a candidate source, the RM's start)")
    policy: str = Field("", description="the policy round 1 starts from (empty = the SFT model)")
    pool: str = Field("", description="prompts to label ({id, prompt}); each round takes fresh ones")
    rounds: int = Field(2, ge=1, description="rounds to run (a re-run with more continues)")
    prompts_per_round: int = Field(100, gt=0)
    candidates: list[CandidateSource] = Field(default_factory=_default_candidates, description="who answers prompts")
    select: Literal["all", "random", "uncertainty", "disagreement"] = Field(
        "all", description="which prompts' candidates are labeled: all, or prompts_per_round of select_from"
    )
    select_from: int = Field(0, ge=0, description="select: fresh prompts sampled per round (0 = 2 x prompts_per_round)")
    server: ServerConfig = ServerConfig()
    labels: LabelsConfig = LabelsConfig()
    rm: RoundRMConfig = RoundRMConfig()
    ppo: RoundPPOConfig = RoundPPOConfig()
    eval: eval_stage.Config = eval_stage.Config()
    stop: StopConfig = StopConfig()


def _is_model(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def check_inputs(cfg: Config) -> None:
    """Everything that can be checked before the first round writes anything."""
    if not cfg.sft:
        raise UserError("sft: no SFT model given; set sft=FOLDER")
    for key, path in (("sft", cfg.sft), ("policy", cfg.policy)):
        if path and not _is_model(path):
            raise UserError(f"{key}: {path} is not a model folder (no config.json)")
    if not cfg.pool:
        raise UserError("pool: no prompt pool given; set pool=FILE.jsonl ({id, prompt} lines)")
    if not cfg.eval.prompts:
        raise UserError("eval.prompts: no held-out prompts given; set eval.prompts=FILE.jsonl")
    for i, src in enumerate(cfg.candidates):
        if src.model not in NAMED_SOURCES and not _is_model(src.model):
            raise UserError(
                f"candidates[{i}].model: {src.model!r} is neither one of {', '.join(NAMED_SOURCES)} nor a model folder"
            )
    if not cfg.resume and (Path(cfg.output_dir) / "round-1").exists():
        raise UserError(f"resume=false: {cfg.output_dir} already holds rounds; give a new output_dir")
    if sum(s.k for s in cfg.candidates) < 2:
        raise UserError("candidates: labelers compare answers; give at least 2 candidates per prompt in all")


class Round:
    """Paths of round `n` inside the run folder; each step's `done` file is the one it writes last.

    `first`: round 1 when it was run by other means (`rlhfkit demo`'s own stages, see
    `RunFolder.round`); later rounds find its prompts, pairs, reward model and policy there."""

    def __init__(self, root: Path, n: int, first: Round | None = None):
        self.n, self.root, self.first = n, root, first
        self.dir = root / f"round-{n}"
        self.batch = f"round-{n}"
        self.name = f"round-{n}"  # the round's policy in evaluations
        self.offered = self.dir / "offered.jsonl"
        self.prompts = self.dir / "prompts.jsonl"
        self.offered_candidates = self.dir / "candidates" / "offered.jsonl"
        self.candidates = self.dir / "candidates" / "completions.jsonl"
        self.imported = self.dir / "labels" / "imported.json"
        self.labels = self.dir / "labels"
        self.labeled = self.labels / "completions.jsonl"
        self.aggregate = self.dir / "aggregate"
        self.pairs = self.aggregate / "pairs.jsonl"
        self.rm_data = self.dir / "rm-data"
        self.rm = self.dir / "rm"
        self.shift = self.dir / "shift.json"
        self.ppo = self.dir / "ppo"
        self.eval = self.dir / "eval"
        self.row = self.dir / "round.json"

    def sibling(self, k: int) -> Round:
        """Round k of the same run."""
        return self.first if k == 1 and self.first is not None else Round(self.root, k, self.first)

    def previous(self) -> Round:
        return self.sibling(self.n - 1)


def fresh_prompts(cfg: Config, r: Round) -> list[Any]:
    """Round r's offered prompts: the next ones of the (seeded) shuffled pool that no earlier round
    had labeled; `prompts_per_round` of them, or up to `select_from` when selecting (those not
    selected stay fresh)."""
    pool = read_records(cfg.pool, "prompts")
    random.Random(cfg.seed).shuffle(pool)
    used = {p.id for k in range(1, r.n) for p in read_records(r.sibling(k).prompts, "prompts")}
    fresh = [p for p in pool if p.id not in used]
    if len(fresh) < cfg.prompts_per_round:
        raise UserError(
            f"pool: round {r.n} needs {cfg.prompts_per_round} fresh prompts, but only {len(fresh)} of the "
            f"{len(pool)} in {cfg.pool} were never labeled; add prompts to the pool or lower prompts_per_round"
        )
    return fresh[: offered_count(cfg)]


def offered_count(cfg: Config) -> int:
    if cfg.select == "all":
        return cfg.prompts_per_round
    return max(cfg.prompts_per_round, cfg.select_from or 2 * cfg.prompts_per_round)


def split_pairs(cfg: Config, r: Round) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs of round r, split by prompt (seeded, the same on every call)."""
    pairs = read_records(r.pairs, "pairs")
    return split_by_prompt(pairs, cfg.rm.data.valid_fraction, cfg.seed + r.n)


def rm_training_pairs(cfg: Config, r: Round) -> list[Pair]:
    """retrain: every round's training pairs; continue: this round's plus `replay` of the earlier ones."""
    earlier = [p for k in range(1, r.n) for p in split_pairs(cfg, r.sibling(k))[0]]
    own = split_pairs(cfg, r)[0]
    if cfg.rm.mode == "retrain":
        return earlier + own
    replay = random.Random(cfg.seed + r.n).sample(earlier, round(len(earlier) * cfg.rm.replay))
    return replay + own


@torch.no_grad()
def rm_accuracy(rm_dir: Path, pairs: list[Pair], device: Device = "auto") -> float | None:
    """Share of pairs a reward model orders like the labelers' consensus (a tie counts as wrong)."""
    from rlhfkit.rewards.losses import pairwise_accuracy
    from rlhfkit.rewards.model import RewardModel

    if not pairs:
        return None
    rm = RewardModel.load(rm_dir / "model", device=resolve_device(device))
    prompts = [p.prompt for p in pairs]
    chosen = rm.score(prompts, [p.chosen for p in pairs])
    rejected = rm.score(prompts, [p.rejected for p in pairs])
    return float(pairwise_accuracy(chosen, rejected))


class Loop:
    """One run of rounds: which policy is current, and each step of a round, skipped when done."""

    def __init__(self, cfg: Config, sft: Path, first: Round | None = None):
        self.cfg, self.sft, self.first = cfg, sft, first
        self.root = Path(cfg.output_dir)
        self.start = Path(cfg.policy) if cfg.policy else sft

    def round(self, n: int) -> Round:
        return Round(self.root, 0, self.first).sibling(n)

    def policy_after(self, n: int) -> Path:
        """The policy after round n (round 0: the start)."""
        return self.round(n).ppo / "model" if n > 0 else self.start

    def policy_name(self, n: int) -> str:
        return self.round(n).name if n > 0 else ("sft" if self.start == self.sft else "start")

    def step(self, r: Round, name: str, done: Path, fn: Callable[[], Any]) -> None:
        if done.exists():
            print(f"[loop] round {r.n} {name}: done")
            return
        print(f"\n[loop] ===== round {r.n}: {name} =====")
        t = time.perf_counter()
        fn()
        print(f"[loop] round {r.n} {name}: {time.perf_counter() - t:.0f}s")

    def source_path(self, src: CandidateSource, n: int) -> Path:
        named = {"current": self.policy_after(n - 1), "previous": self.policy_after(max(0, n - 2)), "sft": self.sft}
        return named.get(src.model, Path(src.model))

    # ---- the steps of round r

    def choose_prompts(self, r: Round) -> None:
        write_records(r.offered, fresh_prompts(self.cfg, r))

    def generate(self, r: Round) -> None:
        records = read_records(r.offered, "prompts")
        per_source = []
        for i, src in enumerate(self.cfg.candidates):
            path = self.source_path(src, r.n)
            print(f"[loop] {src.k} candidate(s) per prompt from {src.model} ({path})")
            seed = self.cfg.seed + 1000 * r.n + i
            model = ModelConfig(path=str(path))
            per_source.append(sample_completions(model, records, src.k, src.sampling, seed, self.cfg.device))
        rows = [
            Completions(prompt_id=p.id, prompt=p.prompt, completions=[t for texts in per_source for t in texts[j]])
            for j, p in enumerate(records)
        ]
        write_records(r.offered_candidates, rows)

    def select(self, r: Round) -> None:
        """`prompts_per_round` of the offered candidate sets for the labelers (`select`): all, a
        random share, those the previous round's reward model is least sure about, or those an
        ensemble of heads on it disagrees on most (round 1 has no reward model yet: random). The round's
        `prompts.jsonl` (the labeled ones) is written first, the candidates file, which marks the
        step done, last."""
        from rlhfkit.labels.select import head_ensemble_scorer, select_prompts, sources_scorer

        sets = read_records(r.offered_candidates, "completions")
        method = self.cfg.select if self.cfg.select in ("all", "random") or r.n > 1 else "random"
        scorer = None
        if method == "uncertainty":
            from rlhfkit.rewards.build import build_reward

            rm = RewardConfig(sources=[RewardSpec(model=str(r.previous().rm / "model"))])
            scorer = sources_scorer([build_reward(rm, resolve_device(self.cfg.device))])
        elif method == "disagreement":
            from rlhfkit.rewards.model import RewardModel

            previous = RewardModel.load(r.previous().rm / "model", device=resolve_device(self.cfg.device))
            pairs = rm_training_pairs(self.cfg, r.previous())  # what that reward model learned from
            scorer = head_ensemble_scorer(previous, pairs, seed=self.cfg.seed + r.n)
        chosen = sorted(select_prompts(sets, self.cfg.prompts_per_round, method, scorer, self.cfg.seed + r.n))
        if method != "all":
            print(f"[loop] select={method}: {len(chosen)} of {len(sets)} candidate sets go to the labelers")
        offered = read_records(r.offered, "prompts")
        write_records(r.prompts, [offered[i] for i in chosen])
        write_records(r.candidates, [sets[i] for i in chosen])

    def collect(self, r: Round, lab: Labeling) -> None:
        """Import once, wait for the labels (the simulated panel labels meanwhile), export them."""
        lab.import_once(r.batch, r.candidates, r.imported)
        simulated = self.cfg.labels.labelers == "simulated"
        label = simulated_labeling(lab, r.candidates, self.cfg.seed + r.n, self.cfg.device) if simulated else None
        lab.wait(r.batch, self.cfg.labels, label)
        lab.fetch(r.batch, r.labels)

    def aggregate(self, r: Round) -> None:
        c = aggregate_stage.Config(
            rankings=str(r.labels / "judgments.jsonl"), completions=str(r.labeled), output_dir=str(r.aggregate)
        )
        aggregate_stage.run(c)

    def reward_model(self, r: Round) -> None:
        train = rm_training_pairs(self.cfg, r)
        heldout = split_pairs(self.cfg, r)[1]
        write_records(r.rm_data / "heldout.jsonl", heldout)
        write_records(r.rm_data / "train.jsonl", train)
        start = r.previous().rm / "model" if self.cfg.rm.mode == "continue" and r.n > 1 else self.sft
        c = rm_stage.Config.model_validate(self.cfg.rm.model_dump(exclude={"mode", "replay"}))
        c.output_dir, c.model.path = str(r.rm), str(start)
        c.data.pairs, c.data.valid = str(r.rm_data / "train.jsonl"), str(r.rm_data / "heldout.jsonl") if heldout else ""
        c.data.valid_fraction = 0.0
        c.normalize.policy = str(self.policy_after(r.n - 1))  # PPO's starting point scores mean 0, std 1
        c.normalize.prompts = self.cfg.ppo.prompts or self.cfg.pool
        c.resume = (r.rm / "checkpoints").exists()
        rm_stage.run(c)

    def distribution_shift(self, r: Round) -> None:
        """The previous round's RM on this round's pairs (all of them, and the held-out part)."""
        info: dict[str, Any] = {"rm_accuracy_heldout": _json(r.rm / "results.json").get("valid_accuracy")}
        if r.n > 1:
            train, heldout = split_pairs(self.cfg, r)
            info["previous_rm_accuracy"] = rm_accuracy(r.previous().rm, train + heldout, self.cfg.device)
            info["previous_rm_accuracy_heldout"] = rm_accuracy(r.previous().rm, heldout, self.cfg.device)
        atomic_write_text(r.shift, json.dumps(info, indent=2) + "\n")

    def ppo(self, r: Round) -> None:
        c = ppo_stage.Config.model_validate(self.cfg.ppo.model_dump(exclude={"reference"}))
        c.output_dir, c.model.path = str(r.ppo), str(self.policy_after(r.n - 1))
        c.prompts = self.cfg.ppo.prompts or self.cfg.pool
        c.ref_model = str(self.sft if self.cfg.ppo.reference == "sft" else self.policy_after(r.n - 1))
        c.reward = RewardConfig(sources=[RewardSpec(model=str(r.rm / "model"))])
        c.resume = (r.ppo / "checkpoints").exists()
        ppo_stage.run(c)

    def evaluate(self, r: Round) -> None:
        c = self.cfg.eval.model_copy(deep=True)
        models = {"sft": str(self.sft), self.policy_name(r.n - 1): str(self.policy_after(r.n - 1))}
        models[self.policy_name(r.n)] = str(self.policy_after(r.n))
        c.output_dir, c.models, c.reference, c.seed = str(r.eval), models, str(self.sft), self.cfg.seed
        c.baselines = [name for name in models if name not in ("sft", self.policy_name(r.n))]
        c.reward = RewardConfig(sources=[RewardSpec(model=str(r.rm / "model"))])
        eval_stage.run(c)

    def row(self, r: Round) -> None:
        atomic_write_text(r.row, json.dumps(round_row(self, r), indent=2) + "\n")

    def run_round(self, r: Round, lab: Labeling) -> dict[str, Any]:
        self.step(r, "prompts", r.offered, lambda: self.choose_prompts(r))
        self.step(r, "candidates", r.offered_candidates, lambda: self.generate(r))
        self.step(r, "select", r.candidates, lambda: self.select(r))
        self.step(r, "labels", r.labeled, lambda: self.collect(r, lab))
        self.step(r, "aggregate", r.aggregate / "agreement.json", lambda: self.aggregate(r))
        self.step(r, "rm", r.rm / "results.json", lambda: self.reward_model(r))
        self.step(r, "rm shift", r.shift, lambda: self.distribution_shift(r))
        self.step(r, "ppo", r.ppo / "results.json", lambda: self.ppo(r))
        self.step(r, "eval", r.eval / "results.json", lambda: self.evaluate(r))
        self.step(r, "summary", r.row, lambda: self.row(r))
        return json.loads(r.row.read_text())


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def round_row(loop: Loop, r: Round) -> dict[str, Any]:
    """Round r's line of the results table."""
    ev = _json(r.eval / "results.json")
    name, prev = loop.policy_name(r.n), loop.policy_name(r.n - 1)
    m = ev["models"][name]
    agreement = _json(r.aggregate / "agreement.json")
    progress_items = len(read_records(r.labeled, "completions"))
    row: dict[str, Any] = {
        "round": r.n,
        "prompts": len(read_records(r.prompts, "prompts")),
        "items": progress_items,
        "judgments": agreement.get("judgments"),
        "labeler_agreement": agreement.get("pairwise_agreement"),
        "pairs": len(read_records(r.pairs, "pairs")),
        **_json(r.shift),
        "ppo_steps": _json(r.ppo / "results.json").get("steps"),
        **{k: m.get(k) for k in ("gold", "reward", "toxicity", "kl", "length")},
        "sft_gold": ev["models"]["sft"].get("gold"),
        "vs_sft": ev["comparisons"].get(f"{name}_vs_sft", {}),
    }
    if prev != "sft":
        row["vs_previous"] = ev["comparisons"].get(f"{name}_vs_{prev}", {})
    return row


def stop_reason(cfg: Config, rows: list[dict[str, Any]]) -> str | None:
    """Why the loop stops after the last of `rows` (None: go on)."""
    last = rows[-1]
    if cfg.stop.reward is not None and last.get("reward") is not None and last["reward"] >= cfg.stop.reward:
        return f"eval reward {last['reward']:.3f} reached stop.reward={cfg.stop.reward:g}"
    if cfg.stop.gold_plateau is not None and len(rows) > 1:
        gain = last["gold"] - rows[-2]["gold"]
        if gain < cfg.stop.gold_plateau:
            return f"gold gain over the previous round {gain:+.3f} is below stop.gold_plateau={cfg.stop.gold_plateau:g}"
    return None


def run_rounds(cfg: Config, sft: Path) -> dict[str, Any]:
    """The rounds, from an SFT model already trained (what `rlhfkit demo` would call); returns the
    results (also in `OUTPUT_DIR/results.json`)."""
    from rlhfkit.loop.report import write_loop_report

    check_inputs(cfg.model_copy(update={"sft": str(sft)}))
    loop = Loop(cfg, sft)
    root = loop.root
    rows: list[dict[str, Any]] = []
    stopped = None
    with connect(cfg.server, root / "server") as lab:
        save_config(cfg, root)
        for n in range(1, cfg.rounds + 1):
            rows.append(loop.run_round(loop.round(n), lab))
            results = {"rounds": rows, "stopped": None}
            stopped = stop_reason(cfg, rows)
            results["stopped"] = stopped
            atomic_write_text(root / "results.json", json.dumps(results, indent=2) + "\n")
            write_loop_report(root, results)
            if stopped:
                print(f"[loop] stopping after round {n}: {stopped}")
                break
    _print_rounds(rows)
    return {"rounds": rows, "stopped": stopped}


def _print_rounds(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        vs = row.get("vs_previous") or row["vs_sft"]
        g = vs.get("gold", {})
        print(
            f"[loop] round {row['round']}: gold {row['gold']:.3f} (SFT {row['sft_gold']:.3f}), "
            f"RM held-out acc {row['rm_accuracy_heldout'] or float('nan'):.3f}, "
            f"gold vs {'previous' if 'vs_previous' in row else 'SFT'} {g.get('mean_diff', float('nan')):+.3f} "
            f"[{g.get('ci_low', float('nan')):+.3f}, {g.get('ci_high', float('nan')):+.3f}]"
        )


def run(cfg: Config) -> dict[str, Any]:
    check_inputs(cfg)
    return run_rounds(cfg, Path(cfg.sft))
