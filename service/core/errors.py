"""Service errors and the handlers that turn every error into a JSON 4xx body.

Body shape, for every error: ``{"error": "<type>", "message": "<what to fix>"}``.
The project's own :class:`~models.errors.GlassesVisionError` subclasses carry
their HTTP status; request-validation errors become 422 with each bad field named.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import GlassesVisionError

log = logging.getLogger("glasses_vision.service")


class UnauthorizedError(GlassesVisionError):
    """No API key, or a wrong one."""

    http_status = 401


class ConflictError(GlassesVisionError):
    """The request does not fit the current state (cancel a finished job, delete the default model)."""

    http_status = 409


class PayloadTooLargeError(GlassesVisionError):
    """A body, upload or decoded image above the configured limits."""

    http_status = 413


class UnsupportedMediaError(GlassesVisionError):
    """An upload that is not an image (or not a zip) at all."""

    http_status = 415


class TooManyRequestsError(GlassesVisionError):
    """More requests in flight than the concurrency limit allows."""

    http_status = 429


class InsufficientStorageError(GlassesVisionError):
    """A disk quota of the service is full (uploaded datasets of queued jobs)."""

    http_status = 507


class RequestTimeoutError(GlassesVisionError):
    """The request body did not arrive in time."""

    http_status = 408


class NotReadyError(GlassesVisionError):
    """The service (or the model asked for) is still loading."""

    http_status = 503


def error_body(error: str, message: str) -> dict[str, str]:
    return {"error": error, "message": message}


def _headers_for(status: int) -> dict[str, str] | None:
    if status == 401:
        return {"WWW-Authenticate": "APIKey"}
    if status in (429, 503):
        return {"Retry-After": "1"}
    return None


async def _project_error(request: Request, exc: GlassesVisionError) -> JSONResponse:
    status = int(getattr(exc, "http_status", 400))
    return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=status, headers=_headers_for(status))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(parts)
    return JSONResponse(error_body("ValidationError", message), status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no endpoint at {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
    headers = dict(exc.headers or {})
    return JSONResponse(error_body("HTTPError", message), status_code=exc.status_code, headers=headers or None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Last resort: every input problem the service knows about is mapped above.
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body("InternalError", f"unexpected {type(exc).__name__} while handling the request; see the server log"),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""
    app.add_exception_handler(GlassesVisionError, _project_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
