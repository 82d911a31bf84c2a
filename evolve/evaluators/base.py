"""The evaluator interface every skill implements (world, jsonl, lm_eval, plugins), and the world's task base.

An :class:`Evaluator` gives items per split, batched scoring of whatever an engine holds (per-item scores, mean
= quality) and exemplar prompts (for fine-tuning and for the router's classifier). Splits: ``train``
(fine-tuning), ``calibration`` (the scores the router is told: selection never saw them, so they are not
inflated by the winner's curse), ``validation`` (what evolution selects on) and ``test`` (every reported
number).

A world skill is a seeded generator of :class:`Item` objects plus a grader. Splits are assigned from a hash of
an item's *parameters* (template and its constants, never the phrasing), so no test item's parameters can
appear in training, however the generator is seeded.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from cycleqd.errors import UserError

Split = Literal["train", "calibration", "validation", "test"]
#: In the order of :func:`split_of`'s cumulative fractions.
SPLITS: tuple[Split, ...] = ("train", "calibration", "validation", "test")

#: Fraction of the hash space in each split, taken cumulatively in ``SPLITS`` order. Calibration was carved out
#: of the end of train (train was 0.7), so validation ([0.7, 0.85)) and test ([0.85, 1)) hold exactly the items
#: they held before calibration existed (tested), and run directories made before stay comparable.
SPLIT_FRACTIONS: dict[Split, float] = {"train": 0.6, "calibration": 0.1, "validation": 0.15, "test": 0.15}

#: The prompt suffix that every model in this project answers after. Kept in one place because the tokenizer's
#: chat template, the trainer and every engine must agree on it.
ANSWER_CUE = "\nAnswer:"


@dataclass(frozen=True)
class Item:
    """One task instance: the prompt a model sees, a gold answer and what the grader needs to score."""

    skill: str
    template: str
    params: tuple
    level: int
    prompt: str
    answer: str

    @property
    def key(self) -> str:
        """Identity of the item's parameters; the phrasing is deliberately not part of it."""
        return f"{self.skill}|{self.template}|{self.params!r}"


@dataclass(frozen=True)
class TaskResult:
    """Scores of one engine on one split of one skill. ``quality`` is the mean score (0..1)."""

    skill: str
    split: Split
    scores: list[float]
    answers: list[str] = field(repr=False)
    #: Episode skills: each item's whole conversation (``evolve.evaluators.episodes.Transcript``).
    transcripts: list | None = field(default=None, repr=False)

    @property
    def quality(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


class Generator(Protocol):
    """What a skill task needs from an engine: greedy completions for a batch of prompts."""

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, chat: bool = False) -> list[str]: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first of the ``stop`` strings (excluded), as vLLM and OpenAI's API cut a completion."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class EvaluatorError(UserError, ValueError):
    """A skill that cannot be built or read; the message names the file and line, or the config field."""


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split  # type: ignore[return-value]


class Evaluator(ABC):
    """A skill: what every kind (world, jsonl, lm_eval, a plugin) gives evolution, serving and the router.

    Implementations must be deterministic for a seed (the same items for every model scored with the same
    arguments, so scores compare, and a resumed run continues exactly) and must never raise on a model's
    answer: a grader scores.
    """

    name: str

    @abstractmethod
    def evaluate(self, engine: Generator, split: Split, limit: int, *, seed: int = 0) -> TaskResult:
        """Score whatever ``engine`` holds on ``limit`` items of ``split`` (fewer if the split is smaller)."""

    @abstractmethod
    def exemplars(self, split: Split, n: int, *, seed: int = 0) -> list[str]:
        """Up to ``n`` prompts of ``split`` as a user would send them (the router's classifier learns from them)."""

    def items(self, split: Split, n: int, *, seed: int = 0, levels: Sequence[int] | None = None) -> list[Item]:
        """Prompt/answer items for fine-tuning; kinds without gold answers (e.g. lm_eval) do not give them."""
        raise NotImplementedError(f"skill {self.name!r} ({type(self).__name__}) has no items with gold answers")


def split_of(key: str) -> Split:
    """Deterministic split of an item from its parameter key (stable across Python runs and machines)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_FRACTIONS[split]
        if h < edge:
            return split
    return SPLITS[-1]


@dataclass(frozen=True)
class Template:
    """A family of items: ``params`` enumerates its parameter space, ``render`` makes an item from one tuple."""

    name: str
    level: int
    phrasings: tuple[str, ...]


class SkillTask(Evaluator):
    """A world skill: a parameter space split four ways, phrasings, gold answers and an execution grader."""

    name: str
    #: Generous answer budget in tokens: the graders only need the first line.
    max_new_tokens: int = 48
    levels: tuple[int, ...] = (1, 2, 3)
    #: Chat format: the prompt goes through the engine's chat template as one user turn (instruction-tuned
    #: models); otherwise it is the raw ``prompt + ANSWER_CUE`` the embedded world's models were trained on.
    chat: bool = False

    def __init__(self) -> None:
        self._pools: dict[Split, dict[str, list[tuple]]] | None = None

    # -- what each skill defines ---------------------------------------------------------------------------
    @abstractmethod
    def templates(self) -> Sequence[Template]: ...

    @abstractmethod
    def parameter_space(self, template: Template) -> Iterator[tuple]: ...

    @abstractmethod
    def render(self, template: Template, params: tuple, phrasing: str) -> tuple[str, str]:
        """Return ``(prompt, gold_answer)`` for one parameter tuple and phrasing."""

    @abstractmethod
    def grade(self, items: Sequence[Item], answers: Sequence[str]) -> list[float]:
        """Score each answer against its item, 0..1. Must never raise on a model's answer."""

    # -- shared machinery ----------------------------------------------------------------------------------
    def _pool(self, split: Split) -> dict[str, list[tuple]]:
        """Parameter tuples of ``split``, per template (computed once per task object)."""
        if self._pools is None:
            pools: dict[Split, dict[str, list[tuple]]] = {s: {} for s in SPLITS}
            for t in self.templates():
                for params in self.parameter_space(t):
                    pools[split_of(f"{self.name}|{t.name}|{params!r}")].setdefault(t.name, []).append(params)
            self._pools = pools
        return self._pools[split]

    def items(self, split: Split, n: int, *, seed: int = 0, levels: Sequence[int] | None = None) -> list[Item]:
        """``n`` items of ``split`` drawn deterministically from ``seed``.

        The template is drawn uniformly first, so that templates with large parameter spaces do not crowd out
        the others; then the next parameter tuple of that template in a seeded shuffle (repeating only once the
        template's pool is used up). The phrasing comes from the same seeded stream.
        """
        check_split(split)
        wanted = set(levels) if levels is not None else set(self.levels)
        pool = self._pool(split)
        templates = [t for t in self.templates() if t.level in wanted and pool.get(t.name)]
        if not templates:
            raise ValueError(f"skill {self.name!r} has no {split} items at levels {sorted(wanted)}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        queues: dict[str, list[tuple]] = {}
        out: list[Item] = []
        for _ in range(n):
            t = rng.choice(templates)
            if not queues.get(t.name):
                queues[t.name] = pool[t.name][:]
                rng.shuffle(queues[t.name])
            params = queues[t.name].pop()
            prompt, answer = self.render(t, params, rng.choice(t.phrasings))
            out.append(Item(self.name, t.name, params, t.level, prompt, answer))
        return out

    def split_size(self, split: Split) -> int:
        """Number of distinct parameter tuples in ``split``."""
        return sum(len(v) for v in self._pool(split).values())

    def evaluate(self, engine: Generator, split: Split, limit: int, *, seed: int = 0) -> TaskResult:
        """Generate greedily for ``limit`` items of ``split`` and grade them by execution."""
        items = self.items(split, limit, seed=seed)
        prompts = [i.prompt if self.chat else format_prompt(i.prompt) for i in items]
        answers = engine.generate(prompts, max_new_tokens=self.max_new_tokens, chat=self.chat)
        return TaskResult(self.name, split, self.grade(items, answers), answers)

    def exemplars(self, split: Split, n: int, *, seed: int = 0) -> list[str]:
        return [i.prompt for i in self.items(split, n, seed=seed)]


def format_prompt(prompt: str) -> str:
    """The exact text a model is conditioned on (the tokenizer's chat template renders the same)."""
    return prompt + ANSWER_CUE


def first_line(answer: str) -> str:
    """The answer proper: models (and people) may add text after it; graders read the first non-empty line.

    Markdown fences and an echoed ``Answer:`` are stripped, since a chat model will often add them.
    """
    text = answer.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    for line in text.splitlines():
        line = line.strip().strip("`").strip()
        if line.lower().startswith("answer:"):
            line = line[7:].strip()
        if line:
            return line
    return ""
