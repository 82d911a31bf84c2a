"""JSONL skills: every grader scores gold answers 1 and wrong ones 0, splits are stable, bad files are named."""

from __future__ import annotations

import json
import sqlite3

import pytest

from evolve.evaluators.base import SPLITS, EvaluatorError, split_of
from evolve.evaluators.jsonl import JsonlEvaluator
from evolve.evaluators.specs import JsonlSpec
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


# -- the python grader: whole programs, tuples, long answers ---------------------------------------------------
TYPED = """\
from typing import List


def pairs(xs: List[int]) -> List[tuple]:
    out: List[tuple] = []
    for i in range(0, len(xs) - 1, 2):
        out.append((xs[i], xs[i + 1]))
    return out
"""
PAIR_ROWS = [
    {"prompt": f"t{i}: pair up xs", "args": ["xs"], "entry_point": "pairs",
     "tests": [{"input": [[1, 2, 3, 4]], "output": [[1, 2], [3, 4]]}, {"input": [[]], "output": []}]}
    for i in range(40)
]  # fmt: skip


def test_python_grader_reads_the_whole_program_and_its_fenced_block(tmp_path):
    ev = evaluator(tmp_path, PAIR_ROWS, "python")
    rec = ev.records("validation", 1)
    chat = f"Here is the function:\n\n```python\n{TYPED}```\n\nIt walks the list two at a time."
    trailing = "lambda xs: [(xs[i], xs[i + 1]) for i in range(0, len(xs) - 1, 2)]\nbecause pairs are tuples"
    helper_after = TYPED + "\n\ndef unused(v):\n    return v\n"  # the item's entry_point is called, not the last
    answers = [TYPED, chat, trailing, "```\n" + TYPED.split("\n\n\n")[1] + "```", helper_after]
    assert ev.grade(rec * 5, answers) == [1.0] * 5  # the first line (`from typing import List`) is no program
    # the restricted sandbox still refuses real imports, saying so
    ((score, why),) = ev.grade_with_reasons(rec, ["import os\n" + TYPED])
    assert score == 0.0 and "Import" in why


def test_python_grader_a_tuple_equals_a_json_list(tmp_path):
    rows = [
        {"prompt": f"m{i}: min and max of xs", "args": ["xs"],
         "tests": [{"input": [[3, 1, 2]], "output": [1, 3]}, {"input": [[5]], "output": [5, 5]}]}
        for i in range(40)
    ]  # fmt: skip
    ev = evaluator(tmp_path, rows, "python")
    rec = ev.records("validation", 1)
    assert ev.grade(rec * 2, ["lambda xs: (min(xs), max(xs))", "lambda xs: [min(xs), max(xs)]"]) == [1.0, 1.0]
    ((score, why),) = ev.grade_with_reasons(rec, ["lambda xs: (min(xs), min(xs))"])
    assert score == 0.0 and "got (1, 1), expected [1, 3]" in why
    bools = [{"prompt": f"b{i}: is x even", "tests": [{"input": [2], "output": True}]} for i in range(40)]
    ev = evaluator(tmp_path, bools, "python")
    rec = ev.records("validation", 1)
    assert ev.grade(rec * 2, ["lambda x: x % 2 == 0", "lambda x: 1 - x % 2"]) == [1.0, 0.0]  # 1 is no true


def test_python_grader_an_over_long_answer_scores_zero_with_the_reason(tmp_path):
    ev = evaluator(tmp_path, PAIR_ROWS, "python")
    rec = ev.records("validation", 1)
    long = TYPED + "\n" + "\n".join(f"def helper_{i}(v):\n    return v + {i}\n" for i in range(200))
    ((score, why),) = ev.grade_with_reasons(rec, [long])
    assert score == 0.0 and "answer too long" in why and "sandbox: os" in why
    huge = "x" * 5_000_000  # never raises, whatever the size
    assert ev.grade(rec, [huge]) == [0.0]


def _os_sandbox():
    os_sandbox = pytest.importorskip("evolve.evaluators.os_sandbox")
    why = os_sandbox.available()
    if why:
        pytest.skip(f"no OS sandbox here: {why}")
    return os_sandbox


def test_python_grader_in_the_os_sandbox_runs_real_programs(tmp_path):
    _os_sandbox()
    ev = evaluator(tmp_path, PAIR_ROWS, "python", sandbox="os", grader_seconds=5)
    rec = ev.records("validation", 1)
    real = "import itertools\n" + TYPED.replace("out: List[tuple] = []", "out = []  # " + "x" * 3000)
    evil = "import socket\ndef pairs(xs):\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    return []"
    answers = [real, "def pairs(xs):\n    while True: pass", evil, "print('[(1, 2), (3, 4)]')"]
    got = ev.grade_with_reasons(rec * 4, answers)
    assert [s for s, _ in got] == [1.0, 0.0, 0.0, 0.0], got
    assert "timeout" in got[1][1]
    gold = [dict(r, answer=TYPED, tests=[{"input": t["input"]} for t in r["tests"]]) for r in PAIR_ROWS]
    ev = evaluator(tmp_path, gold, "python", sandbox="os")
    rec = ev.records("validation", 1)
    assert ev.grade(rec * 2, [TYPED, "def pairs(xs):\n    return []"]) == [1.0, 0.0]


def test_sandbox_os_needs_a_working_os_sandbox(tmp_path, monkeypatch):
    os_sandbox = pytest.importorskip("evolve.evaluators.os_sandbox")
    monkeypatch.setattr(os_sandbox, "available", lambda: "no user namespaces")
    with pytest.raises(EvaluatorError, match=r"skills\.mine\.sandbox: .*no user namespaces.*sandbox: ast"):
        evaluator(tmp_path, PAIR_ROWS, "python", sandbox="os")


# -- module:function graders: a worker process under limits -----------------------------------------------------
def module_grader(answer: str, item: dict) -> float:
    """A user's own grader (named in a test as tests.evolve.evaluators.test_jsonl:module_grader)."""
    if answer == "boom":
        raise RuntimeError("a grader that raises must not stop the run")
    return 1.0 if answer.strip().lower() == item["answer"].lower() else 0.25


def test_module_function_grader(tmp_path):
    ev = evaluator(tmp_path, ROWS, "tests.evolve.evaluators.test_jsonl:module_grader")
    recs = ev.records("validation", 3)
    assert ev.grade(recs, [recs[0].answer, "nope", "boom"]) == [1.0, 0.25, 0.0]


def hostile_grader(answer: str, item: dict) -> float:
    """Does what ``answer`` says: the ways a grader can go wrong (and a note of the process that graded it)."""
    import os
    import signal
    import socket
    import time

    with open(item["log"], "a") as f:
        f.write(f"{os.getpid()}\n")
    if answer == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if answer == "exit":
        os._exit(3)
    if answer == "spin":
        while True:
            pass
    if answer == "stuck":  # deaf to the worker's own timer: only the parent's deadline ends it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGXCPU})
        time.sleep(60)
    if answer == "hog":
        block = bytearray(1 << 30)
        return float(len(block) > 0)
    if answer == "net":
        try:
            socket.create_connection(("127.0.0.1", int(item["port"])), timeout=2).close()
            return 1.0
        except OSError:
            return 0.5
    if answer == "text":
        return "fine"  # type: ignore[return-value]
    if answer == "print":
        print('{"score": 1.0}')
        return 0.75
    return 1.0 if answer == "good" else 0.0


def _hostile(tmp_path, **kw):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    rows = [dict(r, log=str(tmp_path / "pids"), port=server.getsockname()[1]) for r in ROWS]
    ev = evaluator(tmp_path, rows, "tests.evolve.evaluators.test_jsonl:hostile_grader", **kw)
    return ev, server


def test_a_module_grader_runs_in_a_worker_that_can_fail_alone(tmp_path):
    import os

    ev, server = _hostile(tmp_path, grader_seconds=1, grader_memory_mb=512)
    rec = ev.records("validation", 1)
    answers = ["good", "crash", "good", "spin", "exit", "hog", "net", "text", "print", "good", "stuck", "good"]
    got = ev.grade_with_reasons(rec * len(answers), answers)
    server.close()
    assert [s for s, _ in got] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.75, 1.0, 0.0, 1.0], got
    assert "SIGSEGV" in got[1][1] and "timeout" in got[3][1] and "exit 3" in got[4][1]
    assert "MemoryError" in got[5][1] and "ValueError" in got[7][1] and "timeout" in got[10][1]
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert os.getpid() not in pids  # never graded in this process
    # one worker per batch; a dead worker's successor takes the rest (a crash after others ran is re-run alone)
    assert pids[0] == pids[1] and pids[2] != pids[1] and len(set(pids)) < len(pids)


def test_a_module_grader_is_imported_in_the_worker_and_a_bad_one_is_refused_when_built(tmp_path, monkeypatch):
    import sys

    mod = tmp_path / "user_grader_mod.py"
    mod.write_text("import os\nBIG = bytearray(64)\ndef grade(answer, item):\n    return 1.0\nNOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ev = evaluator(tmp_path, ROWS, "user_grader_mod:grade")
    assert ev.grade(ev.records("validation", 2), ["a", "b"]) == [1.0, 1.0]
    assert "user_grader_mod" not in sys.modules  # the user's module never ran in this process
    with pytest.raises(EvaluatorError, match=r"skills\.mine\.grader: cannot import module 'no_such_grader_mod'"):
        evaluator(tmp_path, ROWS, "no_such_grader_mod:grade")
    with pytest.raises(EvaluatorError, match=r"skills\.mine\.grader: module 'user_grader_mod' has no 'nope'"):
        evaluator(tmp_path, ROWS, "user_grader_mod:nope")
    with pytest.raises(EvaluatorError, match=r"user_grader_mod:NOT_A_FUNCTION is not a function"):
        evaluator(tmp_path, ROWS, "user_grader_mod:NOT_A_FUNCTION")
    (tmp_path / "dies_on_import.py").write_text("import os\nos._exit(7)\n")
    with pytest.raises(EvaluatorError, match=r"died before it imported dies_on_import:grade \(exit 7"):
        evaluator(tmp_path, ROWS, "dies_on_import:grade")


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
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert 'math.jsonl: line 2: no "prompt"' in " ".join(out.stderr.split())
    assert not (tmp_path / "r").exists()  # nothing was started
