"""``TrainConfig``: every setting of a fine-tuning run, with its default, loadable from YAML or JSON.

A config file's header shows the command that runs it (torchtune style)::

    # glasses-vision train --config kitchen.yaml
    # torchrun --nproc_per_node 2 -m training.train --config kitchen.yaml
    data: data/kitchen/data.yaml
    base: glasses-base-yolo11n
    peft: lora
    rank: 8
    optimizer: coap

``validate()`` fails fast (``ConfigError``) on settings that cannot work, before any
data is read or any step is taken.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from models.errors import ConfigError

from training.settings import check_parts, check_settings

#: ``peft`` values that mean full fine-tuning: the registered ``full`` method (no adapter is written).
FULL_FINE_TUNING = ("none", "full")


@dataclass
class TrainConfig:
    """A fine-tuning run. Unknown keys in a file are refused with the list of known ones."""

    # --- data ---------------------------------------------------------------
    #: dataset: a YOLO ``data.yaml`` or a COCO json (see ``training.data.build_dataset``).
    data: str = ""
    #: square input size in pixels (a multiple of the model stride, 32).
    imgsz: int = 320
    #: train-time augmentation (``training.data``'s augment switch).
    augment: bool = True
    #: augmentation settings (``training.data.augment.AugmentConfig`` fields, e.g. ``{"mosaic": 0.5, "scale": [0.5, 1.5]}``).
    augment_settings: dict[str, Any] = field(default_factory=dict)
    #: source-domain dataset (YOLO ``data.yaml`` / COCO json, same classes) whose train frames are mixed into every
    #: optimizer step so that the source domain is not forgotten (None = no replay).
    replay: str | None = None
    #: share of each optimizer step's images taken from ``replay`` (the rest come from ``data``).
    replay_fraction: float = 0.0
    #: DataLoader worker processes (0 = load in the training process; the exact-resume guarantee assumes 0).
    workers: int = 0

    # --- model --------------------------------------------------------------
    #: base detector: ``glasses-base-yolo11n`` (shipped), a saved model directory, or an
    #: architecture name (``yolo11n`` ... ``yolov8x``, trained from scratch).
    base: str = "glasses-base-yolo11n"
    #: when the dataset's classes differ from the base's: False refuses to start, True replaces the class
    #: predictor of the head (``DetectionModel.reset_classes``) and makes it trainable.
    new_classes: bool = False

    # --- PEFT ---------------------------------------------------------------
    #: ``none`` (or ``full``) = full fine-tuning (``peft_settings: {targets: [head]}`` limits it to parts), else a
    #: name from ``service.layers.peft.list_peft_methods()`` (lora, dora, ...).
    peft: str = "none"
    #: adapter rank (LoRA / DoRA / QLoRA).
    rank: int = 8
    #: LoRA alpha; None = the PEFT method's default.
    alpha: float | None = None
    #: more keyword settings for ``apply_peft`` (e.g. ``{"targets": ["backbone", "neck"], "use_rslora": true}``).
    peft_settings: dict[str, Any] = field(default_factory=dict)

    # --- optimisation -------------------------------------------------------
    #: optimizer name from ``training.optim.list_optimizers()`` (adamw, coap, coap8bit, galore, adamw8bit).
    optimizer: str = "adamw"
    #: peak learning rate (reached after warmup, then cosine decay).
    lr: float = 1e-3
    #: decoupled weight decay.
    weight_decay: float = 5e-4
    #: more keyword settings for the optimizer (e.g. ``{"rank_ratio_cnn": 4, "update_interval": 32}``).
    optimizer_settings: dict[str, Any] = field(default_factory=dict)
    #: step each parameter inside backward and free its gradient (needs accumulate=1 and no clipping).
    in_backward: bool = False
    #: passes over the training set.
    epochs: int = 10
    #: stop after this many optimizer steps (None = ``epochs`` full passes).
    max_steps: int | None = None
    #: images per micro-batch per process.
    batch: int = 16
    #: micro-batches accumulated per optimizer step (global batch = batch x accumulate x processes).
    accumulate: int = 1
    #: share of all optimizer steps spent in linear warmup (0 = none).
    warmup_fraction: float = 0.05
    #: the cosine decays the LR to ``lr * min_lr_ratio``.
    min_lr_ratio: float = 0.01
    #: clip the global gradient norm to this value (None or 0 = no clipping).
    grad_clip: float | None = 10.0
    #: keep an exponential moving average of the weights and evaluate / ship it.
    ema: bool = False
    #: EMA maximum decay; it ramps up as ``decay * (1 - exp(-updates / ema_tau))``.
    ema_decay: float = 0.9999
    #: EMA ramp time constant in optimizer steps.
    ema_tau: float = 200.0

    # --- memory -------------------------------------------------------------
    #: recompute activations of these parts in backward (``torch.utils.checkpoint``, per YOLO layer).
    grad_checkpoint: list[str] = field(default_factory=list)
    #: ``all`` layers of those parts, or ``high_res``: only layers at output stride <= 8, which hold most of the
    #: activation bytes for a fraction of the recompute (docs/benchmarks/train_step.md).
    grad_checkpoint_policy: str = "all"
    #: autocast precision: ``none`` (fp32) or ``bf16`` (CPU and CUDA).
    amp: str = "none"
    #: refuse to start when one micro-batch's exact bytes (MemoryReport) exceed this many MiB
    #: (None = the free CUDA memory on GPU, no limit on CPU).
    memory_limit_mb: float | None = None

    # --- evaluation, logging, checkpoints -----------------------------------
    #: evaluate on the val split every N epochs (and always at the end); 0 = only at the end.
    eval_every: int = 1
    #: images per evaluation batch.
    eval_batch: int = 16
    #: write ``checkpoints/last`` every N optimizer steps (and at the end); 0 = only at the end and per epoch.
    save_every: int = 50
    #: write a metrics.jsonl line every N optimizer steps.
    log_every: int = 10
    #: run directory (created; see docs/TRAINING.md for its contents). A run that does not resume starts it over:
    #: an earlier run's checkpoints and outputs there are removed (the command lines ask for ``--overwrite`` first).
    out: str = "runs/train"
    #: continue from ``<run dir>/checkpoints/last`` (a run directory or a checkpoint directory); other settings may
    #: differ from the run's only where ``training.recipe.RESUME_MAY_CHANGE`` allows (else ``ConfigError``).
    resume: str | None = None
    #: seed for weights init, data order, augmentation.
    seed: int = 0
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: no progress bars.
    quiet: bool = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping; unknown keys raise ``ConfigError`` naming the known ones."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a training config must be a mapping of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {', '.join(cls.field_names())}")
        cfg = cls(**dict(values))
        cfg.grad_checkpoint = check_parts(cfg.grad_checkpoint)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Load a ``.yaml`` / ``.yml`` / ``.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
        except (json.JSONDecodeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot parse {path}: {exc}") from exc
        except Exception as exc:  # yaml.YAMLError
            raise ConfigError(f"cannot parse {path}: {exc}") from exc
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (``None`` values are ignored, so CLI defaults do not override)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, command: str | None = None) -> str:
        """YAML text with a header comment showing the command that runs it."""
        import yaml

        header = f"# {command}\n" if command else "# glasses-vision train --config config.yaml\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check every setting and their combinations; raises ``ConfigError`` saying what to change.

        Types and ranges come from the one bounds table, ``training.settings.BOUNDS`` (the HTTP service checks
        jobs with the same table, without torch); the checks below are those that combine settings or need
        the library (optimizer and PEFT names, augmentation fields).
        """
        if not self.data:
            raise ConfigError("no dataset: set data to a YOLO data.yaml or a COCO json (CLI: --data)")
        check_settings(self.to_dict())
        self.grad_checkpoint = check_parts(self.grad_checkpoint)
        self.augment_config()
        if self.replay_fraction > 0 and not self.replay:
            raise ConfigError("replay_fraction > 0 needs a replay dataset (CLI --replay SOURCE.yaml)")
        if self.replay and self.replay_fraction > 0 and self.replay_images_per_step() == 0:
            raise ConfigError(f"replay_fraction={self.replay_fraction} of a global batch of "
                              f"{self.batch * self.accumulate} images is less than one image; raise it or the batch")
        if self.replay and self.replay_images_per_step() >= self.batch * self.accumulate:
            raise ConfigError(f"replay_fraction={self.replay_fraction} of a global batch of "
                              f"{self.batch * self.accumulate} images leaves no training-set image per step; lower it")
        self._validate_names()
        if self.in_backward:
            from training.optim import check_in_backward_compatible

            check_in_backward_compatible(accumulate=self.accumulate, clip_grad_norm=self.grad_clip or None)
        return self

    @property
    def peft_method(self) -> str:
        """The registered PEFT method the run applies (``none`` and ``full`` are both ``full``)."""
        return "full" if self.peft in FULL_FINE_TUNING else self.peft

    @property
    def full_fine_tuning(self) -> bool:
        """True when every selected weight trains (``peft`` is ``none`` or ``full``)."""
        return self.peft_method == "full"

    def peft_arguments(self) -> dict[str, Any]:
        """Keyword settings of ``apply_peft(model, self.peft_method, ...)``: ``rank`` / ``alpha`` where the method
        takes them, ``train_class_branch`` with ``new_classes``, then ``peft_settings``. Unknown or invalid
        settings raise ``ConfigError``."""
        from service.layers.peft import peft_config_class

        config_class = peft_config_class(self.peft_method)
        accepted = {f.name for f in fields(config_class)} if config_class else set()
        settings: dict[str, Any] = {"rank": self.rank} if "rank" in accepted else {}
        if self.alpha is not None and "alpha" in accepted:
            settings["alpha"] = self.alpha
        if self.new_classes:  # the new class predictor starts untrained: it must learn fully
            if "train_class_branch" not in accepted:
                raise ConfigError(f"PEFT method {self.peft!r} cannot train a new class predictor; "
                                  "use none, lora, dora, bitfit or qlora with new_classes, or keep the base's classes")
            settings["train_class_branch"] = True
        if not isinstance(self.peft_settings, Mapping):
            raise ConfigError("peft_settings must be a mapping of the PEFT method's settings, e.g. {targets: [neck]}")
        settings.update(self.peft_settings)
        unknown = sorted(set(settings) - accepted - {"adapter_name"})
        if unknown:
            raise ConfigError(f"peft_settings: {self.peft} does not take {unknown}; it takes "
                              f"{', '.join(sorted(accepted)) or 'no settings'}")
        if config_class is not None:
            try:
                config_class(**{k: v for k, v in settings.items() if k != "adapter_name"})
            except ConfigError as exc:
                raise ConfigError(f"peft_settings: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"peft_settings: {exc}") from None
        return settings

    def replay_images_per_step(self, world: int = 1) -> int:
        """Images of each optimizer step drawn from the replay set (0 without replay)."""
        if not self.replay or self.replay_fraction <= 0:
            return 0
        return int(round(self.replay_fraction * self.batch * self.accumulate * world))

    def augment_config(self):
        """The ``AugmentConfig`` this run trains with, or None when augmentation is off."""
        if not isinstance(self.augment_settings, Mapping):
            raise ConfigError("augment_settings must be a mapping of AugmentConfig fields, e.g. {mosaic: 0.5}")
        from training.data.augment import AugmentConfig

        known = {f.name for f in fields(AugmentConfig)}
        unknown = sorted(set(self.augment_settings) - known)
        if unknown:
            raise ConfigError(f"unknown augment_settings {unknown}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.augment_settings.items()}
        try:
            config = AugmentConfig(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"augment_settings: {exc}") from exc
        return config if self.augment else None

    def _validate_names(self) -> None:
        from training.optim import list_optimizers

        key = str(self.optimizer).lower().replace("-", "").replace("_", "")
        if key not in list_optimizers():
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(list_optimizers())}")
        from service.layers.peft import is_mergeable, list_peft_methods

        methods = [m for m in list_peft_methods() if m != "none"]
        if self.peft_method not in methods:
            raise ConfigError(f"unknown PEFT method {self.peft!r}; known: none, {', '.join(methods)}")
        if not is_mergeable(self.peft_method):
            # A run ends with merged/ (plain weights for export); this method's layers cannot be folded into
            # the convolutions (bottleneck adapters sit after an activation), so the recipe cannot finish.
            raise ConfigError(
                f"peft={self.peft!r} cannot be merged into plain weights, and every run ends with a merged model "
                "for export; use lora, dora, bitfit or qlora (its apply function stays available from Python)"
            )
        self.peft_arguments()
