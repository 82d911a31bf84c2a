"""What routing reads of a request's conversation: the text the classifier reads, and the key of the episode a
request belongs to. Both are computed from what an episode's first turn already has, so every turn of an agent's
episode gets the same text and the same key.

They read a body ``router.protocol`` has validated (plain JSON, as the client sent it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Responses request's conversation as chat-like messages (instructions first, as a system message); items
    that are not messages (function calls, their outputs, reasoning) are left out."""
    out: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    inp = body.get("input")
    if isinstance(inp, str):
        return [*out, {"role": "user", "content": inp}]
    for item in inp if isinstance(inp, list) else []:
        if isinstance(item, dict) and item.get("type", "message") == "message":
            out.append({"role": item.get("role"), "content": item.get("content")})
    return out


def request_text(body: dict[str, Any], kind: str | None = None) -> str:
    """The text the classifier reads: the conversation's first user message (stable over an episode's turns); for a
    Responses request with no user message, its instructions."""
    if kind == "responses":
        msgs = input_messages(body)
        first = next((m for m in msgs if m["role"] == "user"), msgs[0] if msgs else None)
        return content_text(first["content"]) if first else ""
    if "messages" in body:
        for msg in body["messages"]:
            if msg.get("role") == "user":
                return content_text(msg.get("content"))
        return content_text(body["messages"][0].get("content"))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else (prompt[0] if prompt and isinstance(prompt[0], str) else "")


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def conversation_key(body: dict[str, Any]) -> str | None:
    """The episode a chat belongs to, from what its first turn already has: every message up to and including the
    first user message (the system prompt and the task). Later turns only append (assistant replies, tool calls and
    results, more user messages), so turn 1 and every later turn hash alike and land on the same elite, on every
    replica. A chat with no user message, and a plain completion, have no key (they go by load).

    A Responses request is keyed the same way over its instructions (as a system message) and its input messages,
    so every turn of a Responses tool loop stays on one elite too. There a message's content may be a string on one
    turn and ``[{"type": "input_text", ...}]`` on the next (clients rebuild the input), so text-only content is keyed
    by its text; a string ``input`` is the user message it stands for."""
    if "input" in body and "messages" not in body:
        msgs: Any = [{"role": m["role"], "content": _plain(m["content"])} for m in input_messages(body)]
    else:
        msgs = body.get("messages")
    if not isinstance(msgs, list):
        return None
    for i, msg in enumerate(msgs):
        if isinstance(msg, dict) and msg.get("role") == "user":
            head = [[m.get("role"), m.get("content")] for m in msgs[: i + 1] if isinstance(m, dict)]
            return hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()
    return None


def _plain(content: Any) -> Any:
    """Text-only content as its text (parts joined as ``content_text`` joins them); anything else as it is."""
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return content_text(content)
    return content
