"""Bodies of ``/v1/jobs``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.registry import check_model_id

JOB_EXAMPLE = {
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


class ExportOptions(BaseModel):
    """How the finished job's merged model is exported before it is registered."""

    model_config = ConfigDict(extra="forbid")
    opset: int | None = Field(None, ge=11, le=23, description="ONNX opset (default: the exporter's)")
    half: bool = Field(False, description="fp16 weights")
    int8: bool = Field(False, description="static int8 quantization calibrated on the job's training images")
    verify: bool = Field(True, description="check ONNX against PyTorch on real frames before registering")


class JobCreate(BaseModel):
    """A fine-tuning job. ``dataset`` is a path relative to the server's data root (or give a zip upload instead)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})
    name: str | None = Field(None, max_length=100, description="a label for people")
    dataset: str | None = Field(
        None, description="data.yaml (or its folder, or a COCO json) relative to the data root; omit with a zip upload"
    )
    base_model: str = Field("glasses-base-yolo11n", description="a name from models.registry.list_models()")
    peft: str = Field("lora", description="PEFT method (lora, dora, bitfit, qlora, adapters, ...)")
    peft_settings: dict[str, Any] = Field(
        default_factory=dict, description="method settings: rank, alpha and any apply_peft keyword, e.g. {'rank': 8}"
    )
    optimizer: str = Field("adamw", description="adamw, coap, coap8bit, galore, adamw8bit")
    optimizer_settings: dict[str, Any] = Field(default_factory=dict, description="e.g. {'rank_ratio_cnn': 4}")
    lr: float | None = Field(None, gt=0, le=1)
    steps: int | None = Field(None, gt=0, le=1_000_000, description="optimizer steps (or give epochs)")
    epochs: int | None = Field(None, gt=0, le=10_000)
    imgsz: int = Field(320, ge=32, le=1280, description="training and export input size, a multiple of 32")
    batch: int = Field(8, ge=1, le=1024)
    seed: int = 0
    train_settings: dict[str, Any] = Field(
        default_factory=dict, description="any further TrainConfig fields, passed through and validated by the recipe"
    )
    export: ExportOptions = Field(default_factory=ExportOptions)
    model_id: str | None = Field(None, description="id to register the exported model under (default: the job id)")

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"imgsz must be a multiple of 32 (the network stride), e.g. {value // 32 * 32 or 32}")
        return value

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
    spec: dict[str, Any]


class JobList(BaseModel):
    jobs: list[JobOut]


class JobLogs(BaseModel):
    id: str
    lines: list[str]
    total_lines: int
