"""Multi-turn agent episodes: the evaluator kind of the benchmark skills (``humaneval``, ``agentbench_os``,
``agentbench_db``).

A task is *data plus an environment plus a checker*, as in AgentBench: :class:`EpisodeTask` subclasses give the
items, the opening conversation of an item, how a model's turn parses into an :class:`Action`, the environment
that executes actions and answers with observations, the grader, and the reference solution's actions.

The loop (:func:`run_episodes`) is the same for every kind: the model sees the task, emits an action, the
environment executes it and returns an observation (truncated to ``observation_chars``), until the model
answers, finishes, gives up (an action that cannot be parsed: scored, never raised) or hits ``max_turns``; then
the episode is graded. **All live episodes advance one turn per engine call**: one batched
``generate_chat`` per turn for the whole evaluation, so throughput stays close to a single-turn batch, and the
environments of a turn are stepped in parallel threads (they are sandbox processes; the GIL is not held while
they run). A single-turn benchmark (HumanEval) is the one-turn case.

Who answers a turn is a *policy*: an engine (:func:`engine_policy`), or a script of actions
(:func:`scripted_policy`: ``--answers`` files, the gold replay, the sandbox-bound benchmark). The gold replay
also gives the fine-tuning data: each train item's reference actions are run through the real environment, so
the observations in a gold trajectory are what the environment really answered.

Splits come from a stable hash of the benchmark's own task id (the world's fractions), so an item keeps its
split however the benchmark file is ordered.
"""

from __future__ import annotations

import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from evolve.evaluators.base import SPLITS, Evaluator, EvaluatorError, Item, Split, TaskResult, check_split, split_of

Message = dict[str, str]
"""One chat turn, ``{"role": "system" | "user" | "assistant", "content": ...}``, as OpenAI's API has it."""

ActionKind = Literal["act", "answer", "finish", "invalid"]
Status = Literal["answered", "finished", "turn_limit", "invalid", "error"]


@dataclass(frozen=True)
class EpisodeItem:
    """One benchmark task: its own stable id, the task as a user states it, and what environment and checker need."""

    id: str
    prompt: str
    data: Mapping[str, Any] = field(repr=False, hash=False, compare=False)


@dataclass(frozen=True)
class Action:
    """A parsed model turn. ``act``: execute ``content`` (a command, a query, a program); ``answer``: the final
    answer ``content``; ``finish``: done, the environment's state is the answer; ``invalid``: no action could be
    read (``content`` says why); the episode ends and is graded as it stands."""

    kind: ActionKind
    content: str = ""


class Environment(Protocol):
    """What an episode's actions run in (a fresh SQLite database, an OS sandbox ...). One per episode."""

    def step(self, action: Action) -> str:
        """Execute an ``act`` action; return the observation (the loop truncates it)."""
        ...

    def close(self) -> None:
        """Release everything the episode holds (processes, temp files); idempotent."""
        ...


@dataclass
class Transcript:
    """One episode as it happened: the whole conversation, how it ended, the final answer and its score."""

    item_id: str
    messages: list[Message]
    status: Status = "turn_limit"
    answer: str | None = None
    score: float = 0.0
    turns: int = 0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "score": self.score,
            "status": self.status,
            "turns": self.turns,
            "answer": self.answer,
            "error": self.error,
            "messages": self.messages,
        }


class ChatGenerator(Protocol):
    """What an episode needs from an engine: greedy replies to whole conversations, cut at ``stop`` strings."""

    def generate_chat(
        self, conversations: Sequence[Sequence[Message]], *, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]: ...


#: A policy answers the live episodes of a turn: ``policy(indices, conversations)`` -> one reply each, where
#: ``indices`` are the episodes' positions in the evaluation (a script needs them; an engine does not).
Policy = Callable[[Sequence[int], Sequence[Sequence[Message]]], list[str]]


def truncate(text: str, limit: int) -> str:
    """An observation cut to ``limit`` characters, saying how much was dropped (the model should know)."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[truncated: {len(text) - limit} more characters]"


@dataclass
class _Live:
    index: int
    item: EpisodeItem
    transcript: Transcript
    env: Environment | None = None
    final: Action | None = None


class EpisodeTask(Evaluator):
    """A multi-turn skill. Subclasses define the data, the conversation, the action format, the environment and
    the checker; this class gives splits, batched episodes, transcripts, replay of scripted actions and gold
    trajectories."""

    name: str
    #: Turns the model gets before the episode is cut off and graded as it stands.
    max_turns: int = 5
    #: Token budget of one model turn.
    max_new_tokens: int = 256
    #: Characters of an observation the model is shown.
    observation_chars: int = 800
    #: Strings that end a model turn (the turn is cut before them).
    stop: tuple[str, ...] = ()
    #: Environments stepped at once within a turn.
    workers: int = 4

    def __init__(self) -> None:
        self._pools: dict[Split, list[EpisodeItem]] | None = None
        self.last_transcripts: list[Transcript] = []
        self.last_timings: dict[str, float] = {}

    # -- what each benchmark defines -----------------------------------------------------------------------
    @abstractmethod
    def load_items(self) -> list[EpisodeItem]:
        """Every usable item of the benchmark (items excluded by the gold control are not among them)."""

    @abstractmethod
    def messages(self, item: EpisodeItem) -> list[Message]:
        """The conversation the model is given before its first turn."""

    @abstractmethod
    def parse(self, item: EpisodeItem, reply: str) -> Action:
        """Read one model turn; never raises (an unreadable turn is ``Action("invalid", reason)``)."""

    @abstractmethod
    def open(self, item: EpisodeItem) -> Environment:
        """A fresh environment for one episode (may raise :class:`EvaluatorError` when it cannot be built)."""

    @abstractmethod
    def grade(self, item: EpisodeItem, env: Environment, final: Action | None) -> float:
        """Score the episode, 0..1, from the final action and the environment's state; never raises."""

    @abstractmethod
    def gold(self, item: EpisodeItem) -> list[str]:
        """The reference solution as the assistant turns a perfect agent would emit, in the action format."""

    def excluded(self) -> dict[str, str]:
        """Benchmark items left out of every split, with the reason (e.g. a gold control that fails here)."""
        return {}

    def observe(self, item: EpisodeItem, action: Action, observation: str) -> Message:
        """The user turn that carries an observation back to the model (benchmarks phrase it their way)."""
        return {"role": "user", "content": truncate(observation, self.observation_chars)}

    # -- splits ----------------------------------------------------------------------------------------------
    def pool(self, split: Split) -> list[EpisodeItem]:
        if self._pools is None:
            pools: dict[Split, list[EpisodeItem]] = {s: [] for s in SPLITS}
            for item in self.load_items():
                pools[split_of(f"{self.name}|{item.id}")].append(item)
            self._pools = pools
        return self._pools[check_split(split)]

    def split_size(self, split: Split) -> int:
        return len(self.pool(split))

    def episode_items(self, split: Split, n: int, *, seed: int = 0) -> list[EpisodeItem]:
        """Up to ``n`` items of ``split``: all of them (benchmark order) when ``n`` covers the split, else a seeded
        sample, the same for every model scored with the same arguments."""
        pool = self.pool(split)
        if not pool:
            raise EvaluatorError(f"skill {self.name!r}: the {split} split is empty")
        if n >= len(pool):
            return list(pool)
        idx = sorted(random.Random(f"{self.name}:{split}:{seed}").sample(range(len(pool)), n))
        return [pool[i] for i in idx]

    def items(self, split: Split, n: int, *, seed: int = 0, levels: Sequence[int] | None = None) -> list[Item]:
        """Single-turn view (prompt, first gold turn) for code that wants items; fine-tuning uses
        :meth:`gold_conversations`, which keeps every turn."""
        return [
            Item(self.name, "episode", (e.id,), 1, e.prompt, (self.gold(e) or [""])[0])
            for e in self.episode_items(split, n, seed=seed)
        ]

    def exemplars(self, split: Split, n: int, *, seed: int = 0) -> list[str]:
        """What the router's classifier will read of an episode: its first user message (the router keys a
        conversation's skill and its session on it, so every turn classifies alike). For benchmarks whose
        opening is a shared instruction (AgentBench's), that is the instruction, and it identifies the skill."""
        try:
            items = self.episode_items(split, n, seed=seed)
        except EvaluatorError:
            return []
        return [next((m["content"] for m in self.messages(e) if m["role"] == "user"), e.prompt) for e in items]

    def by_id(self) -> dict[str, EpisodeItem]:
        return {e.id: e for s in SPLITS for e in self.pool(s)}

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, engine: Any, split: Split, limit: int, *, seed: int = 0) -> TaskResult:
        """Run ``limit`` episodes of ``split`` on whatever ``engine`` holds; transcripts in ``last_transcripts``."""
        items = self.episode_items(split, limit, seed=seed)
        transcripts = self.run(items, engine_policy(engine, self))
        return result_of(self.name, split, transcripts)

    def run(self, items: Sequence[EpisodeItem], policy: Policy) -> list[Transcript]:
        """Episodes of ``items`` under ``policy``; see :func:`run_episodes`. Seconds per phase of the last run
        are in ``last_timings`` (what ``benchmarks/bench_episodes.py`` reports)."""
        self.last_timings = {}
        self.last_transcripts = run_episodes(self, items, policy, self.last_timings)
        return self.last_transcripts

    def replay(self, items: Sequence[EpisodeItem], actions: Sequence[Sequence[str]]) -> list[Transcript]:
        """Episodes whose turns are given (an answers file)."""
        return self.run(items, scripted_policy(actions))

    def gold_policy(self, items: Sequence[EpisodeItem]) -> Policy:
        """The reference solution as a policy: its turns as :meth:`gold` gives them. A benchmark whose final
        answer depends on what the environment printed (AgentBench OS: the example script's output) overrides
        this to read it from the observation."""
        return scripted_policy([self.gold(i) for i in items])

    def replay_gold(self, items: Sequence[EpisodeItem]) -> list[Transcript]:
        """The gold control: every item's reference solution run through its real environment."""
        return self.run(items, self.gold_policy(items))

    def gold_conversations(self, split: Split, n: int, *, seed: int = 0) -> list[list[Message]]:
        """Gold trajectories of ``n`` items of ``split`` for fine-tuning: the reference actions run through the
        real environment, kept only where the episode then scores 1 (a trajectory that fails teaches nothing)."""
        return [t.messages for t in self.replay_gold(self.episode_items(split, n, seed=seed)) if t.score >= 1.0]


def result_of(name: str, split: Split, transcripts: Sequence[Transcript]) -> TaskResult:
    return TaskResult(
        name,
        split,
        [t.score for t in transcripts],
        [t.answer or "" for t in transcripts],
        transcripts=list(transcripts),
    )


def engine_policy(engine: Any, task: EpisodeTask) -> Policy:
    """Every live episode's next turn from one batched engine call (chat format, the tokenizer's template)."""
    if not callable(getattr(engine, "generate_chat", None)):
        raise EvaluatorError(
            f"skill {task.name!r} runs multi-turn episodes: the engine ({type(engine).__name__}) has no "
            "generate_chat(conversations, max_new_tokens=..., stop=...)"
        )

    def policy(indices: Sequence[int], conversations: Sequence[Sequence[Message]]) -> list[str]:
        return engine.generate_chat(conversations, max_new_tokens=task.max_new_tokens, stop=task.stop)

    return policy


def scripted_policy(actions: Sequence[Sequence[str]]) -> Policy:
    """Turns given in advance, per episode; an episode whose script is used up gives up (an empty turn).

    The turn is counted per episode by the policy itself (each live episode is asked once per turn), not read
    from the conversation, whose opening may hold assistant turns of its own (AgentBench's one-shot examples)."""
    asked: dict[int, int] = {}

    def policy(indices: Sequence[int], conversations: Sequence[Sequence[Message]]) -> list[str]:
        out = []
        for i in indices:
            turn = asked.get(i, 0)
            asked[i] = turn + 1
            script = actions[i]
            out.append(script[turn] if turn < len(script) else "")
        return out

    return policy


def run_episodes(
    task: EpisodeTask, items: Sequence[EpisodeItem], policy: Policy, timings: dict[str, float] | None = None
) -> list[Transcript]:
    """Run one episode per item, all live episodes advancing one turn per policy call; never raises because of
    what a model says. Environments are opened lazily and always closed. ``timings``, when given, accumulates
    seconds per phase: ``setup`` (opening and closing environments), ``generation`` (the policy), ``environment``
    (executing actions) and ``grading``."""
    clock = timings if timings is not None else {}
    live = [_Live(i, item, Transcript(item.id, [dict(m) for m in task.messages(item)])) for i, item in enumerate(items)]
    pool = ThreadPoolExecutor(max_workers=max(1, task.workers))
    try:
        with _timed(clock, "setup"):
            _map(pool, lambda ep: _open(task, ep), live)
        active = [ep for ep in live if ep.transcript.status != "error"]
        for _turn in range(task.max_turns):
            if not active:
                break
            with _timed(clock, "generation"):
                replies = policy([ep.index for ep in active], [ep.transcript.messages for ep in active])
            if len(replies) != len(active):
                raise RuntimeError(f"policy gave {len(replies)} replies for {len(active)} episodes")
            stepping = []
            for ep, reply in zip(active, replies, strict=True):
                ep.transcript.messages.append({"role": "assistant", "content": reply})
                ep.transcript.turns += 1
                action = task.parse(ep.item, reply)
                if action.kind == "act":
                    stepping.append((ep, action))
                else:
                    ep.final = action
                    ep.transcript.status = {"answer": "answered", "finish": "finished", "invalid": "invalid"}[
                        action.kind
                    ]  # type: ignore[assignment]
                    ep.transcript.answer = action.content if action.kind == "answer" else None
                    if action.kind == "invalid":
                        ep.transcript.error = action.content
            with _timed(clock, "environment"):
                _map(pool, lambda pair: _step(task, *pair), stepping)
            active = [ep for ep, _ in stepping if ep.transcript.status != "error"]
        with _timed(clock, "grading"):
            _map(pool, lambda ep: _grade(task, ep), live)
    finally:
        with _timed(clock, "setup"):
            _map(pool, _close, live)
        pool.shutdown(wait=True)
    return [ep.transcript for ep in live]


@contextmanager
def _timed(clock: dict[str, float], phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        clock[phase] = clock.get(phase, 0.0) + time.perf_counter() - t0


def _map(pool: ThreadPoolExecutor, fn: Callable[[Any], None], xs: Iterable[Any]) -> None:
    for _ in pool.map(fn, xs):
        pass


def _open(task: EpisodeTask, ep: _Live) -> None:
    try:
        ep.env = task.open(ep.item)
    except EvaluatorError:
        raise  # the benchmark cannot run here at all (e.g. no sandbox): the user must know
    except Exception as exc:  # one item's environment failed to build: that episode scores 0
        ep.transcript.status = "error"
        ep.transcript.error = f"environment: {type(exc).__name__}: {exc}"


def _step(task: EpisodeTask, ep: _Live, action: Action) -> None:
    assert ep.env is not None
    try:
        observation = ep.env.step(action)
    except Exception as exc:  # an environment that breaks on an action: the model is told, as a shell would
        observation = f"error: {type(exc).__name__}: {exc}"
    ep.transcript.messages.append(task.observe(ep.item, action, observation))


def _grade(task: EpisodeTask, ep: _Live) -> None:
    if ep.env is None:
        ep.transcript.score = 0.0
        return
    try:
        ep.transcript.score = float(min(1.0, max(0.0, task.grade(ep.item, ep.env, ep.final))))
    except Exception as exc:  # a grader never raises: it scores
        ep.transcript.score = 0.0
        ep.transcript.error = ep.transcript.error or f"grader: {type(exc).__name__}: {exc}"


def _close(ep: _Live) -> None:
    if ep.env is not None:
        try:
            ep.env.close()
        except Exception:  # noqa: S110 - closing is best effort; the sandbox's own teardown is the backstop
            pass
