"""``jsonl`` skills: a user's local data, one ``{"prompt": ..., "answer": ..., ...}`` object per line, scored by a
named grader.

Splits come from separate files (``splits: {train: ..., validation: ...}``) or, for one file, from a stable
hash of each prompt with the world's fractions (train .6, calibration .1, validation .15, test .15), so an item
keeps its split however the file is reordered or grown.

Graders (all read the model's first line, as the world's do, except ``python``, which takes a ``def`` body too):

- ``exact``: equal to ``answer`` after trimming;
- ``normalised``: equal after lower-casing, dropping punctuation, articles and extra spaces (SQuAD's rule);
- ``regex``: ``answer`` is a regular expression the first line must match in full;
- ``numeric``: the first number of the first line equals ``answer`` within ``tolerance`` (relative);
- ``python``: the answer is a function (lambda, def or expression over ``args``, default ``["x"]``) run in the
  sandbox on the item's ``tests`` (``[{"input": [...], "output": ...}]``); an item without outputs gets them by
  running its gold ``answer`` in the sandbox too: gold answers are never executed in this process;
- ``sql``: the answer and the gold query run on ``database`` opened read-only (the world db grader's
  authorizer and step budget), result sets compared (in order when the gold query orders its rows);
- ``module:function``: ``function(answer: str, item: dict) -> float``, your own code.

A grader never raises: an answer that breaks it scores 0.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evolve.evaluators import sandbox
from evolve.evaluators.base import (
    SPLITS,
    Evaluator,
    EvaluatorError,
    Generator,
    Item,
    Split,
    TaskResult,
    check_split,
    first_line,
    split_of,
)
from evolve.evaluators.registry import JsonlSpec, import_object
from evolve.evaluators.world.code import extract_code
from evolve.evaluators.world.db import DbTask, _read_only


@dataclass(frozen=True)
class Record:
    """One line of the file: where it came from and the whole object (graders may read any field)."""

    prompt: str
    answer: str
    data: dict[str, Any] = field(repr=False, hash=False, compare=False)
    source: str = ""


def read_jsonl(path: Path, grader: str) -> list[Record]:
    """Parse ``path``; an unusable line is an error naming the file and the line."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluatorError(f"{path}: cannot read it ({exc})") from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluatorError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        if not isinstance(obj, dict):
            raise EvaluatorError(f"{where}: a JSON {type(obj).__name__}, expected an object with prompt and answer")
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise EvaluatorError(f'{where}: no "prompt" (a non-empty string); each line needs {{"prompt": ...}}')
        answer = obj.get("answer")
        if grader == "python":
            if not isinstance(obj.get("tests"), list) or not obj["tests"]:
                raise EvaluatorError(f'{where}: grader python needs "tests": [{{"input": [...], "output": ...}}]')
            if any(not isinstance(t, dict) or "input" not in t for t in obj["tests"]):
                raise EvaluatorError(f'{where}: every test needs "input" (a list of arguments)')
            if any("output" not in t for t in obj["tests"]) and not isinstance(answer, str):
                raise EvaluatorError(f'{where}: tests without "output" need a gold "answer" to compute them')
        elif answer is None or isinstance(answer, dict | list):
            raise EvaluatorError(f'{where}: no "answer" (a string or number) for grader {grader}')
        out.append(Record(obj["prompt"], "" if answer is None else str(answer), obj, f"{path}:{n}"))
    return out


def normalise_text(s: str) -> str:
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(s: str) -> float | None:
    m = _NUMBER.search(s)
    if not m:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


class _ReadOnlyDb:
    """A SQLite file opened read-only, with the world db grader's authorizer and step budget (its ``_run``)."""

    _run = DbTask._run

    def __init__(self, path: Path) -> None:
        try:
            self.conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, check_same_thread=False)
            self.conn.execute("PRAGMA query_only = ON")
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.Error as exc:
            raise EvaluatorError(f"database {path}: not a readable SQLite file ({exc})") from exc
        self.conn.set_authorizer(_read_only)

    def rows(self, sql: str) -> list[tuple] | None:
        return self._run(sql)  # type: ignore[arg-type]


class JsonlEvaluator(Evaluator):
    def __init__(self, name: str, spec: JsonlSpec) -> None:
        self.name = name
        self.spec = spec
        self.max_new_tokens = spec.max_new_tokens
        pools: dict[str, list[Record]] = {s: [] for s in SPLITS}
        self.files: dict[str, Path] = {}
        if spec.splits:
            for split, path in spec.splits.items():
                pools[split] = read_jsonl(path, spec.grader)
                self.files[split] = path
        else:
            assert spec.path is not None
            for rec in read_jsonl(spec.path, spec.grader):
                pools[split_of(rec.prompt)].append(rec)
            self.files = dict.fromkeys(SPLITS, spec.path)
        self.pools = pools
        self._db = _ReadOnlyDb(spec.database) if spec.grader == "sql" and spec.database else None
        self._custom: Callable[[str, dict], Any] | None = None
        if ":" in spec.grader:
            fn = import_object(spec.grader, f"skills.{name}.grader")
            if not callable(fn):
                raise EvaluatorError(f"skills.{name}.grader: {spec.grader} is not a function")
            self._custom = fn

    def records(self, split: Split, n: int, *, seed: int = 0) -> list[Record]:
        """Up to ``n`` records of ``split``: all of them in file order when ``n`` covers the split, else a seeded
        sample (the same for every model scored with the same arguments)."""
        pool = self.pools[check_split(split)]
        if not pool:
            where = self.files.get(split)
            raise EvaluatorError(
                f"skill {self.name!r}: the {split} split is empty"
                + (f" ({where} has no line hashed to it; add lines or give splits: files)" if where else "")
                + (f" (no {split} file in splits)" if not where else "")
            )
        if n >= len(pool):
            return list(pool)
        idx = sorted(random.Random(f"{self.name}:{split}:{seed}").sample(range(len(pool)), n))
        return [pool[i] for i in idx]

    def items(self, split: Split, n: int, *, seed: int = 0, levels: Sequence[int] | None = None) -> list[Item]:
        return [Item(self.name, "jsonl", (r.source,), 1, r.prompt, r.answer) for r in self.records(split, n, seed=seed)]

    def exemplars(self, split: Split, n: int, *, seed: int = 0) -> list[str]:
        try:
            return [r.prompt for r in self.records(split, n, seed=seed)]
        except EvaluatorError:
            return []

    def evaluate(self, engine: Generator, split: Split, limit: int, *, seed: int = 0) -> TaskResult:
        recs = self.records(split, limit, seed=seed)
        # chat: through the engine's chat template as one user turn (for the embedded models that renders exactly
        # ``prompt + ANSWER_CUE``); else the raw text.
        answers = engine.generate([r.prompt for r in recs], max_new_tokens=self.max_new_tokens, chat=self.spec.chat)
        return TaskResult(self.name, split, self.grade(recs, answers), answers)

    # -- graders -------------------------------------------------------------------------------------------
    def grade(self, recs: Sequence[Record], answers: Sequence[str]) -> list[float]:
        g = self.spec.grader
        if g == "python":
            return self._grade_python(recs, answers)
        out = []
        for rec, ans in zip(recs, answers, strict=True):
            try:
                out.append(float(self._grade_one(rec, ans)))
            except Exception:  # a grader never raises: the answer scores 0
                out.append(0.0)
        return out

    def _grade_one(self, rec: Record, answer: str) -> float:
        g, line = self.spec.grader, first_line(answer)
        if g == "exact":
            return float(line == rec.answer.strip())
        if g == "normalised":
            return float(normalise_text(line) == normalise_text(rec.answer))
        if g == "regex":
            return float(re.fullmatch(rec.answer, line) is not None)
        if g == "numeric":
            got, want = parse_number(line), parse_number(rec.answer)
            if got is None or want is None:
                return 0.0
            return float(abs(got - want) <= self.spec.tolerance * max(1.0, abs(want)))
        if g == "sql":
            assert self._db is not None
            want, got = self._db.rows(rec.answer.strip().rstrip(";")), self._db.rows(line.rstrip(";"))
            if want is None or got is None:
                return 0.0
            if re.search(r"\border\s+by\b", rec.answer, re.IGNORECASE):
                return float(got == want)
            return float(sorted(got, key=repr) == sorted(want, key=repr))
        assert self._custom is not None
        return min(1.0, max(0.0, float(self._custom(answer, rec.data))))

    def _grade_python(self, recs: Sequence[Record], answers: Sequence[str]) -> list[float]:
        jobs, gold_jobs, expected = [], [], []
        for rec, ans in zip(recs, answers, strict=True):
            argnames = tuple(rec.data.get("args") or ("x",))
            calls = tuple(tuple(t["input"]) for t in rec.data["tests"])
            jobs.append(sandbox.Job(extract_code(ans), argnames, calls))
            if all("output" in t for t in rec.data["tests"]):
                expected.append(tuple(repr(t["output"]) for t in rec.data["tests"]))
            else:  # the gold answer runs in the sandbox too, never here
                expected.append(None)
                gold_jobs.append(sandbox.Job(rec.answer, argnames, calls))
        gold = iter(sandbox.run(gold_jobs)) if gold_jobs else iter(())
        for i, e in enumerate(expected):
            if e is None:
                o = next(gold)
                expected[i] = o.outputs if o.ok else ("<gold answer failed>",)
        outcomes = sandbox.run(jobs)
        return [float(o.ok and o.outputs == e) for o, e in zip(outcomes, expected, strict=True)]
