"""The test page: ``GET /`` and its files under ``/ui/`` (plain HTML, JS and CSS shipped in ``service/static``).

The page talks only to this service (``/v1/models``, ``/v1/detect``, ``/v1/jobs``, ``/v1/jobs/{id}/events``);
its Content-Security-Policy forbids loading anything from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from models.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob: mediastream:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP}

router = APIRouter(include_in_schema=False)


def static_file(name: str) -> FileResponse:
    """One file of ``service/static`` by its exact name (nothing else is reachable)."""
    path = STATIC_DIR / name
    suffix = Path(name).suffix
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in MEDIA_TYPES or not path.is_file():
        raise NotFoundError(f"no file {name!r} in the test page; open / for the page")
    return FileResponse(path, media_type=MEDIA_TYPES[suffix], headers=HEADERS)


@router.get("/")
async def index() -> FileResponse:
    """The test page: pick a model, drop a photo or use the camera, see the boxes; follow jobs."""
    return static_file("index.html")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    return static_file(name)
