"""Request-body size and time limits, enforced before the body is parsed.

A declared ``Content-Length`` above the route's limit is answered 413 without
reading anything; a body without one is counted as it streams in and cut off at
the limit. The exact per-file limits (image bytes, zip bytes) are checked again
by the routes; these bounds only add room for the multipart / base64 framing.
A body that has not fully arrived ``request_body_timeout_s`` after the request
started is answered 408 and the connection closed (a slow client holds nothing:
the detect route reads the body before it takes an inference slot).
"""

from __future__ import annotations

import json
import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.config import Settings

_FRAMING = 64 * 1024
_DEFAULT_LIMIT = 1024 * 1024


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 JSON for bodies above the limit of their route."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.limits = {
            "/v1/detect": settings.max_upload_bytes * 4 // 3 + _FRAMING,  # base64 in JSON is 4/3 of the bytes
            "/v1/jobs": settings.max_dataset_zip_bytes + _FRAMING,
        }
        self.timeout = settings.request_body_timeout_s

    def limit_for(self, path: str) -> int:
        return self.limits.get(path.rstrip("/"), _DEFAULT_LIMIT)

    @staticmethod
    async def _reject(send: Send, limit: int, status: int = 413, message: str | None = None) -> None:
        error = "PayloadTooLargeError" if status == 413 else "RequestTimeoutError"
        message = message or f"the request body is larger than {limit} bytes; send less"
        body = json.dumps({"error": error, "message": message}).encode()
        await send({"type": "http.response.start", "status": status,
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
        deadline = time.monotonic() + self.timeout
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, rejected, body_done
            if body_done:
                return await receive()  # after the body: only a disconnect can come, wait for it
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                if not rejected:
                    rejected = True
                    await self._reject(send, limit, 408, f"the request body did not arrive within {self.timeout:g} s; "
                                       "send it faster or in a smaller request")
                raise _TooSlow() from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
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
        except (_TooLarge, _TooSlow):
            pass
        except Exception:
            if not rejected:
                raise
