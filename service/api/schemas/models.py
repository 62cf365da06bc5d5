"""Bodies of ``/v1/models``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_EXAMPLE: dict[str, Any] = {
    "id": "glasses-base-yolo11n",
    "size_bytes": 10631712,
    "sha256": "3f1c...",
    "created_at": 1790000000.0,
    "source": "shipped base model",
    "job_id": None,
    "base_model": "glasses-base-yolo11n",
    "classes": ["cup", "bottle"],
    "imgsz": 320,
    "metrics": {},
    "memory": None,
    "export": {"verify": True},
    "verification": {"passed": True, "max_abs_diff": 1.2e-05},
    "quantization": None,
    "onnx_metadata": {},
    "loaded": True,
    "default": True,
}


class ModelOut(BaseModel):
    """A registered model: where it came from, its classes, and the metrics of the job that trained it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE]})
    id: str
    size_bytes: int
    sha256: str
    created_at: float
    source: str = ""
    job_id: str | None = None
    base_model: str | None = None
    classes: list[str] | None = None
    imgsz: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    memory: dict[str, Any] | None = None
    export: dict[str, Any] = Field(default_factory=dict)
    verification: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = Field(None, description="int8 report (size, mAP change) when quantized")
    onnx_metadata: dict[str, str] = Field(default_factory=dict)
    loaded: bool = Field(False, description="an inference session for it is open")
    default: bool = Field(False, description="used when a detect request names no model")


class ModelList(BaseModel):
    default_model: str
    models: list[ModelOut]


class ModelDeleted(BaseModel):
    id: str
    deleted: bool = True
