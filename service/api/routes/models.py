"""``/v1/models``: the registered ONNX models."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Path

from service.api.deps import get_pool, get_registry, get_settings, require_api_key
from service.api.schemas.common import error_responses
from service.api.schemas.models import ModelDeleted, ModelList, ModelOut
from service.core.config import Settings
from service.core.errors import ConflictError
from service.core.inference import DetectorPool
from service.registry import ModelRecord, ModelRegistry

router = APIRouter(prefix="/v1/models", tags=["models"])


def _out(record: ModelRecord, settings: Settings, pool: DetectorPool) -> ModelOut:
    data = record.to_dict()
    data.pop("path")
    return ModelOut(**data, loaded=pool.is_loaded(record.id), default=record.id == settings.default_model)


@router.get("", response_model=ModelList, summary="List the registered models")
async def list_models(
    settings: Settings = Depends(get_settings),
    registry: ModelRegistry = Depends(get_registry),
    pool: DetectorPool = Depends(get_pool),
) -> ModelList:
    records = await anyio.to_thread.run_sync(registry.list)
    return ModelList(default_model=settings.default_model, models=[_out(r, settings, pool) for r in records])


@router.get("/{model_id}", response_model=ModelOut, summary="One model's metadata", responses=error_responses(404))
async def get_model(
    model_id: str = Path(description="model id"),
    settings: Settings = Depends(get_settings),
    registry: ModelRegistry = Depends(get_registry),
    pool: DetectorPool = Depends(get_pool),
) -> ModelOut:
    record = await anyio.to_thread.run_sync(registry.get, model_id)
    return _out(record, settings, pool)


@router.delete(
    "/{model_id}",
    response_model=ModelDeleted,
    summary="Delete a model (needs the API key)",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 404, 409),
)
async def delete_model(
    model_id: str = Path(description="model id"),
    settings: Settings = Depends(get_settings),
    registry: ModelRegistry = Depends(get_registry),
    pool: DetectorPool = Depends(get_pool),
) -> ModelDeleted:
    await anyio.to_thread.run_sync(registry.get, model_id)
    if model_id == settings.default_model:
        raise ConflictError(
            f"{model_id!r} is the default model and cannot be deleted; set GLASSES_VISION_DEFAULT_MODEL to another "
            "model and restart first"
        )
    pool.evict(model_id)
    await anyio.to_thread.run_sync(registry.delete, model_id)
    return ModelDeleted(id=model_id)
