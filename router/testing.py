"""A fast, fault-injecting fake OpenAI upstream (raw asyncio HTTP/1.1), for tests and the router benchmark.

It answers ``/v1/chat/completions`` and ``/v1/completions`` (JSON or SSE) and ``/health``. Its ``mode`` decides
how it misbehaves: ``ok``, ``slow`` (waits ``delay`` before the headers), ``error`` (HTTP 500), ``close`` (closes
the connection without answering), ``die_midstream`` (sends the headers and two chunks, then closes),
``die_mid_event`` (two chunks, then half of the third event, then closes). With ``api_key`` set it answers 401 to
requests without ``Authorization: Bearer <api_key>``, as ``vllm serve --api-key`` does. It records the bodies and
the headers it received so tests can check what was forwarded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any


class FakeUpstream:
    def __init__(
        self,
        *,
        mode: str = "ok",
        delay: float = 0.0,
        chunks: int = 4,
        pause: float = 0.0,
        name: str = "fake",
        api_key: str | None = None,
    ) -> None:
        self.mode, self.delay, self.chunks, self.name, self.api_key = mode, delay, chunks, name, api_key
        self.pause = pause  # seconds between the first and the second chunk of a stream
        self.received: list[dict[str, Any]] = []
        self.received_headers: list[dict[str, str]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FakeUpstream:
        threading.Thread(target=self._run, daemon=True, name=f"fake-upstream-{self.name}").start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, sock=sock, backlog=1024))
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)  # the daemon loop lingers; connections end

    # -- protocol --------------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._respond(method, path, body, writer, headers)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _respond(
        self, method: str, path: str, body: bytes, w: asyncio.StreamWriter, headers: dict[str, str]
    ) -> bool:
        if path == "/health":
            await self._send(w, 200, b"{}")
            return True
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            await self._send(w, 401, json.dumps({"error": "Unauthorized"}).encode())
            return True
        req = json.loads(body or b"{}")
        self.received.append(req)
        self.received_headers.append(headers)
        mode = self.mode
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if mode == "close":
            return False
        if mode == "error":
            await self._send(w, 500, json.dumps({"error": {"message": "injected failure"}}).encode())
            return True
        chat = path.endswith("/chat/completions")
        if req.get("stream"):
            w.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                b"connection: close\r\n\r\n"
            )
            for i in range(self.chunks):
                if mode in ("die_midstream", "die_mid_event") and i == 2:
                    if mode == "die_mid_event":
                        self._chunk(w, b'data: {"id": "x", "object": "chat.comp')
                    await w.drain()
                    return False
                delta = {"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "}
                event = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": 0, "model": req.get("model"),
                         "choices": [{"index": 0, **delta, "finish_reason": None}]}  # fmt: skip
                self._chunk(w, f"data: {json.dumps(event)}\n\n".encode())
                await w.drain()
                if i == 0 and self.pause:
                    await asyncio.sleep(self.pause)
            self._chunk(w, b"data: [DONE]\n\n")
            w.write(b"0\r\n\r\n")
            await w.drain()
            return False
        text = f"answer from {self.name}"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            obj = "text_completion"
        resp = {"id": "x", "object": obj, "created": 0, "model": req.get("model"), "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}  # fmt: skip
        await self._send(w, 200, json.dumps(resp).encode())
        return True

    @staticmethod
    def _chunk(w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    @staticmethod
    async def _send(w: asyncio.StreamWriter, status: int, body: bytes) -> None:
        reason = {200: "OK", 401: "Unauthorized", 500: "Internal Server Error"}.get(status, "X")
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        w.write(head.encode() + body)
        await w.drain()
