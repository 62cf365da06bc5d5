"""Dependencies shared by the routes: the app's components, API-key checks, the inference slot."""

from __future__ import annotations

import hashlib

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.core.config import Settings
from service.core.errors import NotReadyError, UnauthorizedError
from service.core.inference import DetectorPool, InFlightLimiter
from service.core.metrics import Metrics
from service.core.security import API_KEY_HEADER, key_is_valid
from service.jobs.store import JobStore
from service.registry import ModelRegistry

api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the service's API key")


def _state(request: Request, name: str):
    value = getattr(request.app.state, name, None)
    if value is None:
        raise NotReadyError("the service is still starting; retry when /healthz answers 200")
    return value


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return _state(request, "store")


def get_registry(request: Request) -> ModelRegistry:
    return _state(request, "registry")


def get_pool(request: Request) -> DetectorPool:
    return _state(request, "pool")


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _check_key(request: Request, presented: str | None) -> None:
    if not key_is_valid(presented, _state(request, "api_keys")):
        what = "missing" if not presented else "wrong"
        raise UnauthorizedError(f"{what} API key; send the service's key in the {API_KEY_HEADER} header")


def require_api_key(request: Request, api_key: str | None = Security(api_key_header)) -> None:
    """Jobs and model changes always need the key."""
    _check_key(request, api_key)


def inference_auth(
    request: Request, settings: Settings = Depends(get_settings), api_key: str | None = Security(api_key_header)
) -> None:
    """Inference needs the key only when ``inference_requires_key`` is set."""
    if settings.inference_requires_key:
        _check_key(request, api_key)


def get_limiter(request: Request) -> InFlightLimiter:
    return _state(request, "limiter")


def key_owner(api_key: str | None = Security(api_key_header)) -> str:
    """A stable, non-secret id of the presented key (jobs are counted per key for quotas)."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
