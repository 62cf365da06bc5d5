"""Bodies of ``POST /v1/detect``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DetectJSON(BaseModel):
    """The JSON form of a detect request (the other form is a multipart upload, field ``image``)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image_base64": "<base64 of a JPEG or PNG file>"}]}
    )
    image_base64: str = Field(description="the image file's bytes, base64 encoded (a data: URL prefix is accepted)")


class DetectionOut(BaseModel):
    x1: float = Field(description="left edge, in the original image's pixels")
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    class_name: str


class ImageSize(BaseModel):
    width: int
    height: int


class DetectOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "glasses-base-yolo11n",
                    "image": {"width": 640, "height": 480},
                    "detections": [
                        {"x1": 101.5, "y1": 88.0, "x2": 230.2, "y2": 301.7, "score": 0.91, "class_id": 0, "class_name": "cup"}
                    ],
                    "inference_ms": 12.4,
                }
            ]
        }
    )
    model: str
    image: ImageSize
    detections: list[DetectionOut]
    inference_ms: float = Field(description="time spent in the runtime (pre-processing, network, NMS)")
