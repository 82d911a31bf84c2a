"""A fast, fault-injecting fake OpenAI upstream (raw asyncio HTTP/1.1), for tests and the router benchmark.

It answers ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` (JSON or SSE) and ``/health``. Its
``mode`` decides how it misbehaves: ``ok``, ``slow`` (waits ``delay`` before the headers), ``error`` (HTTP 500),
``close`` (closes the connection without answering), ``die_midstream`` (sends the headers and two events, then
closes), ``die_mid_event`` (two events, then half of the third, then closes). With ``api_key`` set it answers 401 to
requests without ``Authorization: Bearer <api_key>``, as ``vllm serve --api-key`` does. It records the bodies and
the headers it received, and the exact bytes of every stream it sent, so tests can check what was forwarded and
what was relayed.

With a ``script`` (``ToolScript``) it plays a tool-calling model for requests that carry ``tools``: it calls the
scripted functions one turn at a time and answers once it has every result, in both APIs' formats (chat
``tool_calls`` and their SSE deltas; Responses ``function_call`` items and the Responses event sequence).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the JSON text the model writes


@dataclass
class ToolScript:
    """A scripted tool-calling model. Turn n of an episode (n = tool results already in the conversation) calls
    ``calls[n]``; once every call has its result it answers ``final`` formatted with ``outputs`` (the results, in
    order, joined by ", "), so a test sees that the client really ran its tools and sent the results back."""

    calls: list[ToolCall]
    final: str = "done: {outputs}"
    pieces: int = 3  # a call's arguments are streamed in this many deltas

    def turn(self, outputs: list[str]) -> ToolCall | str:
        if len(outputs) < len(self.calls):
            return self.calls[len(outputs)]
        return self.final.format(outputs=", ".join(outputs))


def _split(text: str, n: int) -> list[str]:
    """``text`` in ``n`` pieces (fewer when it is shorter), for streamed deltas."""
    size = max(1, -(-len(text) // max(n, 1)))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def tool_outputs(req: dict[str, Any]) -> list[str]:
    """The tool results a request's conversation carries, in order (chat ``tool`` messages, Responses
    ``function_call_output`` items)."""
    if isinstance(req.get("messages"), list):
        return [_text(m.get("content")) for m in req["messages"] if isinstance(m, dict) and m.get("role") == "tool"]
    inp = req.get("input")
    if isinstance(inp, list):
        return [_text(i.get("output")) for i in inp if isinstance(i, dict) and i.get("type") == "function_call_output"]
    return []


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# -- chat completions ---------------------------------------------------------------------------------------------
def chat_tool_call(call: ToolCall, n: int) -> dict[str, Any]:
    return {"id": f"call_{n}", "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_events(req: dict[str, Any], step: ToolCall | str, n: int, pieces: int) -> list[bytes]:
    """A scripted chat turn as SSE events: the tool call's deltas (name first, then the arguments in pieces), or the
    answer's content deltas; then ``[DONE]``."""
    base = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": 0, "model": req.get("model")}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    if isinstance(step, ToolCall):
        head = {"index": 0, "id": f"call_{n}", "type": "function", "function": {"name": step.name, "arguments": ""}}
        out = [chunk({"role": "assistant", "content": None, "tool_calls": [head]})]
        out += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in _split(step.arguments, pieces)
        ]
        out.append(chunk({}, "tool_calls"))
    else:
        out = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"content": p}) for p in _split(step, pieces)]
        out.append(chunk({}, "stop"))
    return [*out, sse("[DONE]")]


def chat_json(req: dict[str, Any], step: ToolCall | str, n: int) -> dict[str, Any]:
    if isinstance(step, ToolCall):
        msg: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [chat_tool_call(step, n)]}
        finish = "tool_calls"
    else:
        msg, finish = {"role": "assistant", "content": step}, "stop"
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": req.get("model"),
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}  # fmt: skip


# -- responses ----------------------------------------------------------------------------------------------------
def response_item(step: ToolCall | str, n: int) -> dict[str, Any]:
    if isinstance(step, ToolCall):
        return {"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}", "name": step.name,
                "arguments": step.arguments, "status": "completed"}  # fmt: skip
    part = {"type": "output_text", "text": step, "annotations": [], "logprobs": []}
    return {"type": "message", "id": f"msg_{n}", "role": "assistant", "status": "completed", "content": [part]}


def response_object(req: dict[str, Any], output: list[dict[str, Any]], n: int, done: bool) -> dict[str, Any]:
    usage = {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 4}  # fmt: skip
    return {
        "id": f"resp_{n}", "object": "response", "created_at": 0, "model": req.get("model"),
        "status": "completed" if done else "in_progress", "output": output, "instructions": req.get("instructions"),
        "tools": req.get("tools", []), "tool_choice": req.get("tool_choice", "auto"),
        "parallel_tool_calls": req.get("parallel_tool_calls", True), "store": req.get("store", False),
        "temperature": req.get("temperature"), "top_p": req.get("top_p"), "error": None,
        "incomplete_details": None, "metadata": {}, "usage": usage if done else None,
    }  # fmt: skip


def responses_events(req: dict[str, Any], step: ToolCall | str, n: int, pieces: int) -> list[bytes]:
    """One output item as the Responses API streams it: created, in_progress, output_item.added, the argument (or
    text) deltas and their done events, output_item.done, completed; numbered by ``sequence_number``."""
    out: list[bytes] = []

    def emit(kind: str, **data: Any) -> None:
        out.append(sse({"type": kind, "sequence_number": len(out), **data}, kind))

    item = response_item(step, n)
    emit("response.created", response=response_object(req, [], n, False))
    emit("response.in_progress", response=response_object(req, [], n, False))
    ids = {"item_id": item["id"], "output_index": 0}
    if isinstance(step, ToolCall):
        emit("response.output_item.added", output_index=0, item={**item, "arguments": "", "status": "in_progress"})
        for p in _split(step.arguments, pieces):
            emit("response.function_call_arguments.delta", **ids, delta=p)
        emit("response.function_call_arguments.done", **ids, name=step.name, arguments=step.arguments)
    else:
        emit("response.output_item.added", output_index=0, item={**item, "content": [], "status": "in_progress"})
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        emit("response.content_part.added", **ids, content_index=0, part=empty)
        for p in _split(step, pieces):
            emit("response.output_text.delta", **ids, content_index=0, delta=p, logprobs=[])
        emit("response.output_text.done", **ids, content_index=0, text=step, logprobs=[])
        emit("response.content_part.done", **ids, content_index=0, part=item["content"][0])
    emit("response.output_item.done", output_index=0, item=item)
    emit("response.completed", response=response_object(req, [item], n, True))
    return out


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
        script: ToolScript | None = None,
    ) -> None:
        self.mode, self.delay, self.chunks, self.name, self.api_key = mode, delay, chunks, name, api_key
        self.pause = pause  # seconds between the first and the second event of a stream
        self.script = script
        self.received: list[dict[str, Any]] = []
        self.received_headers: list[dict[str, str]] = []
        self.received_paths: list[str] = []
        self.sent_streams: list[bytes] = []  # the SSE bytes of each stream, as written (without chunked framing)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._turns = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FakeUpstream:
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"fake-upstream-{self.name}")
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, sock=sock, backlog=1024))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def stop(self) -> None:
        """Close the listener and every open connection, then end the loop and free its descriptors.

        Why all of it: a test session starts hundreds of fakes; a loop left running keeps its epoll and wake-up
        pipe (and any kept-alive connection) open, and the test process runs out of descriptors below 1024 that
        ``select()`` can watch.
        """
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return

        async def shutdown() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

        # a handler stuck past 10 s must not keep the loop (and its descriptors) alive: stop it anyway
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

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
        self.received_paths.append(path)
        mode = self.mode
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if mode == "close":
            return False
        if mode == "error":
            await self._send(w, 500, json.dumps({"error": {"message": "injected failure"}}).encode())
            return True
        api = "responses" if path.endswith("/responses") else "chat" if path.endswith("/chat/completions") else "text"
        step: ToolCall | str
        if self.script is not None and req.get("tools"):
            step = self.script.turn(tool_outputs(req))
            pieces = self.script.pieces
        else:
            step, pieces = f"answer from {self.name}", self.chunks
        self._turns += 1
        n = self._turns
        if req.get("stream"):
            if api == "responses":
                events = responses_events(req, step, n, pieces)
            elif self.script is not None and req.get("tools"):
                events = chat_events(req, step, n, pieces)
            else:
                events = [*self._token_events(req, api == "chat"), sse("[DONE]")]
            await self._stream(w, events, mode)
            return False
        if api == "responses":
            resp = response_object(req, [response_item(step, n)], n, True)
        elif api == "chat":
            resp = chat_json(req, step, n)
        else:
            resp = {"id": "x", "object": "text_completion", "created": 0, "model": req.get("model"),
                    "choices": [{"index": 0, "text": step, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}  # fmt: skip
        await self._send(w, 200, json.dumps(resp).encode())
        return True

    def _token_events(self, req: dict[str, Any], chat: bool) -> list[bytes]:
        """The plain stream: ``chunks`` events of one token each (``tok0 ``, ``tok1 `` ...)."""
        out = []
        for i in range(self.chunks):
            delta = {"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "}
            event = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": 0, "model": req.get("model"),
                     "choices": [{"index": 0, **delta, "finish_reason": None}]}  # fmt: skip
            out.append(sse(event))
        return out

    async def _stream(self, w: asyncio.StreamWriter, events: list[bytes], mode: str) -> None:
        """Write the events as a chunked SSE response; the ``die_*`` modes break off at the third event."""
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n"
        )
        sent = bytearray()
        try:
            for i, event in enumerate(events):
                if mode in ("die_midstream", "die_mid_event") and i == 2:
                    if mode == "die_mid_event":
                        half = event[: len(event) // 2]
                        self._chunk(w, half)
                        sent += half
                    await w.drain()
                    return
                self._chunk(w, event)
                sent += event
                await w.drain()
                if i == 0 and self.pause:
                    await asyncio.sleep(self.pause)
            w.write(b"0\r\n\r\n")
            await w.drain()
        finally:
            self.sent_streams.append(bytes(sent))

    @staticmethod
    def _chunk(w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    @staticmethod
    async def _send(w: asyncio.StreamWriter, status: int, body: bytes) -> None:
        reason = {200: "OK", 401: "Unauthorized", 500: "Internal Server Error"}.get(status, "X")
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        w.write(head.encode() + body)
        await w.drain()
