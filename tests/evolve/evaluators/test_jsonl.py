"""JSONL skills: every grader scores gold answers 1 and wrong ones 0, splits are stable, bad files are named."""

from __future__ import annotations

import json
import sqlite3

import pytest

from evolve.evaluators.base import SPLITS, EvaluatorError, split_of
from evolve.evaluators.jsonl import JsonlEvaluator
from evolve.evaluators.registry import JsonlSpec
from tests.evolve.evaluators.data import shop_database, sql_jsonl


class Echo:
    """An engine that answers each prompt from a table (what a model would say)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.seen: list[str] = []

    def generate(self, prompts, *, max_new_tokens, chat=False):
        # what the prompt looks like after the chat template of the embedded models
        prompts = [p + "\nAnswer:" for p in prompts] if chat else list(prompts)
        self.seen += prompts
        return [self.answers.get(p.removesuffix("\nAnswer:"), "no idea") for p in prompts]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluator(tmp_path, rows, grader, **kw):
    spec = JsonlSpec(kind="jsonl", path=write(tmp_path / "d.jsonl", rows), grader=grader, **kw)
    return JsonlEvaluator("mine", spec)


def split_rows(rows, split="validation"):
    return [r for r in rows if split_of(r["prompt"]) == split]


ROWS = [{"prompt": f"q{i}: what is {i} times 3?", "answer": str(3 * i)} for i in range(60)]


@pytest.mark.parametrize(
    ("grader", "gold", "wrong", "extra"),
    [
        ("exact", lambda r: r["answer"] + "\nbecause", lambda r: r["answer"] + "0", {}),
        ("normalised", lambda r: f"The {r['answer']}.", lambda r: "an answer", {}),
        ("numeric", lambda r: f"It is {float(r['answer']) * (1 + 1e-9)} exactly", lambda r: "41.5", {}),
        ("regex", lambda r: r["answer"], lambda r: r["answer"] + "x", {}),
    ],
)
def test_text_graders(tmp_path, grader, gold, wrong, extra):
    rows = [dict(r, answer=r["answer"] if grader != "regex" else rf"{r['answer']}(\.0)?") for r in ROWS]
    ev = evaluator(tmp_path, rows, grader, **extra)
    val = split_rows(rows)
    assert val, "the hash must put some rows in validation"
    plain = [dict(r, answer=str(3 * int(r["prompt"].split(":")[0][1:]))) for r in val]
    res = ev.evaluate(Echo({r["prompt"]: gold(r) for r in plain}), "validation", 100)
    assert res.scores == [1.0] * len(val)
    res = ev.evaluate(Echo({r["prompt"]: wrong(r) for r in plain}), "validation", 100)
    assert res.scores == [0.0] * len(val)


def test_splits_by_hash_are_stable_and_chat_formats_the_prompt(tmp_path):
    ev = evaluator(tmp_path, ROWS, "exact")
    sizes = {s: len(ev.pools[s]) for s in SPLITS}
    assert sum(sizes.values()) == 60 and all(sizes[s] for s in ("train", "validation", "test"))
    shuffled = evaluator(tmp_path, [*reversed(ROWS), {"prompt": "new one", "answer": "1"}], "exact")
    for s in SPLITS:  # reordering or growing the file moves no item to another split
        assert {r.prompt for r in ev.pools[s]} <= {r.prompt for r in shuffled.pools[s]}
    a = ev.items("train", 5, seed=1)
    assert a == ev.items("train", 5, seed=1) and a != ev.items("train", 5, seed=2)
    engine = Echo({})
    ev.evaluate(engine, "test", 3)
    assert all(p.endswith("\nAnswer:") for p in engine.seen)
    raw = JsonlEvaluator("raw", JsonlSpec(kind="jsonl", path=tmp_path / "d.jsonl", grader="exact", chat=False))
    engine = Echo({})
    raw.evaluate(engine, "test", 3)
    assert engine.seen and not any(p.endswith("\nAnswer:") for p in engine.seen)


def test_separate_split_files(tmp_path):
    files = {
        s: write(tmp_path / f"{s}.jsonl", [{"prompt": f"{s} {i}", "answer": "1"} for i in range(3)]) for s in SPLITS
    }
    ev = JsonlEvaluator("mine", JsonlSpec(kind="jsonl", splits=files, grader="exact"))
    assert ev.exemplars("calibration", 10) == ["calibration 0", "calibration 1", "calibration 2"]


def test_sql_grader_runs_read_only_on_the_given_file(tmp_path):
    db = shop_database(tmp_path / "shop.sqlite")
    data = sql_jsonl(tmp_path / "sql.jsonl", per_split=20)
    ev = JsonlEvaluator("sql", JsonlSpec(kind="jsonl", path=data, grader="sql", database=db))
    recs = ev.records("validation", 100)
    assert ev.grade(recs, [r.answer for r in recs]) == [1.0] * len(recs)
    # a different query with the same result set scores too; a wrong filter does not
    assert ev.grade(recs[:1], [recs[0].answer.replace("SELECT", "select", 1) + " ;"]) == [1.0]
    bad = ["DROP TABLE employees", "DELETE FROM employees", "INSERT INTO departments VALUES ('x', 1, 1)"]
    assert ev.grade(recs[:3], bad) == [0.0, 0.0, 0.0]
    assert ev.grade(recs[:2], ["SELECT * FROM nowhere", "not sql at all"]) == [0.0, 0.0]
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM employees").fetchone()[0] > 0
    assert conn.execute("SELECT COUNT(*) FROM departments WHERE name = 'x'").fetchone()[0] == 0


def test_python_grader_runs_answers_and_gold_in_the_sandbox(tmp_path):
    rows = [
        {"prompt": f"p{i}: double x", "tests": [{"input": [2], "output": 4}, {"input": [5], "output": 10}]}
        for i in range(30)
    ] + [
        {"prompt": f"g{i}: add a and b", "args": ["a", "b"], "answer": "lambda a, b: a + b",
         "tests": [{"input": [1, 2]}, {"input": [3, 4]}]}
        for i in range(30)
    ]  # fmt: skip
    ev = evaluator(tmp_path, rows, "python")
    recs = ev.records("validation", 100)
    assert {r.prompt[0] for r in recs} == {"p", "g"}
    good = ["lambda x: x * 2" if r.prompt.startswith("p") else "def f(a, b):\n    return a + b" for r in recs]
    assert ev.grade(recs, good) == [1.0] * len(recs)
    evil = ["__import__('os').system('true')", "open('/etc/passwd').read()", "lambda x: x * 3", "while True: pass"]
    n = min(len(recs), 4)
    assert ev.grade(recs[:n], evil[:n]) == [0.0] * n


def module_grader(answer: str, item: dict) -> float:
    """A user's own grader (named in a test as tests.evolve.evaluators.test_jsonl:module_grader)."""
    if answer == "boom":
        raise RuntimeError("a grader that raises must not stop the run")
    return 1.0 if answer.strip().lower() == item["answer"].lower() else 0.25


def test_module_function_grader(tmp_path):
    ev = evaluator(tmp_path, ROWS, "tests.evolve.evaluators.test_jsonl:module_grader")
    recs = ev.records("validation", 3)
    assert ev.grade(recs, [recs[0].answer, "nope", "boom"]) == [1.0, 0.25, 0.0]


# -- bad input: the file and the line, or the field ------------------------------------------------------------
def test_a_line_without_prompt_names_the_file_and_line(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text('{"prompt": "1+1", "answer": "2"}\n\n{"question": "2+2", "answer": "4"}\n')
    with pytest.raises(EvaluatorError, match=r"math\.jsonl: line 3: no \"prompt\""):
        JsonlEvaluator("math", JsonlSpec(kind="jsonl", path=path, grader="numeric"))
    path.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": 4\n')
    with pytest.raises(EvaluatorError, match=r"math\.jsonl: line 2: not valid JSON"):
        JsonlEvaluator("math", JsonlSpec(kind="jsonl", path=path, grader="numeric"))
    path.write_text('{"prompt": "1+1"}\n')
    with pytest.raises(EvaluatorError, match=r"math\.jsonl: line 1: no \"answer\""):
        JsonlEvaluator("math", JsonlSpec(kind="jsonl", path=path, grader="exact"))


def test_an_empty_split_is_named(tmp_path):
    ev = evaluator(tmp_path, ROWS[:1], "exact")
    empty = next(s for s in SPLITS if not ev.pools[s])
    with pytest.raises(EvaluatorError, match=f"the {empty} split is empty.*d.jsonl"):
        ev.evaluate(Echo({}), empty, 5)


def test_the_run_command_reports_a_bad_line_with_exit_code_2(tmp_path):
    import subprocess
    import sys

    (tmp_path / "math.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n{"answer": "4"}\n')
    (tmp_path / "evolve.yaml").write_text(
        f"skills:\n  code: {{kind: world}}\n  math: {{kind: jsonl, path: {tmp_path / 'math.jsonl'}, grader: numeric}}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "evolve",
        "run",
        "--config",
        str(tmp_path / "evolve.yaml"),
        "--out",
        str(tmp_path / "r"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert 'math.jsonl: line 2: no "prompt"' in " ".join(out.stderr.split())
    assert not (tmp_path / "r").exists()  # nothing was started
