"""The DetectionModel: ultralytics' YOLO11 / YOLOv8 architectures, built offline.

The network is ultralytics' own (its YAMLs, its modules, its Detect head); this
class adds what the rest of the project needs around it: the three parts
(``backbone`` / ``neck`` / ``head``), class names and input size that travel with
the weights, safetensors checkpoints, a guarded import of ultralytics ``.pt``
files, and ``reset_classes`` for a new domain.
"""

from __future__ import annotations

import copy
import json
import math
import os
import weakref
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from ultralytics.nn.modules import Detect  # noqa: E402
from ultralytics.nn.tasks import DetectionModel as _UltralyticsDetectionModel  # noqa: E402
from ultralytics.nn.tasks import yaml_model_load  # noqa: E402

from models.errors import CheckpointError, ConfigError, UntrustedCheckpointError  # noqa: E402
from models.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from models.parts import CHECKPOINT_POLICIES, PARTS  # noqa: E402
from models.peft_layer import is_peft_layer  # noqa: E402

#: ``set_gradient_checkpointing(policy="high_res")`` checkpoints the layers whose output stride is at most this.
HIGH_RES_MAX_STRIDE = 8
FAMILIES = {"yolo11": "yolo11.yaml", "yolov8": "yolov8.yaml"}
SCALES = ("n", "s", "m", "l", "x")
CONFIG_FORMAT = "glasses-vision/detection-model"
CONFIG_VERSION = 1

# Loss gains of ultralytics' default training recipe (cfg/default.yaml).
DEFAULT_LOSS_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


class _LossArgs(SimpleNamespace):
    """The ``model.args`` ultralytics' loss reads (box / cls / dfl gains)."""

    def __iter__(self):
        return iter(vars(self).items())

    def get(self, key, default=None):
        return getattr(self, key, default)


def architecture_names() -> list[str]:
    """Every architecture name ``DetectionModel(cfg=...)`` accepts by name."""
    return [f"{family}{scale}" for family in FAMILIES for scale in SCALES]


def resolve_architecture(cfg: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Turn a name (``yolo11n``), a YAML path or a dict into an architecture dict."""
    if isinstance(cfg, Mapping):
        arch = copy.deepcopy(dict(cfg))
        if "backbone" not in arch or "head" not in arch:
            raise ConfigError("an architecture dict needs 'backbone' and 'head' lists (an ultralytics model YAML)")
        return arch
    text = str(cfg)
    name = Path(text).name
    stem = name[:-5] if name.endswith((".yaml", ".yml")) else name
    stem = stem[:-4] if stem.endswith(".yml") else stem
    if stem in architecture_names():
        return yaml_model_load(f"{stem}.yaml")
    if Path(text).is_file() and text.endswith((".yaml", ".yml")):
        return yaml_model_load(text)
    raise ConfigError(
        f"unknown architecture {text!r}; use one of {', '.join(architecture_names())} or a path to an ultralytics model YAML"
    )


def _names_dict(names: Sequence[str] | Mapping[int, str] | None, nc: int) -> dict[int, str]:
    if names is None:
        return {i: f"class{i}" for i in range(nc)}
    if isinstance(names, Mapping):
        out = {int(k): str(v) for k, v in names.items()}
    else:
        out = {i: str(n) for i, n in enumerate(names)}
    if sorted(out) != list(range(len(out))):
        raise ConfigError(f"class names must be numbered 0..{len(out) - 1} without gaps, got ids {sorted(out)}")
    return out


@contextmanager
def _bn_stats_frozen(module: nn.Module):
    """Keep BatchNorm running statistics unchanged (momentum 0) while the forward is recomputed."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None]
    momenta = [m.momentum for m in norms]
    counts = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in zip(norms, momenta, counts):
            m.momentum = momentum
            if count is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(count)


def _checkpoint_contexts(module: nn.Module):
    return nullcontext(), _bn_stats_frozen(module)


class ModelPart(nn.Sequential):
    """A view of consecutive layers of a DetectionModel: ``backbone``, ``neck`` or ``head``.

    The layers are the model's own module objects (nothing is copied), keyed by
    their index in ``model.model``, so a name inside the part plus the prefix
    ``model.`` is the name inside the whole model. Changing a part (for example
    injecting LoRA into it) changes the model.
    """

    def __init__(self, name: str, layers: "OrderedDict[str, nn.Module]", root: "DetectionModel | None" = None):
        super().__init__(layers)
        self.part_name = name
        self.prefix = "model."
        # A weak reference: the view must not keep the model alive, nor register it as a submodule.
        self.root = weakref.ref(root) if root is not None else None

    def forward(self, *args, **kwargs):  # a part is a view, not a runnable network
        raise RuntimeError(f"the {self.part_name} is a view of the model's layers; run the whole DetectionModel instead")


class DetectionModel(_UltralyticsDetectionModel):
    """A YOLO detector (YOLO11 or YOLOv8, scales n/s/m/l/x) built from ultralytics' YAMLs.

    Example:
        >>> model = DetectionModel("yolo11n", nc=6, names=["cup", "bottle", "phone", "book", "keyboard", "label"])
        >>> model.train(); feats = model(torch.zeros(1, 3, 160, 160))      # dict for ultralytics' loss
        >>> model.eval(); preds = model(torch.zeros(1, 3, 160, 160))       # (1, 4 + nc, anchors), xywh pixels

    Args:
        cfg: architecture name (``yolo11n`` ... ``yolov8x``), an ultralytics model YAML path, or its dict.
        nc: number of classes (taken from ``names`` when names are given and nc is None).
        names: class names, a list or an ``{id: name}`` dict.
        imgsz: the default square input size the model is meant to run at.
    """

    def __init__(
        self,
        cfg: str | Path | Mapping[str, Any] = "yolo11n",
        nc: int | None = 80,
        names: Sequence[str] | Mapping[int, str] | None = None,
        imgsz: int = 640,
        ch: int = 3,
    ):
        if names is not None:
            names_len = len(names)
            if nc is not None and nc != names_len and nc != 80:
                raise ConfigError(f"nc={nc} but {names_len} class names were given; pass matching values or only names")
            nc = names_len
        if nc is None or int(nc) <= 0:
            raise ConfigError(f"nc must be a positive number of classes, got {nc}")
        if int(imgsz) <= 0:
            raise ConfigError(f"imgsz must be positive, got {imgsz}")
        arch = resolve_architecture(cfg)
        arch.pop("yaml_file", None)
        self.checkpoint_layers: set[int] = set()
        super().__init__(arch, ch=ch, nc=int(nc), verbose=False)
        # ultralytics keeps its "layers whose outputs are reused" list in ``self.save``;
        # here ``save`` is the checkpoint writer, so the list moves to ``save_layers``.
        self.save_layers: list[int] = self.__dict__.pop("save")
        if not isinstance(self.model[-1], Detect) or type(self.model[-1]).__name__ not in ("Detect", "v10Detect"):
            raise ConfigError("only detection architectures (a Detect head) are supported")
        self.names = _names_dict(names, int(nc))
        self.imgsz = int(imgsz)
        self.args = _LossArgs(**DEFAULT_LOSS_GAINS)
        self.arch_name = str(cfg) if isinstance(cfg, str) else None
        self._check_imgsz()

    # ------------------------------------------------------------------ basics
    @property
    def nc(self) -> int:
        """Number of classes."""
        return int(self.model[-1].nc)

    @property
    def max_stride(self) -> int:
        """The largest stride: input sizes must be a multiple of it."""
        return int(self.stride.max().item())

    def _check_imgsz(self) -> None:
        if self.imgsz % self.max_stride:
            raise ConfigError(f"imgsz={self.imgsz} is not a multiple of the model stride {self.max_stride}")

    def forward(self, x, *args, **kwargs):
        """Training mode: the raw head outputs ultralytics' loss takes. Eval mode: decoded predictions.

        Decoded predictions have shape ``(B, 4 + nc, A)``: box centre x, centre y,
        width, height in input pixels, then per-class sigmoid scores.
        """
        out = super().forward(x, *args, **kwargs)
        if not self.training and isinstance(out, tuple) and not isinstance(x, dict):
            return out[0]
        return out

    def _predict_once(self, x, profile=False, embed=None):
        """Run the layers in order; ultralytics' loop plus two memory savers.

        Layers whose index is in ``checkpoint_layers`` run under non-reentrant
          activation checkpointing while training; BatchNorm running statistics are
          not updated a second time when the forward is recomputed.
        """
        saved = self.__dict__.get("save_layers", self.__dict__.get("save", ()))
        outputs: list[Any] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            if m.i in self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x = checkpoint(m, x, use_reentrant=False, context_fn=partial(_checkpoint_contexts, m))
            else:
                x = m(x)
            outputs.append(x if m.i in saved else None)
        return x

    def frozen_prefix_length(self) -> int:
        """How many leading layers have no trainable parameter.

        Autograd keeps nothing for them (no input of theirs requires grad), so
        activation memory starts at the first layer that trains.
        """
        for i, layer in enumerate(self.model):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.model)

    def set_gradient_checkpointing(self, parts: Sequence[str] = ("backbone", "neck"), policy: str = "all") -> None:
        """Checkpoint layers of the given parts (each YOLO layer is one block); ``()`` turns it off.

        ``policy="all"`` checkpoints every layer of the parts; ``"high_res"`` only those whose output stride is
        at most ``HIGH_RES_MAX_STRIDE``: each stride step doubles the channels and quarters the pixels, so
        these few layers hold most of the activation bytes for a fraction of the recomputed forward.
        """
        layers: set[int] = set()
        for name in parts:
            start, stop = self.part_bounds[self._check_part(name)]
            layers.update(range(start, stop))
        if policy not in CHECKPOINT_POLICIES:
            raise ConfigError(f"unknown checkpointing policy {policy!r}; use one of {', '.join(CHECKPOINT_POLICIES)}")
        if policy == "high_res" and layers:
            strides = self.layer_strides()
            layers = {i for i in layers if strides[i] <= HIGH_RES_MAX_STRIDE}
        self.checkpoint_layers = layers

    def layer_strides(self) -> list[int]:
        """Output stride of every layer; the head reads every stride, so it counts as the coarsest.

        Found by one small eval-mode forward; every module's train/eval mode is restored afterwards.
        """
        size = 2 * self.max_stride
        strides: dict[int, int] = {}
        hooks = [m.register_forward_hook(lambda layer, _, out: strides.__setitem__(layer.i, size // out.shape[-1]))
                 for m in self.model[:-1]]
        modes = {m: m.training for m in self.modules()}
        param = next(self.parameters())
        try:
            self.eval()
            with torch.no_grad():
                self(torch.zeros(1, self.yaml["channels"], size, size, device=param.device))
        finally:
            for h in hooks:
                h.remove()
            for m, training in modes.items():
                m.training = training
        return [strides.get(i, self.max_stride) for i in range(len(self.model))]

    @staticmethod
    def _check_part(name: str) -> str:
        if name not in PARTS:
            raise ConfigError(f"unknown part {name!r}; the parts are {', '.join(PARTS)}")
        return name

    # ------------------------------------------------------------------ parts
    @property
    def part_bounds(self) -> dict[str, tuple[int, int]]:
        """Layer index ranges ``[start, stop)`` of backbone, neck and head."""
        n_backbone = len(self.yaml["backbone"])
        n_layers = len(self.model)
        return {"backbone": (0, n_backbone), "neck": (n_backbone, n_layers - 1), "head": (n_layers - 1, n_layers)}

    def part(self, name: str) -> ModelPart:
        """The part ``backbone``, ``neck`` or ``head`` as a ModelPart view."""
        start, stop = self.part_bounds[self._check_part(name)]
        return ModelPart(name, OrderedDict((str(i), self.model[i]) for i in range(start, stop)), root=self)

    @property
    def backbone(self) -> ModelPart:
        """Feature extractor layers (YOLO11: layers 0-10)."""
        return self.part("backbone")

    @property
    def neck(self) -> ModelPart:
        """Feature pyramid layers between backbone and head (YOLO11: 11-22)."""
        return self.part("neck")

    @property
    def head(self) -> ModelPart:
        """The Detect head (YOLO11: layer 23)."""
        return self.part("head")

    def part_of(self, name: str) -> str:
        """The part a parameter / module name of this model (``model.3.conv.weight``) belongs to."""
        pieces = name.split(".")
        if len(pieces) < 2 or pieces[0] != "model" or not pieces[1].isdigit():
            raise ConfigError(f"{name!r} is not a name inside this model's layers")
        index = int(pieces[1])
        for part, (start, stop) in self.part_bounds.items():
            if start <= index < stop:
                return part
        raise ConfigError(f"layer index {index} is outside the model")

    def named_parameters_by_part(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """Yield ``(part, name, parameter)`` for every parameter."""
        for name, param in self.named_parameters():
            yield self.part_of(name), name, param

    # ------------------------------------------------------------------ classes
    def reset_classes(self, names: Sequence[str] | Mapping[int, str]) -> None:
        """Change the classes for a new domain.

        The backbone, neck, the box branch (``cv2``) and the class branch's
        feature convolutions are kept; only the final class predictor of each
        level (the 1x1 conv producing ``nc`` logits) is replaced and initialised
        with ultralytics' class-prior bias.
        """
        new_names = _names_dict(names, len(names))
        nc = len(new_names)
        if nc <= 0:
            raise ConfigError("reset_classes needs at least one class name")
        head: Detect = self.model[-1]
        for i, branch in enumerate(head.cv3):
            old = branch[-1]
            new = nn.Conv2d(old.in_channels, nc, 1).to(device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                new.get_parameter("bias").fill_(math.log(5 / nc / (640 / float(head.stride[i])) ** 2))
            branch[-1] = new
        head.nc = nc
        head.no = nc + head.reg_max * 4
        self.yaml["nc"] = nc
        self.names = new_names
        self.criterion = None

    # ------------------------------------------------------------------ checkpoint I/O
    def config(self) -> dict[str, Any]:
        """The JSON-serialisable description saved next to the weights."""
        arch = copy.deepcopy(self.yaml)
        arch.pop("yaml_file", None)
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "arch_name": self.arch_name,
            "architecture": arch,
            "nc": self.nc,
            "names": [self.names[i] for i in range(self.nc)],
            "imgsz": self.imgsz,
            "stride": [int(s) for s in self.stride.tolist()],
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``directory`` (atomically, file by file)."""
        from safetensors.torch import save as st_save

        wrapped = [n for n, m in self.named_modules() if is_peft_layer(m)]
        if wrapped:
            raise ConfigError(
                f"the model still holds {len(wrapped)} PEFT layers (e.g. {wrapped[0]}); "
                "merge them first (service.layers.peft.merge_lora) or save the adapter with save_adapter"
            )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(out / "model.safetensors", st_save(tensors, metadata={"format": CONFIG_FORMAT}))
        atomic_write_json(out / "config.json", self.config())
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DetectionModel":
        """Build an untrained model from a saved ``config.json`` dict."""
        if config.get("format") != CONFIG_FORMAT:
            raise CheckpointError(f"config format {config.get('format')!r} is not {CONFIG_FORMAT!r}")
        model = cls(config["architecture"], nc=int(config["nc"]), names=list(config["names"]), imgsz=int(config["imgsz"]))
        model.arch_name = config.get("arch_name")
        return model

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "DetectionModel":
        """Load a model written by :meth:`save` (no pickles are read)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory)
        cfg_path, weights_path = path / "config.json", path / "model.safetensors"
        if not cfg_path.is_file() or not weights_path.is_file():
            raise CheckpointError(f"{path} is not a model directory: it needs config.json and model.safetensors")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
        model = cls.from_config(config)
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {weights_path}: {exc}") from exc
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or reshaped:
            raise CheckpointError(
                f"{weights_path} does not match the architecture in config.json: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                f"{len(reshaped)} with other shapes (e.g. {reshaped[:3]})"
            )
        model.load_state_dict(state, strict=True)
        return model.eval()

    @classmethod
    def from_ultralytics(cls, path: str | Path, trusted: bool = False, imgsz: int | None = None) -> "DetectionModel":
        """Import an ultralytics checkpoint (``yolo11n.pt``, ``best.pt``, ...).

        Such files are pickles: loading one runs code from the file. Pass
        ``trusted=True`` only for files whose origin you trust.
        """
        path = Path(path)
        if not trusted:
            raise UntrustedCheckpointError(
                f"{path} is a pickled ultralytics checkpoint and loading it executes code from the file; "
                "pass trusted=True (CLI: glasses-vision import --trust-pickle) if you trust its origin"
            )
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist")
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:  # any unpickling failure means "not a usable checkpoint"
            raise CheckpointError(f"cannot read {path} as an ultralytics checkpoint: {exc}") from exc
        source = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
        arch = getattr(source, "yaml", None)
        if not isinstance(source, nn.Module) or not isinstance(arch, dict):
            raise CheckpointError(f"{path} holds no ultralytics model (expected a dict with 'model' or 'ema')")
        source = source.float()
        names = getattr(source, "names", None)
        nc = int(arch.get("nc", len(names or [])))
        if imgsz is None:
            train_args = ckpt.get("train_args", {}) if isinstance(ckpt, dict) else {}
            imgsz = int(train_args.get("imgsz", 640)) if isinstance(train_args, dict) else 640
        model = cls(arch, nc=nc, names=names, imgsz=imgsz)
        model.load_state_dict(source.state_dict(), strict=True)
        return model.eval()
