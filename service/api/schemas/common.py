"""The error body every endpoint answers with when something is wrong."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ErrorOut(BaseModel):
    """``error`` names the problem; ``message`` says what to change."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "NotFoundError", "message": "unknown model 'kitchen'; registered models: glasses-base-yolo11n (GET /v1/models)"}]}
    )
    error: str
    message: str


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries for the listed status codes, all with :class:`ErrorOut`."""
    text = {
        401: "missing or wrong X-API-Key",
        404: "unknown model or job",
        409: "not possible in the current state",
        413: "upload, image or archive above the limits",
        415: "not an image (or not a zip)",
        422: "invalid parameters or corrupt input",
        429: "too many requests in flight",
        503: "still loading",
    }
    return {code: {"model": ErrorOut, "description": text.get(code, "error")} for code in codes}
