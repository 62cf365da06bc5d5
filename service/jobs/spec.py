"""From a job request to the recipe's ``TrainConfig``, and where a job's files live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.errors import ConfigError
from service.core.config import Settings
from training.settings import SettingError, check_settings

# Settings a job controls itself; train_settings may not override them (replay goes through the data root).
_RESERVED = ("data", "out", "resume", "quiet", "replay")
# Top-level request fields and the TrainConfig field each one becomes.
_REQUEST_FIELDS = {"steps": "max_steps", "base_model": "base", "replay": "replay", "replay_fraction": "replay_fraction",
                   "peft_settings.rank": "rank", "peft_settings.alpha": "alpha"}
# Without an epoch count, a step budget alone decides when a job ends.
_EPOCHS_FOR_STEP_BUDGET = 100_000


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def job_log_path(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "job.log"


def job_run_dir(settings: Settings, job_id: str) -> Path:
    """The job's run folder: a link to its latest attempt's folder (``service.jobs.attempts``)."""
    return job_dir(settings, job_id) / "run"


def train_config_values(
    request: dict[str, Any], data_yaml: str | Path, out: str | Path, resume: bool, replay_yaml: str | Path | None = None
) -> dict[str, Any]:
    """The ``TrainConfig`` fields for a job request (a ``JobCreate`` dump); ``replay_yaml`` is its resolved replay set."""
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
    if replay_yaml is not None:
        values["replay"] = str(replay_yaml)
    if request.get("replay_fraction") is not None:
        values["replay_fraction"] = request["replay_fraction"]
    if request.get("lr") is not None:
        values["lr"] = request["lr"]
    if request.get("steps") is not None:
        values["max_steps"] = request["steps"]
        values["epochs"] = request.get("epochs") or _EPOCHS_FOR_STEP_BUDGET
    elif request.get("epochs") is not None:
        values["epochs"] = request["epochs"]
    return values


def check_train_values(request: dict[str, Any], values: dict[str, Any]) -> None:
    """Types and bounds of every training setting (torch-free); the error names the request's own field."""
    check_settings(request.get("train_settings") or {}, where="train_settings.")
    try:
        check_settings(values)
    except SettingError as exc:
        where = next((name for name, field in _REQUEST_FIELDS.items() if field == exc.field), exc.field)
        raise SettingError(where, str(exc).split(": ", 1)[1]) from None


def build_train_config(request: dict[str, Any], spec: dict[str, Any], out: str | Path, resume: bool = False):
    """The job's validated ``TrainConfig``, in the worker (``spec`` is the stored job record)."""
    from training.config import TrainConfig

    values = train_config_values(request, spec["data_yaml"], out, resume, spec.get("replay_yaml"))
    check_train_values(request, values)
    try:
        config = TrainConfig.from_dict(values)
    except TypeError as exc:
        raise ConfigError(f"invalid training settings: {exc}") from None
    return config.validate()
