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
        400: "malformed multipart body, or too many files or fields in it",
        401: "missing or wrong X-API-Key",
        404: "unknown model or job",
        408: "the request body did not arrive within the body timeout",
        409: "not possible in the current state",
        413: "upload, image or archive above the limits",
        415: "not an image (or not a zip)",
        422: "invalid parameters or corrupt input",
        429: "too many requests in flight or queued, or too many active jobs for this key",
        503: "still loading, or no slot came free in time",
        507: "the disk quota for uploaded datasets is full",
    }
    return {code: {"model": ErrorOut, "description": text.get(code, "error")} for code in codes}
