"""``cycleqd-serve route-episodes``: held-out benchmark episodes run through the router as an agent runs them.

Each episode's turns go to the router's OpenAI API with the whole conversation so far (the official ``openai``
client, ``model: auto``, nothing else that an agent's SDK would not send); the environment executes each
returned action here, and the episode is graded exactly as evaluation grades it (the same
:class:`~evolve.evaluators.episodes.EpisodeTask`, only the policy differs). The first turn decides the elite;
the router's session affinity must keep every later turn on it, so the elite that answered each turn (the
``x-cycleqd-elite`` decision header) is recorded and episodes answered by more than one elite are counted.

The oracle is the best served elite per skill by its test score in the serving manifest (what ``cycleqd-evolve
report`` stored); with ``--per-skill`` at least the test split's size, the routed episodes are exactly the
items those test scores were measured on, so routed / oracle compares like with like.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from evolve.evaluators import EpisodeTask, Message, Policy, Transcript
from serve.manifest import ServingManifest


@dataclass
class RoutedSkill:
    """One skill's routed episodes: transcripts and, per episode, the elite of each turn."""

    skill: str
    transcripts: list[Transcript]
    elites: list[list[str]] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(t.score for t in self.transcripts) / len(self.transcripts) if self.transcripts else 0.0

    @property
    def split(self) -> int:
        """Episodes whose turns were answered by more than one elite (the goal is zero)."""
        return sum(len(set(e)) > 1 for e in self.elites)


def asker(client: Any, *, classifier_wait: float, notice: Callable[[str], None]) -> Callable[..., Any]:
    """One routed chat request; while a fresh router is still embedding its classifier's exemplars (503
    ``classifier_starting``) it waits as the Retry-After says, up to ``classifier_wait`` seconds in all. The
    notice is given once, however many requests are in flight."""
    import openai

    told = threading.Lock()

    def ask(messages: Sequence[Message], **params: Any) -> Any:
        deadline = time.monotonic() + classifier_wait
        while True:
            try:
                return client.chat.completions.with_raw_response.create(
                    model="auto", messages=list(messages), temperature=0, **params
                )
            except openai.APIStatusError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                code = body.get("code") or (body.get("error") or {}).get("code")
                if exc.status_code != 503 or code != "classifier_starting" or time.monotonic() > deadline:
                    raise
                if told.acquire(blocking=False):
                    notice("the router's classifier is still starting (embedding its exemplars); waiting for it")
                time.sleep(min(max(float(exc.response.headers.get("retry-after") or 2), 0.5), 10.0))

    return ask


def router_policy(
    task: EpisodeTask, ask: Callable[..., Any], pool: ThreadPoolExecutor, record: RoutedSkill, n: int
) -> Policy:
    """Every live episode's next turn from the router, sent concurrently (the engines batch them)."""
    record.elites = [[] for _ in range(n)]
    record.reasons = [[] for _ in range(n)]
    params: dict[str, Any] = {"max_tokens": task.max_new_tokens}
    if task.stop:
        params["stop"] = list(task.stop)[:4]  # OpenAI's API takes up to 4 stop sequences

    def one(index: int, conversation: Sequence[Message]) -> str:
        raw = ask(conversation, **params)
        record.elites[index].append(raw.headers.get("x-cycleqd-elite", "?"))
        record.reasons[index].append(raw.headers.get("x-cycleqd-reason", "?"))
        return raw.parse().choices[0].message.content or ""

    def policy(indices: Sequence[int], conversations: Sequence[Sequence[Message]]) -> list[str]:
        return list(pool.map(one, indices, conversations))

    return policy


def route_skill(task: EpisodeTask, items: Sequence[Any], ask: Callable[..., Any], concurrency: int) -> RoutedSkill:
    record = RoutedSkill(task.name, [])
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        record.transcripts = task.run(items, router_policy(task, ask, pool, record, len(items)))
    return record


def oracle(manifest: ServingManifest, skills: Sequence[str]) -> dict[str, float | None]:
    """Per skill, the best served elite's test score (None where the manifest has no test scores)."""
    out: dict[str, float | None] = {}
    for s in skills:
        scores = [e.test_scores[s] for e in manifest.elites if e.test_scores and s in e.test_scores]
        out[s] = max(scores) if scores else None
    return out
