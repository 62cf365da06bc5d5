"""Bounds of every ``TrainConfig`` setting, checked without torch.

``BOUNDS`` is the one table of types, ranges, choices and nullability of the
training settings. ``check_settings`` checks a mapping of settings against it and
raises :class:`SettingError` naming the field; it imports nothing but the
standard library and ``models.errors``, so the HTTP service checks a job with it
before anything is queued, without importing torch. Checks that need the library
(optimizer and PEFT names and their keyword settings, augmentation settings)
stay in ``TrainConfig.validate``.

    >>> check_settings({"lr": None})
    Traceback (most recent call last):
    ...
    training.settings.SettingError: lr: must be a number, got null
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from models.errors import ConfigError
from models.parts import CHECKPOINT_POLICIES, PARTS
AMP_MODES = ("none", "bf16")
DEVICES = ("auto", "cpu", "cuda")
#: keyword-setting mappings (peft_settings, optimizer_settings, augment_settings) hold at most this many keys.
MAX_MAPPING_KEYS = 64
#: strings (paths, names) are at most this long.
MAX_TEXT = 4096


class SettingError(ConfigError):
    """One setting out of its bounds; ``field`` names it (dotted for nested settings)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Bound:
    """Type and range of one setting. ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``dict`` or ``parts``."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return self.kind
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"{self.kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"


def _num(value: float | None) -> str:
    if value is None:
        return "..."
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _int(low: int, high: int, **kw: Any) -> Bound:
    return Bound("int", low, high, **kw)


def _float(low: float, high: float, **kw: Any) -> Bound:
    return Bound("float", low, high, **kw)


#: Every TrainConfig field (a test keeps the two in step).
BOUNDS: dict[str, Bound] = {
    # data
    "data": Bound("str"),
    "imgsz": _int(32, 1280, multiple_of=32),
    "augment": Bound("bool"),
    "augment_settings": Bound("dict"),
    "workers": _int(0, 16),
    "replay": Bound("str", nullable=True),
    "replay_fraction": _float(0.0, 1.0, high_open=True),
    # model
    "base": Bound("str"),
    "new_classes": Bound("bool"),
    # PEFT
    "peft": Bound("str"),
    "rank": _int(1, 256),
    "alpha": _float(0.0, 4096.0, low_open=True, nullable=True),
    "peft_settings": Bound("dict"),
    # optimisation
    "optimizer": Bound("str"),
    "lr": _float(0.0, 1.0, low_open=True),
    "weight_decay": _float(0.0, 1.0),
    "optimizer_settings": Bound("dict"),
    "in_backward": Bound("bool"),
    "epochs": _int(1, 100_000),
    "max_steps": _int(1, 1_000_000, nullable=True),
    "batch": _int(1, 256),
    "accumulate": _int(1, 256),
    "warmup_fraction": _float(0.0, 1.0, high_open=True),
    "min_lr_ratio": _float(0.0, 1.0),
    "grad_clip": _float(0.0, 1e6, nullable=True),
    "ema": Bound("bool"),
    "ema_decay": _float(0.0, 1.0, low_open=True, high_open=True),
    "ema_tau": _float(0.0, 1e7, low_open=True),
    # memory
    "grad_checkpoint": Bound("parts"),
    "grad_checkpoint_policy": Bound("str", choices=CHECKPOINT_POLICIES),
    "amp": Bound("str", choices=AMP_MODES),
    "memory_limit_mb": _float(0.0, 1e7, low_open=True, nullable=True),
    # evaluation, logging, checkpoints
    "eval_every": _int(0, 10_000),
    "eval_batch": _int(1, 256),
    "save_every": _int(0, 1_000_000),
    "log_every": _int(1, 1_000_000),
    "out": Bound("str"),
    "resume": Bound("str", nullable=True),
    "seed": _int(0, 2**32 - 1),
    "device": Bound("str", choices=DEVICES),
    "quiet": Bound("bool"),
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def check_setting(name: str, value: Any, bound: Bound | None = None, where: str = "") -> None:
    """Raise :class:`SettingError` unless ``value`` fits the bound of setting ``name``."""
    bound = bound or BOUNDS[name]
    field = f"{where}{name}"
    if value is None:
        if bound.nullable:
            return
        raise SettingError(field, f"must be {_expected(bound)}, got null")
    kind = bound.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise SettingError(field, f"must be true or false, got {_type_name(value)}")
        return
    if kind in ("int", "float"):
        ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise SettingError(field, f"must be {_expected(bound)}, got {_type_name(value)}")
        if kind == "float" and not math.isfinite(value):
            raise SettingError(field, f"must be a finite number, got {value}")
        low_bad = bound.low is not None and (value <= bound.low if bound.low_open else value < bound.low)
        high_bad = bound.high is not None and (value >= bound.high if bound.high_open else value > bound.high)
        if low_bad or high_bad:
            raise SettingError(field, f"must be {bound.describe()}, got {value}")
        if bound.multiple_of and value % bound.multiple_of:
            near = max(bound.multiple_of, round(value / bound.multiple_of) * bound.multiple_of)
            raise SettingError(field, f"must be a multiple of {bound.multiple_of} (the network stride), e.g. {near}")
        return
    if kind == "str":
        if not isinstance(value, str):
            raise SettingError(field, f"must be a string, got {_type_name(value)}")
        if len(value) > MAX_TEXT or "\x00" in value:
            raise SettingError(field, f"must be a text of at most {MAX_TEXT} characters without NUL")
        if bound.choices is not None and value not in bound.choices:
            raise SettingError(field, f"{value!r} is not one of {', '.join(bound.choices)}")
        return
    if kind == "dict":
        if not isinstance(value, Mapping):
            raise SettingError(field, f"must be a mapping of keyword settings, got {_type_name(value)}")
        if len(value) > MAX_MAPPING_KEYS:
            raise SettingError(field, f"has {len(value)} keys, more than {MAX_MAPPING_KEYS}")
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise SettingError(field, f"keys must be setting names (identifiers), got {bad[:3]}")
        return
    if kind == "parts":
        check_parts(value, field)
        return
    raise AssertionError(f"unknown bound kind {kind!r}")  # pragma: no cover - the table is fixed


def check_parts(value: Any, field: str = "grad_checkpoint") -> list[str]:
    """A list of model parts from a list, a comma-separated string, True (backbone + neck) or False."""
    if value is True:
        return ["backbone", "neck"]
    if value in (False, None, "", "none"):
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SettingError(field, f"must be a list of parts ({', '.join(PARTS)}), true or false")
    bad = [p for p in value if p not in PARTS]
    if bad:
        raise SettingError(field, f"parts {bad} unknown; use any of {', '.join(PARTS)}")
    return list(value)


def _expected(bound: Bound) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "dict": "a mapping", "parts": "a list of parts"}[bound.kind] + (
        f" ({bound.describe()})" if bound.low is not None or bound.high is not None else "")


def check_settings(values: Mapping[str, Any], where: str = "") -> None:
    """Check every setting in ``values``; unknown names are refused with the known ones."""
    if not isinstance(values, Mapping):
        raise SettingError(where.rstrip(".") or "settings", f"must be a mapping of settings, got {_type_name(values)}")
    unknown = sorted(str(k) for k in values if k not in BOUNDS)
    if unknown:
        raise SettingError(f"{where}{unknown[0]}", f"unknown setting(s) {unknown}; known: {', '.join(BOUNDS)}")
    for name, value in values.items():
        check_setting(name, value, where=where)
