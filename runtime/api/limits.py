"""Request limits (R-API-1, R-API-2): how much a request may carry and an agent's result keep.

The body limit is a pure ASGI middleware, outside FastAPI, so an oversized
request is refused before it is parsed or its token looked at; a 422 never
echoes a large input back; an agent's output is capped as a worker caps its
own. The numbers and their reasons are in runtime.server's docstring.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from runtime.settings import positive_int

log = logging.getLogger("orvanta.server")

DEFAULT_OUTPUT_LIMIT = 1 << 20  # = runtime.settings.Settings.output_limit
MAX_ECHOED_INPUT_CHARS = 200

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ServerLimits:
    """How much one request may carry and how much of an agent's output is kept."""

    max_request_bytes: int
    output_limit: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerLimits:
        env = os.environ if env is None else env
        output_limit = positive_int(env, "ORVANTA_OUTPUT_LIMIT", DEFAULT_OUTPUT_LIMIT, "bytes")
        default = (6 << 20) + 12 * output_limit  # see runtime.server's docstring
        return cls(positive_int(env, "ORVANTA_MAX_REQUEST_BYTES", default, "bytes"), output_limit)


class BodyLimit:
    """Refuses a body over `limit` bytes with 413 before the app, and so its token check, runs.

    A pure ASGI middleware: a declared Content-Length over the limit is refused
    unread; any other body is read here, counting the bytes as they stream in
    (chunked transfers have no length), and handed to the app only when it fits.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.limit:
            await self._refuse(scope, send, declared)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was complete
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                chunks.clear()
                await self._refuse(scope, send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else "a streamed body"
        log.warning(
            "%s %s: refused %s over ORVANTA_MAX_REQUEST_BYTES=%d",
            scope.get("method"),
            scope.get("path"),
            size,
            self.limit,
        )
        body = json.dumps(
            {
                "detail": f"request body too large: {size} over the server's limit of "
                f"{self.limit} bytes (ORVANTA_MAX_REQUEST_BYTES)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                # No `connection: close`: the server discards the rest of the body unread and
                # unbuffered, so a client that sends it all before reading (http.client, the
                # agent) still gets this answer instead of a reset connection.
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _small(value: Any, budget: int = MAX_ECHOED_INPUT_CHARS) -> bool:
    """True when `value` is short enough to echo: its text parts fit in `budget` characters."""

    def size(item: Any, left: int) -> int:
        if isinstance(item, str | bytes):
            return len(item)
        if isinstance(item, Mapping):
            total = 0
            for key, inner in item.items():
                total += size(key, left - total) + size(inner, left - total)
                if total > left:
                    break
            return total
        if isinstance(item, list | tuple | set):
            total = 0
            for inner in item:
                total += size(inner, left - total) + 1
                if total > left:
                    break
            return total
        return 8

    return size(value, budget) <= budget


def _cut(part: Any) -> Any:
    if isinstance(part, str) and len(part) > MAX_ECHOED_INPUT_CHARS:
        return f"{part[:64]}... ({len(part)} characters)"
    return part


def quiet_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without large inputs: a 422 never echoes what it refused (R-API-1)."""
    quiet = []
    for error in errors:
        error = dict(error)
        if "input" in error and not _small(error["input"]):
            del error["input"]
        error["loc"] = [_cut(part) for part in error.get("loc", ())]
        quiet.append(error)
    return quiet


def cap_output(text: str, limit: int) -> tuple[str, int]:
    """At most `limit` characters of an agent's stream, noted as the executor notes its own cap.

    Returns the kept text and how many UTF-8 bytes were dropped (0: unchanged).
    A stream a worker capped itself (`limit` characters and its own note) passes.
    """
    if len(text) <= limit + 100:  # room for the agent's own truncation note
        return text, 0
    dropped = len(text[limit:].encode("utf-8", "surrogatepass"))
    return text[:limit] + f"\n[output truncated: {dropped} more bytes dropped]\n", dropped
