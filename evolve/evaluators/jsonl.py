"""``jsonl`` skills: a user's local data, one ``{"prompt": ..., "answer": ..., ...}`` object per line, scored by a
named grader.

Splits come from separate files (``splits: {train: ..., validation: ...}``) or, for one file, from a stable
hash of each prompt with the world's fractions (train .6, calibration .1, validation .15, test .15), so an item
keeps its split however the file is reordered or grown.

Graders (all read the model's first line, as the world's do, except ``python`` and ``module:function``):

- ``exact``: equal to ``answer`` after trimming;
- ``normalised``: equal after lower-casing, dropping punctuation, articles and extra spaces (SQuAD's rule);
- ``regex``: ``answer`` is a regular expression the first line must match in full;
- ``numeric``: the first number of the first line equals ``answer`` within ``tolerance`` (relative);
- ``python``: the answer is a program (its fenced code block when it has one, else the whole text, trailing prose
  dropped) defining a function (the item's ``entry_point``, else the last ``def``), or a lambda, or an
  expression over ``args`` (default ``["x"]``); it is called on each of the item's ``tests``
  (``[{"input": [...], "output": ...}]``) and scores 1 when every output equals the expected one. JSON has no
  tuples, so a tuple equals a JSON list with equal elements (and a dict's keys compare as JSON writes them); a
  ``true`` is not a ``1``. An item without outputs gets them by running its gold ``answer`` the same way: gold
  answers are never executed in this process. Where the programs run is the ``sandbox`` option:

  - ``ast`` (default): the embedded world's restricted sandbox (``sandbox.py``: no imports, a short list of pure
    builtins, programs up to its ``MAX_CODE_CHARS``); ``typing``/``__future__`` imports and annotations are
    dropped first, since they do not change what a function computes;
  - ``os``: the OS sandbox (``os_sandbox.py``): real Python with the standard library, no network, programs up
    to :data:`MAX_PROGRAM_CHARS`, ``grader_seconds`` and ``grader_memory_mb`` per item.

- ``sql``: the answer and the gold query run on ``database`` opened read-only (the world db grader's
  authorizer and step budget), result sets compared (in order when the gold query orders its rows);
- ``module:function``: your own code, ``function(answer: str, item: dict) -> float`` (``answer`` is the model's
  whole answer, ``item`` the line's whole JSON object; the result is clamped to [0, 1]). It is imported and run in
  a worker process of its own (``_grader_worker.py``, one per batch of answers), never in the evolution process:
  it may import what it likes, read files, write temporary files and start processes, but it runs with the
  evolution process's working directory, environment and ``sys.path``, under an address-space limit
  (``grader_memory_mb``), CPU seconds and a wall clock per answer (``grader_seconds``), a 256 MiB file-size limit
  and no network (where the kernel allows a private network namespace; else sockets are refused). A grader that
  raises, returns something that is not a number, hangs or crashes its worker scores that answer 0 (the rest of
  the batch is graded by a fresh worker); one that cannot be imported is an error when the skill is built.

A grader never raises: an answer that breaks it scores 0, and :meth:`JsonlEvaluator.grade_with_reasons` says why.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
import selectors
import signal
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evolve.evaluators import sandbox
from evolve.evaluators._sandbox_worker import MAX_CODE_CHARS
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
from evolve.evaluators.specs import JsonlSpec
from evolve.evaluators.world.db import DbTask, _read_only

#: The longest program the ``python`` grader runs in the OS sandbox (``sandbox: os``); a longer answer scores 0.
MAX_PROGRAM_CHARS = 100_000


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
        self._custom: ModuleGrader | None = None
        if ":" in spec.grader:
            self._custom = ModuleGrader(spec.grader, _grader_limits(spec))
            self._custom.check(f"skills.{name}.grader")
        if spec.grader == "python" and spec.sandbox == "os":
            _check_os_sandbox(f"skills.{name}.sandbox")

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
        return [score for score, _ in self.grade_with_reasons(recs, answers)]

    def grade_with_reasons(self, recs: Sequence[Record], answers: Sequence[str]) -> list[tuple[float, str]]:
        """Each answer's score and, when it is below 1, why (empty when the grader gives no reason)."""
        g = self.spec.grader
        if g == "python":
            return self._grade_python(recs, answers)
        if self._custom is not None:
            return self._custom.grade([(a, r.data) for r, a in zip(recs, answers, strict=True)])
        out = []
        for rec, ans in zip(recs, answers, strict=True):
            try:
                out.append((float(self._grade_one(rec, ans)), ""))
            except Exception as exc:  # a grader never raises: the answer scores 0
                out.append((0.0, f"{type(exc).__name__}: {exc}"))
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
        assert g == "sql" and self._db is not None
        want, got = self._db.rows(rec.answer.strip().rstrip(";")), self._db.rows(line.rstrip(";"))
        if want is None or got is None:
            return 0.0
        if re.search(r"\border\s+by\b", rec.answer, re.IGNORECASE):
            return float(got == want)
        return float(sorted(got, key=repr) == sorted(want, key=repr))

    def _grade_python(self, recs: Sequence[Record], answers: Sequence[str]) -> list[tuple[float, str]]:
        os_box = self.spec.sandbox == "os"
        run = self._run_os if os_box else self._run_ast
        cap = MAX_PROGRAM_CHARS if os_box else MAX_CODE_CHARS
        jobs: list[_Program | None] = []
        why: list[str] = []
        gold_jobs: list[_Program] = []
        expected: list[Any] = []  # JSON outputs (a list), or None: the gold answer's outputs (repr strings)
        for rec, ans in zip(recs, answers, strict=True):
            argnames = tuple(rec.data.get("args") or ("x",))
            calls = tuple(tuple(t["input"]) for t in rec.data["tests"])
            entry = rec.data.get("entry_point") if isinstance(rec.data.get("entry_point"), str) else None
            code: str | None = None
            why_not = ""
            try:
                program = extract_program(ans)
                code = program if os_box or len(program) > cap else strip_typing(program)
            except Exception as exc:  # a grader never raises: an answer it cannot even read scores 0
                why_not = f"unreadable answer ({type(exc).__name__})"
            if code is None:
                jobs.append(None)
                why.append(why_not)
            elif len(code) > cap:
                jobs.append(None)
                why.append(
                    f"answer too long ({len(code)} characters; sandbox {self.spec.sandbox} runs at most {cap}"
                    + ("; sandbox: os runs longer programs)" if not os_box else ")")
                )
            else:
                jobs.append(_Program(code, argnames, calls, entry))
                why.append("")
            if all("output" in t for t in rec.data["tests"]):
                expected.append([t["output"] for t in rec.data["tests"]])
            else:  # the gold answer runs in the sandbox too, never here
                expected.append(None)
                gold = extract_program(rec.answer)
                gold_jobs.append(_Program(gold if os_box else strip_typing(gold), argnames, calls, entry))
        gold_out = iter(run(gold_jobs)) if gold_jobs else iter(())
        golds: list[sandbox.Outcome | None] = [next(gold_out) if e is None else None for e in expected]
        outcomes = iter(run([j for j in jobs if j is not None]))
        out: list[tuple[float, str]] = []
        for job, reason, want, gold_o in zip(jobs, why, expected, golds, strict=True):
            if job is None:
                out.append((0.0, reason))
                continue
            o = next(outcomes)
            if not o.ok:
                out.append((0.0, o.error or "the program failed"))
            elif gold_o is not None:
                if not gold_o.ok:
                    out.append((0.0, f"the gold answer failed: {gold_o.error}"))
                else:
                    out.append(_compare_reprs(o.outputs, gold_o.outputs, job.calls))
            else:
                out.append(_compare_json(o.outputs, want, job.calls))
        return out

    def _run_ast(self, programs: Sequence[_Program]) -> list[sandbox.Outcome]:
        return sandbox.run([sandbox.Job(_entry_last(p.code, p.entry), p.argnames, p.calls) for p in programs])

    def _run_os(self, programs: Sequence[_Program]) -> list[sandbox.Outcome]:
        if not programs:
            return []
        limits = _grader_limits(self.spec)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1, len(programs))) as pool:
            return list(pool.map(lambda p: _run_in_os_sandbox(p, limits), programs))


# -- the python grader -----------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_program(answer: str) -> str:
    """The program in an answer: its fenced code block when it has one (the first one tagged python, else the
    first one), else the whole text; an echoed ``Answer:`` and inline backticks are dropped, and so is trailing
    prose after code (``lambda x: x\nbecause ...``): lines from the first one Python cannot parse, when what
    comes before them parses."""
    text = answer.strip()
    blocks = _FENCE.findall(text)
    if blocks:
        tagged = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
        return (tagged or [code for _, code in blocks])[0].strip("\n").rstrip()
    if text[:7].lower() == "answer:":
        text = text[7:].strip()
    if "\n" not in text and len(text) > 1 and text[0] == text[-1] == "`":
        text = text.strip("`").strip()
    candidate = text
    for _ in range(20 if len(text) <= MAX_PROGRAM_CHARS else 0):  # bounded: each step drops at least one line
        try:
            ast.parse(candidate)
            return candidate
        except SyntaxError as exc:
            line = exc.lineno or 0
            if line <= 1:
                break
            candidate = "\n".join(candidate.splitlines()[: line - 1]).rstrip()
        except (ValueError, RecursionError, MemoryError):
            break
    return text


_TYPING_MODULES = {"typing", "typing_extensions", "__future__", "collections.abc"}


class _DropTyping(ast.NodeTransformer):
    changed = False

    def visit_Import(self, node: ast.Import) -> ast.AST | None:
        if all(a.name in _TYPING_MODULES for a in node.names):
            self.changed = True
            return None
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | None:
        if node.module in _TYPING_MODULES and not node.level:
            self.changed = True
            return None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self.changed |= node.returns is not None
        node.returns = None
        self.generic_visit(node)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        self.changed |= node.annotation is not None
        node.annotation = None
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        self.changed = True
        if node.value is None:  # a bare declaration: nothing (a pass keeps a body that held only it)
            return ast.copy_location(ast.Pass(), node)
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def strip_typing(code: str) -> str:
    """``code`` without ``typing``/``__future__`` imports and annotations (what the ``ast`` sandbox refuses or
    cannot resolve, and what does not change what a function computes); unchanged when it has none or does not
    parse (the sandbox reports the syntax error)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code
    drop = _DropTyping()
    new = ast.fix_missing_locations(drop.visit(tree))
    if not drop.changed:
        return code
    if not new.body:
        return ""
    return ast.unparse(new)


def _entry_last(code: str, entry: str | None) -> str:
    """The ``ast`` sandbox calls a program's last function: when the item names another one (``entry_point``),
    a last function that calls it is appended."""
    if not entry or not entry.isidentifier():
        return code
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    if entry not in names or names[-1] == entry:
        return code
    return f"{code}\n\n\ndef {entry}_entry_point(*args):\n    return {entry}(*args)\n"


@dataclass(frozen=True)
class _Program:
    code: str
    argnames: tuple[str, ...]
    calls: tuple[tuple, ...]
    entry: str | None = None


def _literal(text: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(text)
    except Exception:  # a repr that is no literal: no match
        return False, None


def _json_key(k: Any) -> str | None:
    """A dict key as ``json.dumps`` writes it (JSON's keys are strings)."""
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, bool | int | float):
        return json.dumps(k)
    return None


def same_as_json(got: Any, want: Any) -> bool:
    """``got`` (a Python value) equals ``want`` (a value read from JSON): a tuple or list equals a JSON list with
    equal elements, dict keys compare as JSON writes them, a bool only equals a bool, numbers compare by value."""
    if isinstance(want, bool):
        return isinstance(got, bool) and got == want
    if isinstance(want, int | float):
        return isinstance(got, int | float) and not isinstance(got, bool) and got == want
    if isinstance(want, list):
        return (
            isinstance(got, list | tuple)
            and len(got) == len(want)
            and all(same_as_json(g, w) for g, w in zip(got, want, strict=True))
        )
    if isinstance(want, dict):
        if not isinstance(got, dict) or len(got) != len(want):
            return False
        keyed = {_json_key(k): v for k, v in got.items()}
        return len(keyed) == len(want) and all(k in keyed and same_as_json(keyed[k], v) for k, v in want.items())
    if want is None:
        return got is None
    return type(got) is type(want) and got == want


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _compare_json(outputs: Sequence[str], want: Sequence[Any], calls: Sequence[tuple]) -> tuple[float, str]:
    if len(outputs) != len(want):
        return 0.0, f"{len(outputs)} outputs for {len(want)} tests"
    for text, w, call in zip(outputs, want, calls, strict=True):
        ok, value = _literal(text)
        if not (ok and same_as_json(value, w)):
            return 0.0, f"input {_short(repr(list(call)))}: got {_short(text)}, expected {_short(json.dumps(w))}"
    return 1.0, ""


def _compare_reprs(outputs: Sequence[str], gold: Sequence[str], calls: Sequence[tuple]) -> tuple[float, str]:
    for text, g, call in zip(outputs, gold, calls, strict=True):
        if text != g:
            return 0.0, f"input {_short(repr(list(call)))}: got {_short(text)}, the gold answer gives {_short(g)}"
    return (1.0, "") if len(outputs) == len(gold) else (0.0, f"{len(outputs)} outputs for {len(gold)} tests")


#: What runs a program in the OS sandbox: ``python3 harness.py``, the program and its calls in ``request.json``. Its
#: result is the last line that starts with the marker (the program's own prints go to stderr).
_HARNESS = r"""
import ast, json, os, sys

MARK = "@@cycleqd-result@@"
with open("request.json", encoding="utf-8") as f:
    req = json.load(f)
real_out = sys.stdout
sys.stdout = sys.stderr


def emit(result):
    real_out.write(MARK + json.dumps(result) + "\n")
    real_out.flush()


def build(code, argnames, entry):
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        tree = None
    if tree is not None:
        if not isinstance(tree.body, ast.Lambda):
            tree = ast.parse("lambda %s: (%s)" % (", ".join(argnames), code), mode="eval")
        return eval(compile(tree, "answer.py", "eval"), {"__name__": "solution"})
    tree = ast.parse(code, "answer.py", "exec")
    ns = {"__name__": "solution"}
    exec(compile(tree, "answer.py", "exec"), ns)
    if entry:
        if not callable(ns.get(entry)):
            raise NameError("the program defines no function %r" % entry)
        return ns[entry]
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not names:
        raise NameError("no function, lambda or expression found")
    return ns[names[-1]]


def main():
    try:
        fn = build(req["code"], req["argnames"], req["entry"])
    except BaseException as exc:
        return emit({"ok": False, "error": ("%s: %s" % (type(exc).__name__, exc))[:300]})
    outputs = []
    for call in req["calls"]:
        try:
            text = repr(fn(*call))
        except BaseException as exc:
            return emit({"ok": False, "error": ("input %r: %s: %s" % (call, type(exc).__name__, exc))[:300]})
        if len(text) > req["max_output"]:
            return emit({"ok": False, "error": "output too large"})
        outputs.append(text)
    emit({"ok": True, "outputs": outputs})


main()
sys.stdout.flush()
os._exit(0)
"""
_MARK = "@@cycleqd-result@@"


def _check_os_sandbox(field: str) -> None:
    try:
        from evolve.evaluators import os_sandbox
    except ImportError as exc:
        raise EvaluatorError(f"{field}: os needs the OS sandbox (evolve.evaluators.os_sandbox): {exc}") from exc
    why = os_sandbox.available()
    if why:
        raise EvaluatorError(f"{field}: the OS sandbox cannot run here ({why}); use sandbox: ast")


def _run_in_os_sandbox(p: _Program, limits: GraderLimits) -> sandbox.Outcome:
    from evolve.evaluators import os_sandbox

    request = {"code": p.code, "argnames": list(p.argnames), "calls": [list(c) for c in p.calls],
               "entry": p.entry, "max_output": 10_000}  # fmt: skip
    try:
        res = os_sandbox.run(
            ["python3", "harness.py"],
            files={"harness.py": _HARNESS, "request.json": json.dumps(request)},
            limits=_os_limits(os_sandbox, limits),
        )
    except Exception as exc:  # a grader never raises: the answer scores 0, with the reason
        return sandbox.Outcome(False, error=f"OS sandbox: {type(exc).__name__}: {exc}")
    stdout = res.stdout if isinstance(res.stdout, str) else res.stdout.decode("utf-8", "replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(_MARK)]
    if res.timed_out:
        return sandbox.Outcome(False, error=f"timeout ({limits.seconds_per_job:g} s)")
    if not lines:
        return sandbox.Outcome(False, error=f"the program died (exit {res.returncode}) before it returned")
    try:
        r = json.loads(lines[-1][len(_MARK) :])
        return sandbox.Outcome(True, tuple(r["outputs"])) if r["ok"] else sandbox.Outcome(False, error=r["error"])
    except (ValueError, KeyError, TypeError):
        return sandbox.Outcome(False, error="unreadable result from the OS sandbox")


def _os_limits(os_sandbox: Any, limits: GraderLimits) -> Any:
    return os_sandbox.Limits(
        wall_seconds=limits.seconds_per_job,
        cpu_seconds=max(1, math.ceil(limits.seconds_per_job)),
        memory_bytes=limits.memory_bytes,
        output_bytes=1 << 20,  # the result line: up to 10,000 characters of repr per test
    )


# -- module:function graders -----------------------------------------------------------------------------------
GRADER_WORKER = Path(__file__).with_name("_grader_worker.py")


@dataclass(frozen=True)
class GraderLimits:
    """Limits of one answer's grading (``module:function`` graders, and programs in the OS sandbox)."""

    seconds_per_job: float = 10.0
    memory_bytes: int = 2048 * 2**20
    import_seconds: float = 120.0
    file_bytes: int = 256 * 2**20


def _grader_limits(spec: JsonlSpec) -> GraderLimits:
    return GraderLimits(seconds_per_job=spec.grader_seconds, memory_bytes=spec.grader_memory_mb * 2**20)


_LATE = "killed: "


class ModuleGrader:
    """A user's ``module:function`` grader, run in worker processes (``_grader_worker.py``) under limits.

    One worker grades a whole batch, streaming a line per answer; a worker that dies or misses an answer's
    deadline is killed with everything it started, that answer scores 0 and a fresh worker grades the rest. An
    answer whose worker died after others had been graded in it is first re-graded alone on a fresh worker, so
    that what earlier answers left behind (a leak, a corrupted state) is never charged to it; one that missed its
    deadline is not re-graded (that would double the wait).
    """

    def __init__(self, grader: str, limits: GraderLimits = GraderLimits()) -> None:
        self.grader = grader
        self.limits = limits

    def check(self, field: str) -> None:
        """Import the grader in a worker; an EvaluatorError naming ``field`` when it cannot be."""
        _, fatal = self._run_worker([])
        if fatal:
            raise EvaluatorError(f"{field}: {fatal}")

    def grade(self, jobs: Sequence[tuple[str, dict]]) -> list[tuple[float, str]]:
        results: list[tuple[float, str]] = []
        pending = list(jobs)
        while pending:
            done, fatal = self._run_worker(pending)
            results.extend(done)
            pending = pending[len(done) :]
            if not pending:
                break
            if done and not fatal.startswith(_LATE):  # a crash: re-grade the culprit alone, on a fresh worker
                alone, fatal_alone = self._run_worker(pending[:1])
                results.append(alone[0] if alone else (0.0, fatal_alone))
            else:
                results.append((0.0, fatal))
            pending = pending[1:]
        return results

    def _run_worker(self, jobs: Sequence[tuple[str, dict]]) -> tuple[list[tuple[float, str]], str]:
        """Grade ``jobs`` in one worker: the results it gave, and why it stopped before the end (else "")."""
        lim = self.limits
        payload = json.dumps(
            {
                "grader": self.grader,
                "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
                "limits": {
                    "seconds_per_job": lim.seconds_per_job,
                    "memory_bytes": lim.memory_bytes,
                    "import_seconds": lim.import_seconds,
                    "file_bytes": lim.file_bytes,
                },
                "jobs": [{"answer": a, "item": item} for a, item in jobs],
            },
            default=str,
        ).encode()
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-P", str(GRADER_WORKER)],  # -P: not its own directory first on sys.path
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # its own process group: a kill takes whatever it started
            )
            try:
                return self._talk(proc, payload, len(jobs), err)
            finally:
                _kill_group(proc)
                proc.wait()

    def _talk(self, proc: subprocess.Popen, payload: bytes, n: int, err: Any) -> tuple[list[tuple[float, str]], str]:
        assert proc.stdin is not None and proc.stdout is not None

        def feed() -> None:
            try:
                proc.stdin.write(payload)  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass  # the worker died: reported below

        threading.Thread(target=feed, daemon=True).start()
        lim = self.limits
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        fd = proc.stdout.fileno()
        buf = b""
        done: list[tuple[float, str]] = []
        ready = False
        deadline = time.monotonic() + lim.import_seconds + 10.0
        try:
            while True:
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        msg = None
                    if not isinstance(msg, dict):
                        return done, "the grader worker wrote an unreadable line"
                    if "fatal" in msg:
                        return done, str(msg["fatal"])
                    if "ready" in msg:
                        ready = True
                    else:
                        s = msg.get("score")
                        done.append((float(s), "") if isinstance(s, int | float) else (0.0, str(msg.get("error"))))
                    if ready and len(done) >= n:
                        return done, ""
                    deadline = time.monotonic() + lim.seconds_per_job + 3.0
                left = deadline - time.monotonic()
                if left <= 0:
                    what = (
                        f"timeout ({lim.seconds_per_job:g} s)"
                        if ready
                        else f"import took over {lim.import_seconds:g} s"
                    )
                    return done, f"{_LATE}{what}"
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
        finally:
            sel.close()
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed its output but lives on
            _kill_group(proc)
            code = proc.wait()
        how = f"exit {code}"
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        err.seek(0, os.SEEK_END)
        err.seek(max(0, err.tell() - 2000))
        tail = err.read().decode("utf-8", "replace").strip().splitlines()
        last = f": {tail[-1][:300]}" if tail else ""
        if not ready:
            return done, f"the grader worker died before it imported {self.grader} ({how}{last})"
        return done, f"the grader worker died ({how}{last})"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
