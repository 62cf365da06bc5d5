"""The OpenAPI document: component references that resolve, optional auth where the key is optional.

FastAPI inlines a body schema given in ``openapi_extra`` with its own ``$defs``, whose
``#/$defs/...`` references do not resolve from the document root; they are moved to
``components/schemas`` here. ``/v1/detect`` takes the key only when
``inference_requires_key`` is set, so its security lists "no key" as an option.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.core.config import Settings


def _lift_defs(node: Any, components: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        defs = node.pop("$defs", None)
        if defs:
            for name, schema in defs.items():
                components.setdefault(name, _lift_defs(schema, components))
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                value = "#/components/schemas/" + value[len("#/$defs/"):]
            out[key] = _lift_defs(value, components)
        return out
    if isinstance(node, list):
        return [_lift_defs(v, components) for v in node]
    return node


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace ``app.openapi`` with a generator that fixes the document as above (built once, cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        doc["paths"] = _lift_defs(doc["paths"], components)
        detect = doc["paths"].get("/v1/detect", {}).get("post")
        if detect is not None and not settings.inference_requires_key:
            detect["security"] = [{}, {"APIKeyHeader": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
