"""``POST /v1/detect``: boxes for one image, from ``export.runtime.Detector``.

The image comes as the raw body (``Content-Type: image/jpeg`` / ``image/png`` / any ``image/*``), as a
multipart upload (field ``image``) or base64 in JSON. With ``Accept: image/png`` (or ``?render=true``) the
answer is the frame with the boxes drawn by ``export.draw.draw_detections`` instead of JSON.

The hot path stays on the event loop except for one trip to a worker thread: no synchronous dependencies
(FastAPI would run each in the thread pool), decode and inference in one thread call (or in one batch of
``service.core.inference.MicroBatcher`` with other requests' frames), the JSON answer serialised once.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import time

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, Security
from starlette.datastructures import UploadFile
from pydantic import ValidationError

from export.draw import draw_detections
from models.errors import DataError, GlassesVisionError
from service.api.deps import api_key_header, get_limiter, get_metrics, get_pool, inference_auth
from service.api.schemas.common import error_responses
from service.api.schemas.detect import DetectJSON, DetectOut
from service.core.config import Settings
from service.core.errors import NotReadyError, PayloadTooLargeError, UnsupportedMediaError
from service.core.images import decode_upload
from service.core.inference import FrameJob, ModelLoadError

log = logging.getLogger("glasses_vision.service")
router = APIRouter(prefix="/v1", tags=["detect"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary", "description": "the image file's bytes"}},
            "image/png": {"schema": {"type": "string", "format": "binary", "description": "the image file's bytes"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary", "description": "the image file"}},
                }
            },
            "application/json": {
                "schema": DetectJSON.model_json_schema(),
                "example": {"image_base64": "<base64 of a JPEG or PNG file>"},
            },
        },
    }
}


async def _upload_bytes(upload: UploadFile, settings: Settings) -> bytes:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise _too_large(settings)
    return data


def _too_large(settings: Settings) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the image is larger than the limit of {settings.max_upload_bytes} bytes; send a smaller frame"
    )


async def _read_image_bytes(request: Request, settings: Settings) -> bytes | UploadFile:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":  # the file itself: nothing to parse
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_upload_bytes:
                raise _too_large(settings)
            chunks.append(chunk)
        return b"".join(chunks)
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise DataError("a multipart detect request needs a file field named 'image'")
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise _too_large(settings)
        return upload  # spooled to disk when large; read into memory only once the request has a slot
    if ctype == "application/json":
        try:
            body = DetectJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            raise DataError(f"invalid JSON body ({first['msg']}); send {{\"image_base64\": \"...\"}}") from None
        text = body.image_base64
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        if len(text) * 3 // 4 > settings.max_upload_bytes + 3:
            raise _too_large(settings)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise DataError("image_base64 is not valid base64; encode the image file's bytes with standard base64") from None
    raise UnsupportedMediaError(
        f"unsupported Content-Type {ctype or '(none)'!r}; send the image file as the body (image/jpeg, "
        "image/png), multipart/form-data with a file field 'image', or application/json with 'image_base64'"
    )


_PNG_DOC = {
    "description": "the boxes as JSON; with `Accept: image/png` or `?render=true`, the frame with the boxes drawn",
    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
}


def wants_png(accept: str) -> bool:
    """``Accept`` ranks ``image/png`` (or ``image/*``) above JSON; ``*/*`` and ties mean JSON."""
    png = json_q = 0.0
    for part in accept.split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if media in ("image/png", "image/*"):
            png = max(png, q)
        elif media in ("application/json", "application/*", "*/*"):
            json_q = max(json_q, q)
    return png > json_q


RENDER_SIDE = 1024  # frames with a side of 2 * RENDER_SIDE or more are drawn reduced (longer side < 2 * RENDER_SIDE)


def annotated_png(data: bytes, detections: list[dict], settings: Settings, budget=None) -> bytes:
    """The uploaded frame with the boxes (in the file's pixels), class names and scores drawn, as PNG bytes."""
    frame = decode_upload(data, settings.max_upload_bytes, settings.max_image_pixels, RENDER_SIDE, budget)
    sx, sy = frame.scale
    drawn = [{**d, "box": (d["box"][0] / sx, d["box"][1] / sy, d["box"][2] / sx, d["box"][3] / sy)} for d in detections]
    buf = io.BytesIO()
    draw_detections(frame.rgb, drawn).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


async def _inference_auth(request: Request, api_key: str | None = Security(api_key_header)) -> None:
    """``deps.inference_auth`` run on the event loop (a sync dependency would cost a thread-pool trip)."""
    inference_auth(request, request.app.state.settings, api_key)


@router.post(
    "/detect",
    response_model=DetectOut,
    summary="Detect objects in one image",
    dependencies=[Depends(_inference_auth)],
    responses={**error_responses(400, 401, 404, 408, 409, 413, 415, 422, 429, 503), 200: _PNG_DOC},
    openapi_extra=_BODY_DOC,
)
async def detect(
    request: Request,
    model: str | None = Query(None, description="model id (GET /v1/models); default: the server's default model"),
    conf: float = Query(0.25, ge=0.0, le=1.0, description="minimum score"),
    iou: float = Query(0.45, ge=0.0, le=1.0, description="NMS IoU threshold"),
    max_det: int = Query(300, gt=0, le=10_000, description="at most this many boxes"),
    render: bool = Query(False, description="answer with the frame and its boxes drawn, as PNG (as Accept: image/png)"),
) -> Response:
    """Send an image (the raw body, a multipart field ``image`` or base64 in JSON); boxes come back in its pixels."""
    settings: Settings = request.app.state.settings
    pool, limiter, metrics = get_pool(request), get_limiter(request), get_metrics(request)
    model_id = model or settings.default_model
    with pool.arriving(model_id):  # a batch forming for this model may wait for this frame
        data = await _read_image_bytes(request, settings)  # before a slot: a slow upload holds none
    if model_id == settings.default_model and not request.app.state.ready and not pool.is_loaded(model_id):
        raise NotReadyError(
            f"the default model {model_id!r} is still being prepared; retry when GET /readyz answers 200"
        )
    async with limiter.slot(on_reject=lambda: metrics.count_rejected("concurrency")):
        with pool.arriving(model_id) as arrival:
            if not isinstance(data, bytes):
                data = await _upload_bytes(data, settings)
            loaded = await pool.get(model_id)
            detector = loaded.detector
            imgsz = getattr(detector, "imgsz", None) or loaded.record.imgsz
            target = max(imgsz) if isinstance(imgsz, (tuple, list)) else imgsz
            budget = request.app.state.decode_budget

            def decode():
                return decode_upload(data, settings.max_upload_bytes, settings.max_image_pixels, target, budget)

            if loaded.batcher is not None:  # a dynamic-batch file: run with the frames that arrive with this one
                result = await loaded.batcher.detect(FrameJob(decode, conf=conf, iou=iou, max_det=max_det, nbytes=len(data)),
                                                    arrival)
                image, found, seconds = result.image, result.detections, result.seconds
            else:
                arrival.leave()

                def decode_and_detect():  # one trip to the thread pool per request
                    image = decode()
                    start = time.perf_counter()
                    try:
                        found = detector.detect(image.rgb, conf=conf, iou=iou, max_det=max_det)
                    except GlassesVisionError:
                        raise
                    except Exception as exc:  # onnxruntime failing on this model: say which model, keep serving
                        log.exception("inference with %s failed", model_id)
                        raise ModelLoadError(f"model {model_id!r} failed on this image ({type(exc).__name__}: {exc}); "
                                             "check the model with GET /v1/models/{id} or re-export it") from None
                    return image, found, time.perf_counter() - start

                image, found, seconds = await anyio.to_thread.run_sync(decode_and_detect)
        png = None
        if render or wants_png(request.headers.get("accept", "")):  # the model may have seen a reduced frame
            fx, fy = image.scale
            boxes = [{"box": (d.box[0] * fx, d.box[1] * fy, d.box[2] * fx, d.box[3] * fy), "score": float(d.score),
                      "class_id": int(d.class_id), "class_name": str(d.class_name)} for d in found]
            png = await anyio.to_thread.run_sync(annotated_png, data, boxes, settings, budget)
    metrics.observe_inference(model_id, seconds)
    if png is not None:
        return Response(png, media_type="image/png", headers={
            "X-Model": model_id, "X-Detections": str(len(found)), "X-Inference-Ms": f"{seconds * 1000.0:.3f}",
            "X-Image-Size": f"{image.width}x{image.height}", "Cache-Control": "no-store"})
    return Response(detect_json(model_id, image, found, seconds), media_type="application/json")


def detect_json(model_id: str, image, found, seconds: float) -> bytes:
    """The ``DetectOut`` body, written in one ``json.dumps`` (no model validation on the way out)."""
    sx, sy = image.scale
    body = {
        "model": model_id,
        "image": {"width": int(image.width), "height": int(image.height)},
        "detections": [
            {"x1": float(d.box[0]) * sx, "y1": float(d.box[1]) * sy, "x2": float(d.box[2]) * sx,
             "y2": float(d.box[3]) * sy, "score": float(d.score), "class_id": int(d.class_id),
             "class_name": str(d.class_name)}
            for d in found
        ],
        "inference_ms": round(seconds * 1000.0, 3),
    }
    return json.dumps(body, separators=(",", ":")).encode()
