"""The humaneval skill: the wheel's 164 problems load, every canonical solution passes its own check in the OS
sandbox and empty bodies fail it, chat answers are read as HumanEval users expect, hostile programs score 0
without hanging, and bad files and samples are named."""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time

import pytest

from evolve.evaluators import os_sandbox
from evolve.evaluators.base import SPLITS, EvaluatorError
from evolve.evaluators.humaneval import (
    STOP,
    HumanEvalTask,
    chat_program,
    default_path,
    extract_code,
    read_problems,
)
from evolve.evaluators.specs import HumanEvalSpec

_UNAVAILABLE = os_sandbox.available()
needs_sandbox = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"OS sandbox unusable here: {_UNAVAILABLE}")


def task(**kw) -> HumanEvalTask:
    return HumanEvalTask("code", HumanEvalSpec(kind="humaneval", **kw))


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return {p["task_id"]: p for p in read_problems(default_path())}


def samples_with(problems, body: str) -> list[dict]:
    return [{"task_id": t, "completion": body} for t in problems]


# -- data ------------------------------------------------------------------------------------------------
def test_loads_the_wheels_164_problems_into_stable_splits():
    t = task()
    ids = [i.id for s in SPLITS for i in t.pool(s)]
    assert len(ids) == len(set(ids)) == 164
    assert {f"HumanEval/{n}" for n in range(164)} == set(ids)
    assert all(t.split_size(s) > 10 for s in SPLITS)
    item = t.by_id()["HumanEval/0"]
    assert item.prompt.startswith("Complete this Python function") and "def has_close_elements" in item.prompt
    assert "```python" in item.prompt
    assert t.exemplars("test", 3) and all(e.startswith("Complete this Python function") for e in t.exemplars("test", 3))
    # chat: the user turn is the phrasing; completion protocol: the raw prompt
    assert t.messages(item) == [{"role": "user", "content": item.prompt}]
    raw = task(chat=False)
    assert raw.messages(item) == [{"role": "user", "content": item.data["prompt"]}]
    assert raw.stop == STOP and t.stop == ()
    assert t.max_turns == 1


def write_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(r if isinstance(r, str) else json.dumps(r) + "\n")
    return path


GOOD = {
    "task_id": "Mine/0",
    "prompt": "def add(a, b):\n    '''a + b'''\n",
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
}


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ("{not json\n", "line 2: not valid JSON"),
        ([1, 2], "line 2: a JSON list"),
        ({k: v for k, v in GOOD.items() if k != "test"} | {"task_id": "Mine/1"}, "line 2: no test"),
        (GOOD | {"task_id": "Mine/1", "prompt": ""}, "line 2: no prompt"),
        (GOOD | {"task_id": "Mine/1", "canonical_solution": 3}, "line 2: no canonical_solution"),
        (GOOD | {"task_id": "Mine/1", "entry_point": "not a name"}, "line 2: entry_point"),
        (GOOD, "line 2: task_id 'Mine/0' repeats line 1"),
    ],
)
def test_a_malformed_file_is_named_with_its_line(tmp_path, second, message):
    for path in (tmp_path / "p.jsonl", tmp_path / "p.jsonl.gz"):
        rows = [GOOD, second]
        if path.suffix == ".gz":
            write_gz(path, rows)
        else:
            path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
        with pytest.raises(EvaluatorError, match=re.escape(f"{path.name}: {message}")):
            task(path=path).pool("train")


def test_an_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "HumanEval.jsonl.gz"
    bad.write_bytes(b"\x80\x03pickle? no")
    with pytest.raises(EvaluatorError, match=r"HumanEval\.jsonl\.gz: cannot read it"):
        task(path=bad).pool("train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvaluatorError, match=r"empty\.jsonl: no problems"):
        task(path=empty).pool("train")


def test_unknown_task_ids_in_samples_are_listed():
    t = task()
    samples = [{"task_id": "HumanEval/0", "completion": "    pass\n"}] + [
        {"task_id": f"MBPP/{n}", "completion": ""} for n in range(7)
    ]
    with pytest.raises(EvaluatorError, match=r"7 sample task id\(s\).*'MBPP/0'.*and 2 more"):
        t.grade_samples(samples)
    with pytest.raises(EvaluatorError, match="sample 1: expected an object"):
        t.grade_samples([{"completion": "x"}])
    with pytest.raises(EvaluatorError, match=r"sample 1 \(HumanEval/0\): completion must be a string"):
        t.grade_samples([{"task_id": "HumanEval/0"}])


# -- reading chat answers (no execution) ----------------------------------------------------------------
def test_chat_extraction(problems):
    p = problems["HumanEval/0"]
    full = "def has_close_elements(numbers, threshold):\n    return True\n"
    body = "    return True"
    # fenced full def; prose and a usage block around it
    reply = f"Here it is:\n```python\n{full}```\nUsage:\n```python\nprint(has_close_elements([1.0], 0.1))\n```\n"
    assert extract_code(reply, "has_close_elements") == full.rstrip("\n")
    # the usage block first: the block that defines the entry point wins
    reply = f"```python\nhas_close_elements([1.0], 0.5)\n```\n```py\n{full}```"
    assert extract_code(reply, "has_close_elements") == full.rstrip("\n")
    # no block defines it: the first python block; untagged blocks count, other languages only last
    assert extract_code("```text\nx\n```\n```\n    return 1\n```", "f") == "    return 1"
    assert extract_code("```python\nA\n```\n```python\nB\n```", "f") == "A"
    # unclosed fence (the token budget ran out): to the end
    assert extract_code("```python\ndef f():\n    return 1", "f") == "def f():\n    return 1"
    # no fence: the whole reply
    assert extract_code(f"\n{body}\n\n", "f") == body

    # a full def runs after the prompt's header (imports), replacing the prompt's stub
    prog = chat_program(p, full)
    assert prog.startswith("from typing import List\n") and prog.count("def has_close_elements") == 1
    # a body: indented under the prompt's signature and docstring, at 4 spaces whatever it came with
    assert chat_program(p, body) == p["prompt"] + "    return True\n"
    assert chat_program(p, "x = 1\nreturn x") == p["prompt"] + "    x = 1\n    return x\n"
    assert chat_program(p, "        x = 1\n        return x") == p["prompt"] + "    x = 1\n    return x\n"
    # a demo under a main guard is dropped
    demo = full + '\nif __name__ == "__main__":\n    assert has_close_elements([], 1) is False\n'
    assert "__main__" not in chat_program(p, demo)
    # helpers of the prompt stay: HumanEval/38's check calls encode_cyclic
    p38 = problems["HumanEval/38"]
    prog = chat_program(p38, "def decode_cyclic(s: str):\n    return s\n")
    assert "def encode_cyclic" in prog and prog.count("def decode_cyclic") == 1


def test_parse_never_raises_and_empty_replies_are_invalid(problems):
    t = task()
    item = t.by_id()["HumanEval/0"]
    assert t.parse(item, "  \n").kind == "invalid"
    assert t.parse(item, "```python\n```").kind == "invalid"
    assert t.parse(item, "I cannot help with that.").kind == "answer"  # graded (and fails), never raised
    raw = task(chat=False)
    assert raw.parse(item, "    return 1\n").content == item.data["prompt"] + "    return 1\n"
    assert raw.gold(item) == [item.data["canonical_solution"]]
    assert t.gold(item)[0].startswith("```python\nfrom typing import List") and t.gold(item)[0].endswith("\n```")


# -- graded in the sandbox -------------------------------------------------------------------------------
@needs_sandbox
def test_gold_controls_pass_all_164_in_both_protocols(problems):
    t = task()
    start = time.perf_counter()
    raw = t.grade_samples([{"task_id": k, "completion": p["canonical_solution"]} for k, p in problems.items()])
    elapsed = time.perf_counter() - start
    failed = [(tr.item_id, tr.error) for tr in raw if tr.score != 1.0]
    assert not failed, failed
    assert len(raw) == 164 and all(tr.status == "answered" and tr.turns == 1 for tr in raw)
    print(f"\n164 canonical solutions graded in {elapsed:.1f} s")
    # the chat protocol's gold (fenced prompt + solution) through the episode loop: the fine-tuning data
    items = [i for s in SPLITS for i in t.pool(s)]
    chat = t.replay(items, [t.gold(i) for i in items])
    assert [tr.item_id for tr in chat if tr.score != 1.0] == []
    convs = t.gold_conversations("train", 3)
    assert len(convs) == 3 and convs[0][0]["content"].startswith("Complete this Python function")
    assert convs[0][1]["content"].startswith("```python")


@needs_sandbox
@pytest.mark.parametrize("body", ["    pass\n", "    return None\n"])
def test_negative_controls_fail_all_164(problems, body):
    graded = task().grade_samples(samples_with(problems, body))
    assert [tr.item_id for tr in graded if tr.score != 0.0] == []
    assert all(tr.error.startswith("exit status 1") for tr in graded)  # the check failed, nothing else


class ChatEngine:
    """Answers each conversation's user turn from a table (what a chat model would say)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[dict] = []

    def generate_chat(self, conversations, *, max_new_tokens, stop=()):
        self.calls.append({"n": len(conversations), "max_new_tokens": max_new_tokens, "stop": tuple(stop)})
        return [self.answers.get(c[-1]["content"], "no idea") for c in conversations]


class CompletionEngine:
    """A base model: raw completions, which run on past the function (the stop sequences must cut them)."""

    def __init__(self, completions: dict[str, str]) -> None:
        self.completions = completions
        self.calls: list[dict] = []

    def generate(self, prompts, *, max_new_tokens, chat=False, stop=()):
        self.calls.append({"n": len(prompts), "chat": chat, "stop": tuple(stop)})
        return [self.completions.get(p, "") for p in prompts]


@needs_sandbox
def test_evaluate_chat_and_completion_protocols(problems):
    t = task()
    items = t.episode_items("test", 6)
    answers = {}
    for n, i in enumerate(items):
        p = i.data
        if n % 3 == 0:  # a full function in a fence, with prose
            answers[i.prompt] = f"Sure:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
        elif n % 3 == 1:  # the body only, unfenced
            answers[i.prompt] = p["canonical_solution"]
        else:  # wrong
            answers[i.prompt] = "```python\n    return None\n```"
    engine = ChatEngine(answers)
    result = t.evaluate(engine, "test", 6)
    assert result.scores == [0.0 if n % 3 == 2 else 1.0 for n in range(6)]
    assert engine.calls == [{"n": 6, "max_new_tokens": 384, "stop": ()}]  # one batched turn
    assert result.transcripts and result.transcripts[0].messages[1]["role"] == "assistant"

    raw = task(chat=False)
    completions = {
        i.data["prompt"]: i.data["canonical_solution"] + "\n\ndef extra():\n    raise SystemExit(1)\n" for i in items
    }
    completions[items[0].data["prompt"]] = "    return None\n"
    engine = CompletionEngine(completions)
    result = raw.evaluate(engine, "test", 6)
    assert result.scores == [0.0] + [1.0] * 5
    assert engine.calls == [{"n": 6, "chat": False, "stop": STOP}]
    assert "def extra" not in result.transcripts[1].answer


def hostile(problems, tail: str) -> dict:
    """HumanEval/0's correct completion followed by top-level code: it passes iff ``tail`` succeeds."""
    return {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"] + "\n" + tail}


@needs_sandbox
def test_hostile_programs_score_0_and_do_not_hang(problems):
    with socket.socket() as server:  # something to phone home to, on the host
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        accepted: list[object] = []
        threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
        tails = {
            "benign": "import os\nassert os.path.exists('/usr/bin/python3')\n",
            "shadow": "print(open('/etc/shadow').read())\n",
            "work": "import os\nprint(os.listdir('/work'))\n",
            "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n",
            "internet": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3).close()\n",
            "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            "loop": "while True:\n    pass\n",
            "sleep": "import time\ntime.sleep(3600)\n",
        }
        t = task(timeout=3.0)
        start = time.perf_counter()
        graded = t.grade_samples([hostile(problems, tail) for tail in tails.values()])
        elapsed = time.perf_counter() - start
    scores = dict(zip(tails, (tr.score for tr in graded), strict=True))
    assert scores == {name: 1.0 if name == "benign" else 0.0 for name in tails}
    assert not accepted, "a graded program reached the host's loopback"
    errors = dict(zip(tails, (tr.error for tr in graded), strict=True))
    assert "FileNotFoundError" in errors["shadow"] and "FileNotFoundError" in errors["work"]
    assert errors["loop"] == errors["sleep"] == "timed out after 3 s"
    assert elapsed < 30, f"hostile programs took {elapsed:.1f} s"


def test_open_refuses_without_the_sandbox(monkeypatch):
    def missing(*, privileged=False):
        raise os_sandbox.SandboxUnavailable("bubblewrap (bwrap) is not installed")

    monkeypatch.setattr(os_sandbox, "check_available", missing)
    t = task()
    with pytest.raises(os_sandbox.SandboxUnavailable, match="bubblewrap"):
        t.evaluate(ChatEngine({}), "test", 2)
    with pytest.raises(os_sandbox.SandboxUnavailable, match="bubblewrap"):
        t.grade_samples([{"task_id": "HumanEval/0", "completion": "    pass\n"}])
