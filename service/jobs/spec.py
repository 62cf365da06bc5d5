"""From a job request to the recipe's ``TrainConfig``, and where a job's files live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.errors import ConfigError
from service.core.config import Settings

# Settings a job controls itself; train_settings may not override them.
_RESERVED = ("data", "out", "resume", "quiet")
# Without an epoch count, a step budget alone decides when a job ends.
_EPOCHS_FOR_STEP_BUDGET = 100_000


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def job_log_path(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "job.log"


def job_run_dir(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "run"


def train_config_values(request: dict[str, Any], data_yaml: str | Path, out: str | Path, resume: bool) -> dict[str, Any]:
    """The ``TrainConfig`` fields for a job request (a ``JobCreate`` dump)."""
    extra = dict(request.get("train_settings") or {})
    reserved = sorted(set(extra) & set(_RESERVED))
    if reserved:
        raise ConfigError(f"train_settings may not set {', '.join(reserved)}; the service sets them for each job")
    values: dict[str, Any] = dict(extra)
    peft_settings = dict(request.get("peft_settings") or {})
    for key in ("rank", "alpha"):
        if key in peft_settings:
            values[key] = peft_settings.pop(key)
    values.update(
        data=str(data_yaml),
        out=str(out),
        base=request.get("base_model") or "glasses-base-yolo11n",
        peft=request.get("peft") or "none",
        peft_settings=peft_settings,
        optimizer=request.get("optimizer") or "adamw",
        optimizer_settings=dict(request.get("optimizer_settings") or {}),
        imgsz=request.get("imgsz", 320),
        batch=request.get("batch", 8),
        seed=request.get("seed", 0),
        quiet=True,
        resume=str(out) if resume else None,
    )
    if request.get("lr") is not None:
        values["lr"] = request["lr"]
    if request.get("steps") is not None:
        values["max_steps"] = request["steps"]
        values["epochs"] = request.get("epochs") or _EPOCHS_FOR_STEP_BUDGET
    elif request.get("epochs") is not None:
        values["epochs"] = request["epochs"]
    return values


def build_train_config(request: dict[str, Any], data_yaml: str | Path, out: str | Path, resume: bool = False):
    """A validated ``TrainConfig`` (the recipe's own checks raise ``ConfigError``)."""
    from training.config import TrainConfig

    try:
        config = TrainConfig.from_dict(train_config_values(request, data_yaml, out, resume))
    except TypeError as exc:
        raise ConfigError(f"invalid training settings: {exc}") from None
    return config.validate()


def validate_job(spec: Any, data_yaml: str | Path, settings: Settings) -> None:
    """Fail fast at submit time: the request must make a ``TrainConfig`` the recipe accepts."""
    from models.registry import list_models

    if spec.base_model not in list_models():
        raise ConfigError(f"unknown base_model {spec.base_model!r}; use one of {', '.join(list_models())}")
    build_train_config(spec.model_dump(mode="json"), data_yaml, settings.jobs_dir / "_validate", resume=False)
