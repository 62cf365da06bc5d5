"""Bodies of ``/v1/jobs``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.registry import check_model_id
from training.config import TrainConfig
from training.settings import BOUNDS, MAX_MAPPING_KEYS

JOB_EXAMPLE: dict[str, Any] = {
    "dataset": "kitchen/data.yaml",
    "base_model": "glasses-base-yolo11n",
    "peft": "lora",
    "peft_settings": {"rank": 8},
    "optimizer": "coap",
    "steps": 200,
    "imgsz": 320,
    "batch": 8,
    "export": {"verify": True},
    "model_id": "kitchen-lora",
}

#: The exporter's supported opsets (export.onnx_export.MIN_OPSET / MAX_OPSET; a test keeps them equal: the
#: exporter imports torch, which the API process never does).
MIN_OPSET, MAX_OPSET = 13, 20

_DEFAULTS = TrainConfig()


def _bounded(name: str, description: str, default: Any = ..., nullable: bool = False) -> Any:
    """A ``Field`` carrying ``training.settings.BOUNDS[name]`` (so the OpenAPI schema shows the same range)."""
    bound = BOUNDS[name]
    limits: dict[str, Any] = {}
    if bound.low is not None:
        limits["gt" if bound.low_open else "ge"] = bound.low if bound.kind == "float" else int(bound.low)
    if bound.high is not None:
        limits["lt" if bound.high_open else "le"] = bound.high if bound.kind == "float" else int(bound.high)
    if bound.multiple_of:
        limits["multiple_of"] = bound.multiple_of
    default = getattr(_DEFAULTS, name) if default is ... else default
    return Field(default, description=description, **limits)


class ExportOptions(BaseModel):
    """How the finished job's merged model is exported before it is registered."""

    model_config = ConfigDict(extra="forbid")
    opset: int | None = Field(None, ge=MIN_OPSET, le=MAX_OPSET, description="ONNX opset (default: the exporter's)")
    half: bool = Field(False, description="fp16 weights")
    int8: bool = Field(False, description="static int8 quantization calibrated on the job's training images")
    verify: bool = Field(True, description="check ONNX against PyTorch on real frames before registering")


class JobCreate(BaseModel):
    """A fine-tuning job. ``dataset`` is a path relative to the server's data root (or give a zip upload instead).

    Defaults and bounds are ``training.config.TrainConfig``'s and ``training.settings.BOUNDS``; every field,
    and every key of ``train_settings``, is checked at submission (422 naming the field).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})
    name: str | None = Field(None, max_length=100, description="a label for people")
    dataset: str | None = Field(
        None, min_length=1, max_length=1024,
        description="data.yaml (or its folder, or a COCO json) relative to the data root; omit with a zip upload",
    )
    replay: str | None = Field(
        None, min_length=1, max_length=1024,
        description="a source dataset under the data root mixed into every step so the base's domain is not forgotten",
    )
    replay_fraction: float = _bounded("replay_fraction", "share of each step's images drawn from 'replay'")
    base_model: str = Field(_DEFAULTS.base, max_length=200, description="a name from models.registry.list_models()")
    peft: str = Field(_DEFAULTS.peft, max_length=100,
                      description="'none' (full fine-tuning) or a PEFT method of service.layers.peft.list_peft_methods()")
    peft_settings: dict[str, Any] = Field(
        default_factory=dict, max_length=MAX_MAPPING_KEYS,
        description="method settings: rank, alpha and the fields of the method's config, e.g. {'rank': 8}",
    )
    optimizer: str = Field(_DEFAULTS.optimizer, max_length=100,
                           description="a name of training.optim.list_optimizers() (adamw, coap, ...)")
    optimizer_settings: dict[str, Any] = Field(default_factory=dict, max_length=MAX_MAPPING_KEYS,
                                               description="e.g. {'rank_ratio_cnn': 4}")
    lr: float | None = _bounded("lr", "peak learning rate (default: TrainConfig's)", default=None)
    steps: int | None = _bounded("max_steps", "optimizer steps (or give epochs)", default=None)
    epochs: int | None = _bounded("epochs", "passes over the training set", default=None)
    imgsz: int = _bounded("imgsz", "training and export input size, a multiple of 32")
    batch: int = _bounded("batch", "images per step")
    seed: int = _bounded("seed", "seed for initialisation, data order and augmentation")
    train_settings: dict[str, Any] = Field(
        default_factory=dict, max_length=len(BOUNDS),
        description="further TrainConfig fields (workers, warmup_fraction, ...), each checked against its bounds",
    )
    export: ExportOptions = Field(default_factory=lambda: ExportOptions.model_validate({}))
    model_id: str | None = Field(None, description="id to register the exported model under (default: the job id)")

    @field_validator("model_id")
    @classmethod
    def _valid_model_id(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_model_id(value)
            except Exception as exc:
                raise ValueError(str(exc)) from None
        return value


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job-3f2a9c1b7d4e",
                    "name": "kitchen",
                    "state": "running",
                    "created_at": 1790000000.0,
                    "updated_at": 1790000042.0,
                    "started_at": 1790000001.0,
                    "finished_at": None,
                    "step": 40,
                    "total_steps": 200,
                    "progress": 0.2,
                    "metrics": {"loss": 3.12, "lr": 0.001},
                    "memory": None,
                    "error": None,
                    "model_id": None,
                    "cancel_requested": False,
                    "attempts": 1,
                    "retention_removed": None,
                    "spec": JOB_EXAMPLE,
                }
            ]
        }
    )
    id: str
    name: str | None = None
    state: str = Field(description="queued, running, succeeded, failed, cancelled or interrupted")
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    progress: float = Field(0.0, description="0..1")
    metrics: dict[str, Any] = Field(default_factory=dict, description="latest training / evaluation metrics")
    memory: dict[str, Any] | None = Field(None, description="the memory report (bytes per component)")
    error: str | None = None
    model_id: str | None = Field(None, description="the registered model, once the job succeeded")
    cancel_requested: bool = False
    attempts: int = 0
    retention_removed: str | None = Field(
        None,
        description="what retention removed of a failed job that its resume needs (\"run's checkpoints\", "
                    "\"uploaded dataset\"); such a job cannot be resumed (409): submit it again. Only the newest "
                    "GLASSES_VISION_KEEP_FAILED_RUNS failed jobs keep theirs",
    )
    spec: dict[str, Any]


class JobList(BaseModel):
    jobs: list[JobOut]


class JobLogs(BaseModel):
    id: str
    lines: list[str]
    total_lines: int
