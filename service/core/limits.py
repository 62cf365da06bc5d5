"""Request-body size limits, enforced before the body is parsed.

A declared ``Content-Length`` above the route's limit is answered 413 without
reading anything; a body without one is counted as it streams in and cut off at
the limit. The exact per-file limits (image bytes, zip bytes) are checked again
by the routes; these bounds only add room for the multipart / base64 framing.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.config import Settings

_FRAMING = 64 * 1024
_DEFAULT_LIMIT = 1024 * 1024


class _TooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 JSON for bodies above the limit of their route."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.limits = {
            "/v1/detect": settings.max_upload_bytes * 4 // 3 + _FRAMING,  # base64 in JSON is 4/3 of the bytes
            "/v1/jobs": settings.max_dataset_zip_bytes + _FRAMING,
        }

    def limit_for(self, path: str) -> int:
        return self.limits.get(path.rstrip("/"), _DEFAULT_LIMIT)

    @staticmethod
    async def _reject(send: Send, limit: int) -> None:
        body = json.dumps(
            {"error": "PayloadTooLargeError", "message": f"the request body is larger than {limit} bytes; send less"}
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._reject(send, limit)
                    return
        received = 0
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not rejected:
                    rejected = True
                    await self._reject(send, limit)
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:  # once the 413 is out, whatever the app answers is dropped
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not rejected:
                raise
