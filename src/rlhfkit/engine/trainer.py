"""The one training engine every stage uses (pretrain, SFT, reward model, PPO).

It owns what is the same everywhere: the `accelerate` Accelerator (so one process on a laptop and
`accelerate launch` with DDP/FSDP/DeepSpeed run the same code), the optimizer and LR schedule,
gradient accumulation and clipping, skipping non-finite updates, checkpoints that resume exactly
(model, optimizer, scheduler, RNG, data position, plus any stage state), metrics and progress.

Stages keep their own math: `fit` runs a supervised loop around a stage's `loss_fn`, and PPO
calls the building blocks (`optimizer_step`, `save_checkpoint`, `log`) from its own loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from rlhfkit.config import StrictModel, atomic_write_text
from rlhfkit.engine.metrics import MetricsLogger
from rlhfkit.engine.progress import Progress
from rlhfkit.errors import UserError
from rlhfkit.rl.core import Reduce

Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


class EngineConfig(StrictModel):
    """What the engine needs in every stage: the optimizer, its LR schedule, checkpoints, logging.

    A stage pairs this with its own loop settings: `TrainConfig` adds the supervised loop's batch
    sizes and length (pretrain, SFT, reward model); PPO's sizes live in its `ppo` and `stop` sections.
    """

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine/linear decay floor, as a ratio of lr")
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    max_bad_steps: int = Field(5, gt=0, description="abort after this many non-finite steps in a row")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    report_to: list[Tracker] | None = Field(
        None, description="experiment trackers besides metrics.jsonl (accelerate's); null = TensorBoard if installed"
    )
    tracker_project: str = Field("rlhfkit", description="W&B/Trackio project, MLflow experiment; run = output_dir")


class TrainConfig(EngineConfig):
    """The supervised loop (`Engine.fit`): batches, gradient accumulation, how long, when to evaluate."""

    batch_size: int = Field(16, gt=0, description="micro-batch size per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = derive from epochs")
    epochs: float = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")


class NonFiniteError(RuntimeError):
    """Raised after `max_bad_steps` consecutive non-finite losses/gradients: training diverged."""


def lr_lambda(cfg: EngineConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup, then cosine/linear decay to `min_lr_ratio`."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def make_trackers(names: list[Tracker] | None, out_dir: Path, project: str) -> list[Any]:
    """accelerate trackers for `report_to`: TensorBoard events in OUTPUT_DIR/tensorboard; W&B, MLflow
    and Trackio runs named after the output folder in `project` (their own settings, e.g. offline
    modes and tracking URIs, come from their environment variables: WANDB_MODE=offline,
    MLFLOW_TRACKING_URI, ...). A tracker that is not installed is an error before any work."""
    from accelerate import tracking
    from accelerate.utils import imports

    if names is None:  # the default: TensorBoard is optional (the `dev` extra)
        names = ["tensorboard"] if imports.is_tensorboard_available() else []
    missing = [n for n in names if not getattr(imports, f"is_{n}_available")()]
    if missing:
        raise UserError(
            f"train.report_to: {', '.join(missing)} not installed (pip install {' '.join(missing)}), "
            "or leave it out of train.report_to"
        )
    run = out_dir.resolve().name
    made = {
        "tensorboard": lambda: tracking.TensorBoardTracker("tensorboard", out_dir),
        "wandb": lambda: tracking.WandBTracker(project, name=run),
        "mlflow": lambda: tracking.MLflowTracker(experiment_name=project, run_name=run),
        "trackio": lambda: tracking.TrackioTracker(project, name=run),
    }
    return [made[n]() for n in dict.fromkeys(names)]


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def cpu_process_group() -> bool:
    """Whether this process is one of several launched (`accelerate launch`, torchrun) on a machine
    without an accelerator, so that accelerate must form a gloo (CPU) group: it does so only when
    told `cpu`, else each process runs alone, unaware of the others (and all write the same files).

    The sharded configs on CPU: DeepSpeed needs an accelerator and is refused. FSDP2 (`fully_shard`)
    runs on CPU tensors over gloo, so an FSDP config with `fsdp_version: 2` is honoured (see
    `fsdp_on_cpu`); FSDP1 is refused: accelerate wraps it with a CPU `device_id` that FSDP1 rejects
    ("Inconsistent compute device and `device_id`"), and FSDP1's gather of the full weights for a
    save (`offload_to_cpu=True`, what accelerate asks) crashes with a segmentation fault on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or torch.accelerator.is_available():
        return False
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise UserError(
            "DeepSpeed was asked for (accelerate config) but this machine has no GPU: DeepSpeed runs only on "
            "accelerators. On CPU, launch with configs/accelerate/fsdp.yaml (FSDP2) or configs/accelerate/ddp.yaml"
        )
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError(
            "FSDP with fsdp_version 1 was asked for (accelerate config) but this machine has no GPU: FSDP1 does not "
            "run on CPU. Set `fsdp_version: 2` in the config's fsdp_config (as configs/accelerate/fsdp.yaml does)"
        )
    return True


def fsdp_on_cpu(accelerator: Any) -> None:
    """Make a CPU (gloo) group of processes shard the model with FSDP2, as an FSDP config asks.

    Why needed: accelerate switches to FSDP only for a group of accelerators; on CPU it silently
    runs plain data parallelism instead. FSDP2's `fully_shard` itself works on CPU tensors over
    gloo, so this does what accelerate's own FSDP set-up does for a GPU group (AcceleratorState):
    the plugin read from the `FSDP_*` variables that `accelerate launch` sets, its mixed precision,
    and the distributed type in both of accelerate's shared states (PartialState's is read back
    whenever an AcceleratorState is made again).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def plain_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Any:
    """A plain (unsharded) transformers model of `model`'s class and config, holding `state`.

    FSDP2 turns the model into a subclass of its own class (`FSDP<Class>`, in `torch.distributed`)
    whose parameters are shards; the copy is of the class underneath, on the CPU, in the weights'
    dtype, with the same generation settings, so `save_pretrained` writes what the model would.
    """
    cls = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed."))
    if not hasattr(cls, "_from_config"):
        raise TypeError(f"cannot rebuild a {cls.__name__} from gathered weights: not a transformers model")
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    copy = cls._from_config(model.config, dtype=dtype)
    copy.load_state_dict(state)
    if hasattr(model, "generation_config"):  # generative models only
        copy.generation_config = model.generation_config
    return copy.train(model.training)


class Engine:
    """Accelerator + optimizer + schedule + checkpoints + metrics for one training run."""

    def __init__(self, cfg: EngineConfig, out_dir: str | Path, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        cpu = cpu_process_group()
        self.accelerator = Accelerator(
            cpu=cpu,
            # No buffer broadcast at every forward: our models' buffers (position ids, rotary
            # frequencies) never change, and PPO's processes run different numbers of forwards per
            # step (micro-batches are cut by length), which a per-forward collective would deadlock.
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
            mixed_precision=cfg.mixed_precision,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            log_with=make_trackers(cfg.report_to, self.out_dir, cfg.tracker_project) or None,
        )
        if cpu and _flag("ACCELERATE_USE_FSDP"):
            fsdp_on_cpu(self.accelerator)
        self.accelerator.init_trackers(cfg.tracker_project)
        set_seed(cfg.seed)
        self.total_steps = 0  # optimizer steps planned, set by `setup`
        self.step = 0  # optimizer steps done
        self.micro_step = 0  # micro-batches consumed (data position)
        self.bad_steps = 0
        # Loss/stat values of the optimizer steps since the last log row, the steps skipped since then,
        # and that row: saved in checkpoints so a resumed run logs exactly what an uninterrupted one
        # would, whatever log_every and save_every are.
        self.window: dict[str, list[float]] = {}
        self.skipped = 0
        self.last: dict[str, float] = {}
        self.resume = resume
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(self.out_dir, enabled=self.is_main)

    # ---- set-up -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def all_sum(self) -> Reduce | None:
        """Sums a tensor over the processes (an all-reduce); None in a single process, where the
        statistics functions of `rlhfkit.rl.core` then run their single-process arithmetic.

        The sum is taken on the engine's device (NCCL reduces only GPU tensors; the rollout's scores
        live on the CPU) and handed back where the tensor was."""
        if self.num_processes == 1:
            return None

        def reduce(x: torch.Tensor) -> torch.Tensor:
            total = x.detach().to(self.device, copy=True)
            torch.distributed.all_reduce(total)
            return total.to(x.device)

        return reduce

    def print(self, *args: Any) -> None:
        if self.is_main:
            from rich import print as rprint

            rprint(*args)

    def setup(self, model: torch.nn.Module, total_steps: int, params: list[Any] | None = None) -> torch.nn.Module:
        """Wrap the model, build AdamW + LR schedule for `total_steps` optimizer steps."""
        self.total_steps = total_steps
        if self.sharded and any(hasattr(m, "peft_config") for m in model.modules()):
            raise UserError(
                "model.lora: not supported with sharded weights (FSDP/DeepSpeed): the saved model merges the adapter "
                "into base weights that each process holds only a part of. Train LoRA with configs/accelerate/ddp.yaml "
                "(the frozen base is small in memory next to full fine-tuning's optimizer state)"
            )
        trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        # The fused kernel (transformers' Trainer default too): one pass over each tensor instead of a
        # dozen elementwise ops; on CPU a third of the time of the default loop.
        optimizer = torch.optim.AdamW(
            trainable,
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            eps=self.cfg.adam_eps,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Not prepared on purpose: accelerate would step a prepared scheduler once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg, total_steps))
        self.accelerator.register_for_checkpointing(self.scheduler)
        return self.model

    def unwrap(self, model: torch.nn.Module | None = None) -> Any:
        return self.accelerator.unwrap_model(model if model is not None else self.model)

    @property
    def sharded(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, DeepSpeed; ZeRO-1/2 shard only
        the optimizer state, but their weights are gathered the same way)."""
        return self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")

    def whole_model(self) -> Any:
        """The trained model with all its weights on the main process (None on the others): what every
        stage saves (and what the RM stage normalises).

        A collective: every process must call it. Alone or under DDP it is the unwrapped model itself.
        Sharded (FSDP, DeepSpeed), each process holds a part of every weight, so saving process 0's
        unwrapped module would save a shard: `accelerator.get_state_dict` gathers the full weights
        onto process 0's CPU, where they fill a plain copy of the model (`plain_copy`) that needs no
        other process to be saved or run.
        """
        if not self.sharded:
            return self.unwrap() if self.is_main else None
        state = self.accelerator.get_state_dict(self.model)
        return plain_copy(self.unwrap(), state) if self.is_main else None

    # ---- one optimizer step -------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self) -> float | None:
        """Clip, check finiteness, step. Returns the grad norm, or None if the step was skipped.

        A non-finite gradient skips the update (never written into weights or checkpoints);
        `max_bad_steps` in a row raise NonFiniteError.
        """
        assert self.model is not None and self.optimizer is not None and self.scheduler is not None
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skip_step("non-finite gradient norm")
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps = 0
        self.step += 1
        return grad_norm

    def skip_step(self, why: str) -> None:
        """Count a skipped update; `fit` logs the count (`skipped_steps`) in its next row."""
        self.bad_steps += 1
        self.skipped += 1
        self.print(f"[yellow]warning: step {self.step + 1} skipped ({why}); {self.bad_steps} in a row[/]")
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise NonFiniteError(f"{self.bad_steps} non-finite steps in a row: training diverged (lower train.lr?)")

    @property
    def lr(self) -> float:
        assert self.scheduler is not None
        return float(self.scheduler.get_last_lr()[0])

    # ---- metrics ------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """A row of metrics.jsonl, and the finite numbers to every tracker of `report_to`."""
        step = self.step if step is None else step
        self.metrics.log(metrics, step)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if numbers:
            self.accelerator.log(numbers, step=step)

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, extra: dict[str, Any] | None = None) -> Path:
        """Save everything needed to resume exactly, atomically (temp folder, then rename)."""
        final = self.ckpt_dir / f"step-{self.step:07d}"
        tmp = self.ckpt_dir / f".tmp-step-{self.step:07d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        self.accelerator.wait_for_everyone()  # every process has written its RNG state before the rename
        if self.is_main:
            state = {
                "step": self.step,
                "micro_step": self.micro_step,
                "window": self.window,
                "skipped": self.skipped,
                "last": self.last,
                "num_processes": self.num_processes,
                "extra": extra or {},
            }
            atomic_write_text(tmp / "trainer_state.json", json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.ckpt_dir.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint: a `step-*` folder exists only once fully written (renamed
        from its temp folder), so a run killed at any moment leaves nothing half-saved to pick up."""
        done = sorted(self.ckpt_dir.glob("step-*"))
        return done[-1] if done else None

    def load_checkpoint(self) -> dict[str, Any] | None:
        """Restore the latest checkpoint if `resume` was asked for; returns the stage's extra state.

        Metrics rows after the restored step (all of them, when starting fresh) are dropped: those
        steps are redone, and a metrics file must never hold a step twice. A fresh run also drops
        old checkpoints in its folder, so a later --resume can only pick up this run's own.
        """
        path = self.latest_checkpoint() if self.resume else None
        if path is None:
            if self.resume:
                self.print(f"[yellow]--resume: no checkpoint in {self.ckpt_dir}; starting fresh[/]")
            if self.is_main:
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            self.metrics.truncate_after(-1)
            return None
        state = json.loads((path / "trainer_state.json").read_text())
        saved = state.get("num_processes", self.num_processes)  # absent from checkpoints written before it was kept
        if saved != self.num_processes:
            raise UserError(
                f"--resume: {path} was written by {saved} process(es), this run has {self.num_processes}: each "
                "process's share of the data, its RNG state and the per-process batch sizes depend on the "
                f"number; resume with {saved} process(es) (`accelerate launch --num_processes {saved}`), or start "
                "a fresh run (without --resume) in another output_dir"
            )
        self.accelerator.load_state(str(path))
        self.step, self.micro_step = state["step"], state["micro_step"]
        self.window, self.last = state["window"], state["last"]
        self.skipped = state.get("skipped", 0)  # absent from checkpoints written before it was kept
        self.metrics.truncate_after(self.step)
        self.print(f"resumed from {path} (step {self.step})")
        return state["extra"]

    # ---- the supervised loop (pretrain, SFT, reward model) ------------------------------
    def batches(self, loader: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches in a deterministic order (seed + epoch), starting at `micro_step`.

        Why deterministic: a resumed run must see exactly the batches the killed run would have.
        """
        per_epoch = len(loader)
        epoch, offset = divmod(self.micro_step, per_epoch)
        while True:
            loader.set_epoch(epoch)
            it = self.accelerator.skip_first_batches(loader, offset) if offset else loader
            for batch in it:
                self.micro_step += 1
                yield batch
            epoch, offset = epoch + 1, 0

    def fit(
        self,
        model: torch.nn.Module,
        train_dataset: Any,
        collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
        loss_fn: LossFn,
        eval_fn: EvalFn | None = None,
        desc: str = "train",
    ) -> dict[str, float]:
        """Train `model` on `train_dataset` with `loss_fn`; returns the last logged metrics."""
        cfg = self.cfg
        if not isinstance(cfg, TrainConfig):
            raise TypeError("Engine.fit runs the supervised loop: the engine needs a TrainConfig")
        from torch.utils.data import DataLoader

        loader = DataLoader(
            train_dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=collate_fn,
            drop_last=len(train_dataset) >= cfg.batch_size * self.accelerator.num_processes,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        loader = self.accelerator.prepare(loader)
        steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        model = self.setup(model, total)
        self.load_checkpoint()
        model.train()
        batches = self.batches(loader)
        bar = Progress(total, desc, every=cfg.log_every, initial=self.step, enabled=self.is_main)
        t0, tokens = time.perf_counter(), 0
        while self.step < total:
            # this step's values go into the window only once it is applied: a skipped step's NaNs
            # (or the finite stats of its other micro-batches) must not average into the next row
            losses: list[float] = []
            step_stats: dict[str, list[float]] = {}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                sync = micro == cfg.grad_accum - 1
                with nullcontext() if sync else self.accelerator.no_sync(model):
                    loss, stats = loss_fn(model, batch)
                    self.backward(loss / cfg.grad_accum)
                losses.append(float(loss.detach()))
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                for k, v in stats.items():
                    step_stats.setdefault(k, []).append(float(v))
            if not all(math.isfinite(x) for x in losses):
                self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                self.skip_step("non-finite loss")
                continue
            grad_norm = self.optimizer_step()
            if grad_norm is None:
                continue
            for k, v in {**step_stats, "loss": losses}.items():
                self.window.setdefault(k, []).extend(v)
            if self.step % cfg.log_every == 0 or self.step == total:
                dt = time.perf_counter() - t0
                self.last = {k: sum(v) / len(v) for k, v in self.window.items()}
                self.last.update(
                    lr=self.lr,
                    grad_norm=grad_norm,
                    tokens_per_s=tokens / dt if dt > 0 else 0.0,
                    skipped_steps=self.skipped,
                )
                self.log(self.last)
                bar.set_postfix(loss=f"{self.last['loss']:.4f}")
                self.window, self.skipped, t0, tokens = {}, 0, time.perf_counter(), 0
            bar.update(1)  # after the log row, so that a progress line shows this step's loss
            due = cfg.eval_every and self.step % cfg.eval_every == 0
            if eval_fn is not None and due and self.step < total:  # the last step is evaluated once, below
                self.evaluate(model, eval_fn)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                self.save_checkpoint()
        bar.close()
        if eval_fn is not None:
            self.last.update(self.evaluate(model, eval_fn))
        self.save_checkpoint()
        return self.last

    def evaluate(self, model: torch.nn.Module, eval_fn: EvalFn) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            result = eval_fn(model)
        model.train()
        self.log(result)
        self.print(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return result
