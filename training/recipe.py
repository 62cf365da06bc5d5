"""The fine-tuning recipe: ``train(config) -> TrainResult``.

Read :func:`train` top to bottom: it composes small components defined below it
(data, model + PEFT, memory pre-flight, optimizer + schedule, the step, evaluation,
checkpoints, outputs). The same function serves the CLI, Python, the HTTP job
worker (through ``on_event`` / ``should_stop``) and ``torchrun`` (DistributedDataParallel,
NCCL on CUDA, gloo on CPU; rank 0 writes metrics and checkpoints).

One optimizer step consumes ``batch x accumulate x world_size`` images. The loss of
each micro-batch is ultralytics' detection loss per image; gradients are the mean
over the micro-batches of the step, so k accumulated micro-batches, k processes, or
one k-times larger batch (with equal per-micro-batch statistics) give the same update.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tqdm import tqdm

from models.detection import DetectionModel, architecture_names
from models.errors import CheckpointError, ConfigError, DataError, GlassesVisionError
from models.io import atomic_write_json, atomic_write_text
from models.registry import create_model
from training.checkpoint import (find_checkpoint, load_checkpoint, read_checkpoint_info, rng_state,
                                 rng_state_for_rank, save_checkpoint, set_rng_state)
from training.config import TrainConfig
from training.data import build_dataset, collate
from training.evaluate import evaluate
from training.memory import MemoryReport, measure_memory, optimizer_state_bytes
from training.settings import check_parts
from service.layers.peft import apply_peft, find_peft_state, merged_copy, save_adapter

EventFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]


class NonFiniteLossError(GlassesVisionError):
    """The loss (or gradient norm) became NaN / inf; training stopped and the last good checkpoint was kept."""

    http_status = 422

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    status: str  # "completed" | "stopped"
    steps: int
    total_steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    best_map50_95: float | None = None
    losses: list[float] = field(default_factory=list)  # per optimizer step run in this call
    memory: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    adapter_dir: Path | None = None
    merged_dir: Path | None = None
    best_dir: Path | None = None


@dataclass
class RunState:
    """Where the loop stands; with the components' own state dicts, what a checkpoint brings back."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_map50_95: float | None = None
    last_checkpoint_step: int | None = None


@dataclass
class Run:
    """Everything one training run works with, built once at the top of :func:`train`."""

    cfg: TrainConfig
    dist: "DistInfo"
    device: torch.device
    run_dir: Path
    model: DetectionModel
    ddp: nn.Module  # the model, or its DistributedDataParallel wrapper
    criterion: Any
    autocast: Callable[[], Any]
    optimizer: Any
    scheduler: Any
    ema: Any
    log: "MetricsLog"
    emit: EventFn
    state: RunState = field(default_factory=RunState)

    @property
    def eval_model(self) -> DetectionModel:
        """The weights that are evaluated and shipped: the EMA when there is one."""
        return self.ema.ema if self.ema is not None else self.model


def train(config: TrainConfig, on_event: EventFn | None = None, should_stop: StopFn | None = None) -> TrainResult:
    """Fine-tune a detector as ``config`` says; see docs/TRAINING.md for the run directory it writes."""
    started = time.perf_counter()
    dist_info = DistInfo.current()
    cfg = resolve_resume_config(config, dist_info.world).validate()
    emit = on_event or (lambda event: None)
    should_stop = should_stop or (lambda: False)
    device = pick_device(cfg.device, dist_info)
    if cfg.in_backward and dist_info.world > 1:
        raise ConfigError("optimizer-in-backward steps before DistributedDataParallel has averaged the gradients; "
                          "turn in_backward off or run one process")
    run_dir = Path(cfg.out)
    # a stream per process, or every process draws the same augmentation for its different images; rank 0's is
    # a one-process run's (weights start equal anyway: DistributedDataParallel copies rank 0's)
    seed_everything(cfg.seed + dist_info.rank)

    # 1. data: fail on a missing / empty dataset before building anything heavy
    train_ds, val_ds = build_datasets(cfg)
    replay_ds = build_replay_dataset(cfg, train_ds)
    replay_n = len(replay_ds) if replay_ds is not None else 0
    steps_per_epoch = BatchPlan.for_run(cfg, len(train_ds), dist_info.world, replay_n).check().steps_per_epoch
    total_steps = min(cfg.max_steps or 1 << 62, cfg.epochs * steps_per_epoch)

    # 2. model + PEFT + memory savers
    model = build_model(cfg, list(train_ds.names))
    model.to(device, memory_format=training_memory_format(device))
    trainable = trainable_summary(model)
    model.set_gradient_checkpointing(tuple(cfg.grad_checkpoint), cfg.grad_checkpoint_policy)
    criterion = build_criterion(model)
    autocast = amp_context(cfg.amp, device)

    # 3. memory pre-flight: one real micro-batch, exact bytes, before any weight changes
    memory = preflight_memory(model, criterion, train_ds, cfg, device, autocast)

    # 4. optimizer, schedule, EMA; DDP wrapper; the run's state in one place
    optimizer = build_optimizer_for(cfg, model)
    run = Run(cfg=cfg, dist=dist_info, device=device, run_dir=run_dir, model=model,
              ddp=wrap_distributed(model, device, dist_info), criterion=criterion, autocast=autocast,
              optimizer=optimizer, scheduler=build_scheduler_for(cfg, optimizer, total_steps),
              ema=build_ema(cfg, model), log=MetricsLog(run_dir / "metrics.jsonl", enabled=dist_info.is_main), emit=emit)

    # 5. resume or start fresh (a fresh run first clears what an earlier run left in its folder)
    if cfg.resume:
        restore(run, cfg.resume)
        if run.state.step > total_steps:
            raise ConfigError(f"the checkpoint in {cfg.resume} is at step {run.state.step}, past this run's "
                              f"{total_steps} steps (max_steps {cfg.max_steps}, epochs {cfg.epochs} of "
                              f"{steps_per_epoch} steps); raise max_steps or epochs to continue it")
    state = run.state
    if dist_info.is_main:
        continues_here = cfg.resume is not None and run_dir_of(find_checkpoint(cfg.resume)) == run_dir.resolve()
        prepare_run_dir(run_dir, cfg, keep_until_step=state.step if continues_here else None)
    emit({"event": "start", "run_dir": str(run_dir), "total_steps": total_steps, "step": state.step,
          "trainable": trainable, "world_size": dist_info.world})

    # 6. the loop
    losses: list[float] = []
    status = "completed"
    metrics: dict[str, Any] = {}
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
               disable=cfg.quiet or not dist_info.is_main, dynamic_ncols=True)
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(state.epoch, n_epochs):
        start_in_epoch = state.epoch_step if epoch == state.epoch else 0
        batches = iter(build_loader(train_ds, cfg, dist_info, epoch, start_in_epoch, steps_per_epoch, replay_ds))
        for epoch_step in range(start_in_epoch, steps_per_epoch):
            if state.step >= total_steps:
                break
            parts, grad_norm, lr = optimizer_step(run, batches, epoch)
            state.step += 1
            state.epoch, state.epoch_step = (epoch + 1, 0) if epoch_step + 1 == steps_per_epoch else (epoch, epoch_step + 1)
            losses.append(parts["loss"])
            if memory.get("optimizer_state") is None:  # the optimizer's state exists after its first step
                memory = finish_memory_report(memory, optimizer, run_dir, dist_info)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}", epoch=epoch + 1)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                record = {"kind": "train", "step": state.step, "epoch": epoch + 1, "loss": parts["loss"],
                          **parts["items"], "lr": lr, "grad_norm": grad_norm,
                          "time_s": round(time.perf_counter() - started, 3)}
                run.log.write(record)
                emit({"event": "step", **record, "total_steps": total_steps})
            end_of_epoch = state.epoch_step == 0
            if end_of_epoch and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and state.step < total_steps:
                metrics = run_eval(run, val_ds, epoch)
            stop_now = broadcast_flag(bool(should_stop()) if dist_info.is_main else False, dist_info)
            if (cfg.save_every and state.step % cfg.save_every == 0) or end_of_epoch or stop_now \
                    or state.step == total_steps:
                save_training_state(run)
            if stop_now:
                status = "stopped"
                break
        if status == "stopped" or state.step >= total_steps:
            break
    bar.close()

    # 7. outputs: final evaluation, adapter, merged weights, plots, summary
    result = TrainResult(run_dir=run_dir, status=status, steps=state.step, total_steps=total_steps, losses=losses,
                         memory=memory, trainable=trainable, metrics=metrics, best_map50_95=state.best_map50_95)
    write_outputs(run, result, val_ds, last_epoch=n_epochs - 1, started=started)
    emit({"event": "end", "status": status, "step": state.step, "metrics": result.metrics, "run_dir": str(run_dir)})
    return result


# ---------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "DistInfo":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        return cls()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    if info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.broadcast(t, 0)
    return bool(t.item())


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world
    return values


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available; use device: cpu")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def wrap_distributed(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- config
#: Settings a resumed run may set differently from the run it continues: how long it trains (the cosine schedule
#: is stretched to the new total from the current step on), how often it evaluates, logs and saves, where it
#: writes, how it loads, and how a step's images are split into micro-batches (the global batch
#: ``batch x accumulate x processes`` must stay; :func:`check_resume_batch`). Every other setting decides what an
#: optimizer step does (model, PEFT, optimizer, lr, schedule shape, seed, data, augmentation) and must stay as saved.
RESUME_MAY_CHANGE = ("max_steps", "epochs", "eval_every", "eval_batch", "save_every", "log_every", "memory_limit_mb",
                     "workers", "device", "quiet", "out", "batch", "accumulate")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint directory (``<run>/checkpoints/step-N``)."""
    return checkpoint.resolve().parent.parent


def saved_run_config(resume: str | Path) -> TrainConfig:
    """The config the run that ``resume`` names (a run or checkpoint directory) saved in its ``config.yaml``."""
    saved = run_dir_of(find_checkpoint(resume)) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"cannot resume from {resume}: {saved} is missing; pass the run's settings again "
                          "(--config FILE --resume RUN_DIR)")
    return TrainConfig.from_file(saved)


def resumed_run_values(resume: str | Path) -> dict[str, Any]:
    """The settings a command line's ``--resume RUN_DIR`` without ``--config`` starts from: the run's own
    ``config.yaml``, ``out`` its directory, so that a flag that differs from them applies or is refused by name
    (:func:`resolve_resume_config`), never ignored."""
    return {**saved_run_config(resume).to_dict(), "out": str(run_dir_of(find_checkpoint(resume)))}


def resolve_resume_config(config: TrainConfig, world: int = 1) -> TrainConfig:
    """The config a run with ``resume`` set trains with (``config`` itself when it does not resume).

    An ``out`` left empty or at its default is the run's own directory. Without ``data`` the settings come from the
    run's ``config.yaml`` and the fields of ``config`` that differ from ``TrainConfig``'s defaults count as given;
    with ``data`` every field of ``config`` is given. Given settings in :data:`RESUME_MAY_CHANGE` apply; any other
    that differs from the saved one raises ``ConfigError`` naming it, as does a different global batch.
    """
    resume = config.resume
    if not resume:
        return config
    ckpt = find_checkpoint(resume)
    run_dir = run_dir_of(ckpt)
    defaults = TrainConfig().to_dict()
    if config.out in ("", defaults["out"]):  # not given: continue in the run's own directory
        config = dataclasses.replace(config, out=str(run_dir))
    if config.data:
        saved = saved_run_config(resume) if (run_dir / "config.yaml").is_file() else None
        given, resolved = config.to_dict(), config
    else:
        saved = saved_run_config(resume)
        given = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
        applied = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
        resolved = dataclasses.replace(saved, **{**applied, "resume": str(resume)})
    if saved is not None:
        refused = {k: (getattr(saved, k), v) for k, v in given.items()
                   if k not in RESUME_MAY_CHANGE and k != "resume" and _setting_differs(k, getattr(saved, k), v)}
        if refused:
            changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
            raise ConfigError(
                f"cannot resume {run_dir} with other settings than it was trained with ({changes}): they change "
                "what an optimizer step does, so the checkpoint would not continue the same run. Leave them out "
                "to continue as saved, or start a new run in another folder (--out). A resume may change only "
                f"{', '.join(RESUME_MAY_CHANGE)}"
            )
    check_resume_batch(read_checkpoint_info(ckpt), resolved, world, saved)
    return resolved


def _setting_differs(name: str, saved: Any, given: Any) -> bool:
    if name in ("data", "replay"):  # the same file named another way (relative / absolute) is the same setting
        return (Path(saved).resolve() if saved else None) != (Path(given).resolve() if given else None)
    if name == "grad_checkpoint":
        return check_parts(saved) != check_parts(given)
    # lists and tuples alike: a config built in Python against one read back from YAML
    return json.loads(json.dumps(saved)) != json.loads(json.dumps(given))


def check_resume_batch(info: dict[str, Any], cfg: TrainConfig, world: int, saved: TrainConfig | None = None) -> None:
    """Refuse a resume whose global batch (``batch x accumulate x processes``) differs from the checkpoint's:
    optimizer step ``s`` would take other images than the run's step ``s`` and the saved data position would
    skip or repeat images. The same global batch split otherwise (another process count, with ``accumulate``
    making up for it) takes the same images per step; it continues the run, though not bit for bit (each
    process draws its own augmentation; BatchNorm sees other micro-batches), and says so with a warning."""
    before = saved or cfg  # checkpoints written before state.json recorded the batch layout
    old = (int(info.get("batch", before.batch)), int(info.get("accumulate", before.accumulate)),
           int(info.get("world_size", 1)))
    new = (cfg.batch, cfg.accumulate, world)
    if old == new:
        return

    def layout(b: int, a: int, w: int) -> str:
        return f"{b * a * w} images (batch {b} x accumulate {a} x {w} process{'es' if w > 1 else ''})"

    step = info.get("step")
    if math.prod(old) != math.prod(new):
        fits = math.prod(old) % (cfg.batch * world) == 0
        hint = (f"e.g. accumulate {math.prod(old) // (cfg.batch * world)} with batch {cfg.batch} on {world} "
                f"process{'es' if world > 1 else ''}" if fits else
                f"e.g. batch {old[0]} and accumulate {old[1]} on {old[2]} process{'es' if old[2] > 1 else ''}")
        raise ConfigError(f"the checkpoint (step {step}) was trained with a global batch of {layout(*old)}; this run "
                          f"would take {layout(*new)} per optimizer step, so its data position and steps would not "
                          f"match. Resume with batch x accumulate x processes = {math.prod(old)}, {hint}")
    warnings.warn(f"resuming the checkpoint (step {step}) of {layout(*old)} as {layout(*new)}: the same images per "
                  "optimizer step, but not bit for bit the uninterrupted run (augmentation draws per process, "
                  "BatchNorm statistics per micro-batch)", stacklevel=2)


# ---------------------------------------------------------------------------- data
def build_datasets(cfg: TrainConfig):
    """``(train, val)`` datasets of a run; a missing or empty one raises before anything heavy is built."""
    path = Path(cfg.data)
    if not path.exists():
        raise ConfigError(f"dataset {cfg.data} does not exist; pass a YOLO data.yaml or a COCO json (--data)")
    train_ds = build_dataset(str(path), split="train", imgsz=cfg.imgsz, augment=cfg.augment_config() or False)
    val_ds = build_dataset(str(path), split="val", imgsz=cfg.imgsz, augment=False)
    if len(train_ds) == 0:
        raise DataError(f"{cfg.data} has no training images")
    if len(val_ds) == 0:
        raise DataError(f"{cfg.data} has no validation images; add a val split")
    return train_ds, val_ds


@dataclass(frozen=True)
class BatchPlan:
    """Which images each optimizer step of an epoch takes, and how a step is cut into micro-batches.

    Every process holds the same plan. The epoch's permutation of the ``n`` target images depends only
    on ``seed + epoch``; optimizer step ``s`` takes its slice ``[s*T, (s+1)*T)`` (``T`` =
    :attr:`targets_per_step`). With replay (``replay_n`` images stored after the target images),
    a step adds ``replay_per_step`` replay images from a permutation of their own, cycled, and the
    step's list is shuffled (seeded by the step). Micro-batch ``m`` of rank ``r`` is the ``m*world + r``-th
    ``batch``-sized piece of the step. So the images of a step do not depend on how they are split into
    processes and micro-batches, and resuming at step ``s`` needs nothing but ``s``.
    """

    n: int
    batch: int
    accumulate: int = 1
    world: int = 1
    seed: int = 0
    replay_n: int = 0
    replay_per_step: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.replay_per_step and not self.replay_n:
            raise ValueError("replay_per_step > 0 needs replay images (replay_n > 0)")

    @classmethod
    def for_run(cls, cfg: TrainConfig, n: int, world: int, replay_n: int = 0) -> "BatchPlan":
        """The plan of a run with ``n`` training images (and ``replay_n`` replay images) on ``world`` processes."""
        return cls(n=n, batch=cfg.batch, accumulate=cfg.accumulate, world=world, seed=cfg.seed, replay_n=replay_n,
                   replay_per_step=cfg.replay_images_per_step(world) if replay_n else 0)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step: batch x accumulate x world."""
        return self.batch * self.accumulate * self.world

    @property
    def targets_per_step(self) -> int:
        """Training-set images per optimizer step (the rest are replayed)."""
        return self.global_batch - self.replay_per_step

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.targets_per_step

    def check(self) -> "BatchPlan":
        """The plan itself; a training set too small for one optimizer step raises ConfigError."""
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {self.n} images but one optimizer step needs "
                              f"{self.targets_per_step} (batch {self.batch} x accumulate {self.accumulate} x "
                              f"{self.world} processes, minus {self.replay_per_step} replayed); lower batch or accumulate")
        return self

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def step_items(self, order: list[int], epoch: int, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` (replay indices offset by ``n``), in micro-batch order."""
        t = self.targets_per_step
        items = order[step * t : (step + 1) * t]
        if not self.replay_per_step:
            return items
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 + epoch)
        replay = torch.randperm(self.replay_n, generator=gen).tolist()
        lo = step * self.replay_per_step
        items += [self.n + replay[(lo + i) % self.replay_n] for i in range(self.replay_per_step)]
        mix = torch.randperm(self.global_batch, generator=torch.Generator().manual_seed(
            self.seed * 7919 + epoch * 104729 + step))
        return [items[i] for i in mix.tolist()]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """One process's micro-batches of one epoch of ``plan`` (see :class:`BatchPlan`), from optimizer step
    ``start_step`` to ``steps`` (default: the whole epoch)."""

    def __init__(self, plan: BatchPlan, epoch: int, rank: int = 0, start_step: int = 0, steps: int | None = None):
        self.plan, self.epoch, self.rank, self.start_step = plan, epoch, rank, start_step
        self.steps = plan.steps_per_epoch if steps is None else steps

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan
        order = plan.epoch_order(self.epoch)
        for s in range(self.start_step, self.steps):
            items = plan.step_items(order, self.epoch, s)
            for m in range(plan.accumulate):
                lo = (m * plan.world + self.rank) * plan.batch
                yield items[lo : lo + plan.batch]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.plan.accumulate


def build_replay_dataset(cfg: TrainConfig, train_ds):
    """The source-domain train split mixed into every step (``replay``), or None."""
    if not cfg.replay or cfg.replay_fraction <= 0:
        return None
    if not Path(cfg.replay).exists():
        raise ConfigError(f"replay dataset {cfg.replay} does not exist; pass the source domain's data.yaml (--replay)")
    replay_ds = build_dataset(str(cfg.replay), split="train", imgsz=cfg.imgsz, augment=cfg.augment_config() or False)
    if list(replay_ds.names) != list(train_ds.names):
        raise ConfigError(f"the replay dataset's classes {list(replay_ds.names)} differ from the training set's "
                          f"{list(train_ds.names)}; replay needs the same classes in the same order")
    if len(replay_ds) == 0:
        raise DataError(f"replay dataset {cfg.replay} has no training images")
    return replay_ds


def build_loader(ds, cfg: TrainConfig, info: DistInfo, epoch: int, start_step: int, steps: int, replay_ds=None):
    """This process's loader of one epoch, from optimizer step ``start_step`` to ``steps``."""
    plan = BatchPlan.for_run(cfg, len(ds), info.world, replay_n=len(replay_ds) if replay_ds is not None else 0)
    sampler = GlobalBatchSampler(plan, epoch, rank=info.rank, start_step=start_step, steps=steps)
    if replay_ds is not None:
        ds = torch.utils.data.ConcatDataset([ds, replay_ds])
    # a generator of its own: creating the loader must not draw from the global RNG (exact resume)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                                       generator=generator)


# ---------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, names: list[str]) -> DetectionModel:
    """The base detector with the dataset's classes, PEFT applied as configured (full fine-tuning is the
    ``full`` method: every weight of the chosen parts trains, the DFL projection stays fixed)."""
    model = apply_peft(build_base_model(cfg, names), cfg.peft_method, **cfg.peft_arguments())
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"PEFT method {cfg.peft!r} with these settings left nothing trainable; widen its targets")
    return model


def training_memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the weights (and so of the activations) while training: channels-last on the CPU.

    A convolution's output takes its weight's layout, so channels-last weights make every activation
    channels-last; oneDNN's CPU convolutions, BatchNorm and SiLU ran faster so (YOLO11n, batch 16, 128 px,
    2 threads: the model step, forward + backward + optimizer step, 0.89x the NCHW one for full
    fine-tuning and for LoRA + COAP + checkpointing; docs/benchmarks/train_step.md). Only the layout
    changes: optimizers, checkpoints and exports see the same values. CUDA keeps the default layout.
    """
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def build_base_model(cfg: TrainConfig, names: list[str]) -> DetectionModel:
    """The base detector (``cfg.base``) predicting the dataset's classes ``names``, before any PEFT method."""
    if cfg.base in architecture_names():
        model = DetectionModel(cfg.base, names=names, imgsz=cfg.imgsz)
    else:
        model = create_model(cfg.base)
        base_names = [model.names[i] for i in range(model.nc)]
        if base_names != names:
            if not cfg.new_classes:
                raise ConfigError(
                    f"the dataset's classes {names} differ from the base model's {base_names}; set new_classes: true "
                    f"(CLI --new-classes) to train a new class predictor, or use a dataset with the base's classes"
                )
            model.reset_classes(names)
    model.imgsz = cfg.imgsz
    return model


def trainable_summary(model: DetectionModel) -> dict[str, Any]:
    """Trainable / total parameter counts, overall and per part (NF4-quantised base weights count as frozen)."""
    from service.layers.tuners.nf4 import NF4Weight

    counted = [(name, p.numel(), p.requires_grad) for name, p in model.named_parameters()]
    counted += [(f"{name}.weight", m.numel, False) for name, m in model.named_modules() if isinstance(m, NF4Weight)]
    total, trainable = 0, 0
    per_part: dict[str, dict[str, int]] = {}
    for name, n, requires_grad in counted:
        total += n
        part = model.part_of(name)
        entry = per_part.setdefault(part, {"trainable": 0, "total": 0})
        entry["total"] += n
        if requires_grad:
            trainable += n
            entry["trainable"] += n
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1), "per_part": per_part}


def build_criterion(model: nn.Module):
    from ultralytics.utils.loss import v8DetectionLoss

    return v8DetectionLoss(model)


def amp_context(amp: str, device: torch.device):
    if amp == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


# ---------------------------------------------------------------------------- step
def _to_float(preds: dict[str, Any]) -> dict[str, Any]:
    return {k: ([f.float() for f in v] if isinstance(v, (list, tuple)) else v.float()) for k, v in preds.items()}


def micro_batch_loss(model: nn.Module, criterion, batch: dict[str, Any], device: torch.device, autocast):
    """Per-image detection loss of one micro-batch (sum of the box, cls and dfl terms) and its parts."""
    imgs = batch["img"].to(device, non_blocking=True).float() / 255.0
    targets = {k: batch[k].to(device) for k in ("batch_idx", "cls", "bboxes")}
    with autocast():
        preds = model(imgs)
    loss, items = criterion(_to_float(preds), targets)
    return loss.sum() / imgs.shape[0], items


def train_step(ddp, criterion, batches, *, accumulate: int, device: torch.device, autocast, dist_info: DistInfo) -> dict:
    """Forward + backward over ``accumulate`` micro-batches; gradients are their mean (and the mean over processes)."""
    total = torch.zeros(4)
    for m in range(accumulate):
        batch = next(batches)
        sync = m == accumulate - 1 or dist_info.world == 1
        with (ddp.no_sync() if not sync and hasattr(ddp, "no_sync") else nullcontext()):
            loss, items = micro_batch_loss(ddp, criterion, batch, device, autocast)
            finite = torch.isfinite(loss.detach()).float().cpu()
            if dist_info.world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                return {"finite": False, "what": f"loss {loss.item()}", "loss": float("nan")}
            (loss / accumulate).backward()
        total += torch.cat([loss.detach().cpu().view(1), items_to_tensor(items)]) / accumulate
    total = all_reduce_mean(total, dist_info)
    return {"finite": True, "loss": float(total[0]),
            "items": {"box_loss": float(total[1]), "cls_loss": float(total[2]), "dfl_loss": float(total[3])}}


def optimizer_step(run: Run, batches: Iterator[dict[str, Any]], epoch: int) -> tuple[dict[str, Any], float | None, float]:
    """One optimizer step: forward + backward of its micro-batches, finiteness checks, clipping, the update,
    the schedule, the EMA. Returns the loss parts, the clipped gradient norm (None: no clipping) and the lr used."""
    run.model.train()
    parts = train_step(run.ddp, run.criterion, batches, accumulate=run.cfg.accumulate, device=run.device,
                       autocast=run.autocast, dist_info=run.dist)
    if not parts["finite"]:
        _raise_non_finite(run, parts, epoch)
    grad_norm = clip_gradients(run.model, run.cfg)
    if grad_norm is not None and not math.isfinite(grad_norm):
        _raise_non_finite(run, {**parts, "what": f"gradient norm {grad_norm}"}, epoch)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return parts, grad_norm, lr


def items_to_tensor(items) -> torch.Tensor:
    if isinstance(items, dict):
        items = list(items.values())
    return torch.stack([torch.as_tensor(v).detach().float().cpu().reshape(()) for v in items])[:3]


def clip_gradients(model: nn.Module, cfg: TrainConfig) -> float | None:
    """The global gradient norm before clipping, clipped to ``cfg.grad_clip`` when set; measured with clipping
    off too, so that a non-finite one is never stepped. None when no gradients are left (``in_backward``)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.in_backward or not params:
        return None
    if not cfg.grad_clip:  # the norm alone: clip_grad_norm_ would also scale every gradient by 1.0
        return float(torch.nn.utils.get_total_norm([g for p in params if (g := p.grad) is not None]))
    return float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))


def _raise_non_finite(run: Run, parts: dict, epoch: int) -> None:
    step, last = run.state.step, run.state.last_checkpoint_step
    where = f"step {step + 1} (epoch {epoch + 1})"
    kept = (f"the last good checkpoint is {run.run_dir / 'checkpoints' / 'last'} (step {last}); resume from it "
            f"with --resume {run.run_dir}" if last is not None else "no checkpoint had been written yet")
    message = (f"training stopped: {parts.get('what', 'loss')} is not finite at {where}; {kept}. "
               "Lower lr, keep grad_clip on, or use amp: none")
    run.log.write({"kind": "error", "step": step + 1, "epoch": epoch + 1, "error": message})
    run.emit({"event": "error", "step": step + 1, "error": message})
    if run.dist.is_main:
        atomic_write_json(run.run_dir / "summary.json", {"status": "diverged", "step": step + 1, "error": message,
                                                         "last_checkpoint_step": last})
    raise NonFiniteLossError(message, step=step + 1)


# ---------------------------------------------------------------------------- memory
def preflight_memory(model, criterion, train_ds, cfg: TrainConfig, device, autocast) -> dict[str, Any]:
    """Run one micro-batch forward + backward under exact accounting; refuse if it cannot fit.

    Weights, BatchNorm statistics and RNG states are left as they were.
    """
    rng = rng_state()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    batch = collate([train_ds[i] for i in range(min(cfg.batch, len(train_ds)))])
    try:
        report = measure_memory(model, None, lambda: micro_batch_loss(model, criterion, batch, device, autocast)[0].backward())
    except torch.OutOfMemoryError as exc:
        raise ConfigError(f"one micro-batch of {cfg.batch} images at {cfg.imgsz} px does not fit in device memory; "
                          "lower batch (and raise accumulate to keep the global batch), lower imgsz, or turn on "
                          "grad_checkpoint") from exc
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        set_rng_state(rng)
    limit = cfg.memory_limit_mb * 2**20 if cfg.memory_limit_mb else None
    if limit is None and device.type == "cuda":
        limit = torch.cuda.mem_get_info(device)[0] + report.total
    trainable = report.params_trainable
    needed = report.total + 2 * trainable  # + an AdamW-sized optimizer state, the most any optimizer here keeps
    if limit is not None and needed > limit:
        raise ConfigError(
            f"one micro-batch needs about {needed / 2**20:.0f} MiB (activations {report.activations / 2**20:.0f} MiB, "
            f"weights + gradients {(report.total - report.activations) / 2**20:.0f} MiB, optimizer up to "
            f"{2 * trainable / 2**20:.0f} MiB) but {limit / 2**20:.0f} MiB are available; lower batch "
            f"(currently {cfg.batch}; raise accumulate to keep the global batch) or imgsz ({cfg.imgsz}), "
            "or turn on grad_checkpoint"
        )
    out = report.to_dict()
    out["optimizer_state"] = None
    return out


def finish_memory_report(memory: dict[str, Any], optimizer, run_dir: Path, info: DistInfo) -> dict[str, Any]:
    """Add the optimizer state (exists after the first step) and write ``memory.txt``."""
    keys = {k for k, _ in MemoryReport.COMPONENTS} | {"cuda_max_allocated"}
    report = MemoryReport(**{k: v for k, v in memory.items() if k in keys and v is not None})
    report.optimizer_state = optimizer_state_bytes(optimizer)
    if info.is_main:
        atomic_write_text(run_dir / "memory.txt", "memory budget of one training step (one micro-batch, exact bytes)\n"
                          + report.table() + "\n")
    return report.to_dict()


# ---------------------------------------------------------------------------- optimizer, schedule, EMA
def build_optimizer_for(cfg: TrainConfig, model: nn.Module):
    from training.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    return build_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay, in_backward=cfg.in_backward,
                           model=model if cfg.in_backward else None, accumulate=cfg.accumulate,
                           clip_grad_norm=cfg.grad_clip or None, **cfg.optimizer_settings)


def build_scheduler_for(cfg: TrainConfig, optimizer, total_steps: int):
    from training.schedule import build_scheduler

    warmup = int(round(cfg.warmup_fraction * total_steps))
    return build_scheduler(optimizer, total_steps, warmup, cfg.min_lr_ratio)


def build_ema(cfg: TrainConfig, model: nn.Module):
    if not cfg.ema:
        return None
    from ultralytics.utils.torch_utils import ModelEMA

    return ModelEMA(model, decay=cfg.ema_decay, tau=cfg.ema_tau)


# ---------------------------------------------------------------------------- checkpoints
def save_training_state(run: Run) -> None:
    """Rank 0 writes ``checkpoints/last`` (atomic) with every process's RNG state; the others wait."""
    state = run.state
    rng_states = gather_rng_states(run.dist)
    if run.dist.is_main:
        train_state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "ema": ({"state": run.ema.ema.state_dict(), "updates": run.ema.updates} if run.ema is not None else None),
            "rng": rng_states,
        }
        info_json = {"epoch": state.epoch, "epoch_step": state.epoch_step, "best_map50_95": state.best_map50_95,
                     "world_size": run.dist.world, "batch": run.cfg.batch, "accumulate": run.cfg.accumulate}
        save_checkpoint(run.run_dir / "checkpoints", state.step, run.model.state_dict(), train_state, info_json)
    barrier(run.dist)
    state.last_checkpoint_step = state.step
    run.emit({"event": "checkpoint", "step": state.step})


def gather_rng_states(info: DistInfo) -> list[dict[str, Any]] | None:
    """Every process's RNG state, indexed by rank, on rank 0 (None on the others): each process draws its own
    augmentation, so an exact resume needs each one's state."""
    state = rng_state()
    if info.world == 1:
        return [state]
    states: list[Any] | None = [None] * info.world if info.is_main else None
    dist.gather_object(state, states, dst=0)
    return states


def restore(run: Run, path) -> None:
    """Load a training checkpoint into the run's components and state."""
    # on the CPU: the RNG states must stay CPU tensors; the model, optimizer and EMA copy to their own device
    model_state, train_state, info = load_checkpoint(path, map_location="cpu")
    try:
        run.model.load_state_dict(model_state, strict=True)
        run.optimizer.load_state_dict(train_state["optimizer"])
        run.scheduler.load_state_dict(train_state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match this run's model / optimizer settings: {exc}") from exc
    # this run's schedule sets the next step's lr (a resume may change max_steps / epochs and so the total);
    # with the saved total it is the lr the checkpoint holds, bit for bit (the scheduler's own expression)
    scheduler = run.scheduler
    for group, base_lr, factor in zip(run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    if run.ema is not None and train_state.get("ema"):
        run.ema.ema.load_state_dict(train_state["ema"]["state"])
        run.ema.updates = int(train_state["ema"]["updates"])
    set_rng_state(rng_state_for_rank(train_state["rng"], run.dist.rank, run.dist.world))
    run.state = RunState(step=int(info["step"]), epoch=int(info["epoch"]), epoch_step=int(info["epoch_step"]),
                         best_map50_95=info.get("best_map50_95"), last_checkpoint_step=int(info["step"]))


# ---------------------------------------------------------------------------- evaluation and outputs
def run_eval(run: Run, val_ds, epoch: int, final: bool = False) -> dict[str, Any]:
    """Rank 0 evaluates on the val split, logs it and refreshes ``best/``; others wait."""
    metrics: dict[str, Any] = {}
    if run.dist.is_main:
        net = run.eval_model
        plot = run.run_dir / "pr_curve.png" if final else None  # plotting costs seconds: only the final evaluation
        metrics = evaluate(net, val_ds, batch=run.cfg.eval_batch, plot_path=plot, quiet=run.cfg.quiet)
        metrics = {"kind": "eval", "step": run.state.step, "epoch": epoch + 1, **metrics}
        run.log.write(metrics)
        run.emit({"event": "eval", **metrics})
        best = run.state.best_map50_95
        if best is None or metrics["map50_95"] > best:
            run.state.best_map50_95 = metrics["map50_95"]
            merged_copy(net).save(run.run_dir / "best")  # adapters folded into plain weights
    barrier(run.dist)
    return metrics


def write_outputs(run: Run, result: TrainResult, val_ds, last_epoch: int, started: float) -> None:
    """End of a run: a completed run is evaluated (unless its last step just was) and its weights written;
    every run gets ``summary.json`` and its curves. Fills in ``result``."""
    state, run_dir = run.state, run.run_dir
    if result.status == "completed":
        if not result.metrics or result.metrics.get("step") != state.step:
            result.metrics = run_eval(run, val_ds, last_epoch, final=True)
        result.best_map50_95 = state.best_map50_95
        if run.dist.is_main:
            result.adapter_dir, result.merged_dir = write_final_weights(run.eval_model, run_dir)
            result.best_dir = run_dir / "best" if (run_dir / "best").is_dir() else None
    else:  # a stopped run reports no metrics: its last evaluation is of an earlier step
        result.metrics = {}
    result.wall_time_s = time.perf_counter() - started
    if run.dist.is_main:
        write_summary(run_dir, run.cfg, result, run.dist)
        plot_curves(run_dir)
    barrier(run.dist)


def write_final_weights(net: DetectionModel, run_dir: Path) -> tuple[Path | None, Path]:
    """``adapter/`` (PEFT runs; not full fine-tuning, whose result is the model itself) and ``merged/`` (plain
    weights for export) of the shipped weights ``net``."""
    state, adapter_dir = find_peft_state(net), None
    if state is not None and not state.full_fine_tuning:
        adapter_dir = save_adapter(net, run_dir / "adapter")
    merged_dir = run_dir / "merged"
    merged_copy(net).save(merged_dir)
    return adapter_dir, merged_dir


#: What a run writes into its directory besides ``config.yaml``.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "memory.txt", "training_curves.png", "pr_curve.png",
               "adapter", "merged", "best")


def check_out_folder(cfg: TrainConfig, overwrite: bool) -> None:
    """For the command lines: refuse a fresh run whose ``out`` holds an earlier run's outputs (which it would
    remove, see :func:`prepare_run_dir`) unless ``overwrite``; the message says how to continue or replace it."""
    run_dir = Path(cfg.out)
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if cfg.resume or overwrite or not found:
        return
    raise ConfigError(f"{run_dir} holds an earlier run ({', '.join(found)}), which a new run there would remove; "
                      f"continue it with --resume {run_dir}, choose another folder with --out, or pass --overwrite "
                      "to replace it")


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, keep_until_step: int | None) -> None:
    """Write the run's ``config.yaml``. A run that continues in its own directory (``keep_until_step``: the step
    it resumes at) keeps the metrics up to that step; any other run starts the directory over: what an earlier
    run left there (its checkpoints first, so that no ``--resume`` can find them) is removed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if keep_until_step is None:
        for name in RUN_OUTPUTS:
            _remove(run_dir / name)
    saved = dataclasses.replace(cfg, resume=None)
    atomic_write_text(run_dir / "config.yaml", saved.to_yaml(f"glasses-vision train --config {run_dir / 'config.yaml'}"))
    metrics = run_dir / "metrics.jsonl"
    if keep_until_step is not None and metrics.exists():  # records after the checkpoint we resume from are replayed
        kept = [line for line in metrics.read_text().splitlines() if _record_step(line) <= keep_until_step]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per line)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, cfg: TrainConfig, result: TrainResult, info: DistInfo) -> None:
    summary = {
        "status": result.status,
        "steps": result.steps,
        "total_steps": result.total_steps,
        "world_size": info.world,
        "global_batch": cfg.batch * cfg.accumulate * info.world,
        "final_loss": result.losses[-1] if result.losses else None,
        "metrics": {k: v for k, v in result.metrics.items() if k != "kind"},
        "best_map50_95": result.best_map50_95,
        "trainable": result.trainable,
        "memory": result.memory,
        "wall_time_s": round(result.wall_time_s, 2),
        "config": cfg.to_dict(),
        "outputs": {k: str(v) for k, v in (("adapter", result.adapter_dir), ("merged", result.merged_dir),
                                           ("best", result.best_dir)) if v is not None},
    }
    atomic_write_json(run_dir / "summary.json", summary)


def plot_curves(run_dir: Path) -> None:
    from training.plots import plot_training_curves

    records = MetricsLog(run_dir / "metrics.jsonl").read()
    if records:
        plot_training_curves(records, run_dir / "training_curves.png")
