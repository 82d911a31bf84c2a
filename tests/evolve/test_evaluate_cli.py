"""`cycleqd-evolve evaluate` on benchmark skills as a user runs it: the gold control, answers files, and bad
input that ends with exit code 2 and leaves what was saved untouched."""

from __future__ import annotations

import json

from tests.evolve.test_cli import cli

DB = "skills:\n  db: {kind: agentbench_db}\n"


def config(tmp_path, text=DB):
    path = tmp_path / "skills.yaml"
    path.write_text(text)
    return str(path)


def test_gold_answers_and_per_item_results(tmp_path):
    out = tmp_path / "gold.jsonl"
    run = cli("evaluate", "--config", config(tmp_path), "--gold", "--split", "test", "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["score"] == 1.0 and r["split"] == "test" and r["messages"] for r in rows)
    assert "100.0" in run.stdout
    # the same episodes as an answers file: the gold turns pass, a wrong answer fails
    answers = tmp_path / "answers.jsonl"
    lines = []
    for r in rows[:4]:
        turns = [m["content"] for m in r["messages"] if m["role"] == "assistant"][-2:]
        lines.append({"task_id": r["item_id"], "actions": turns})
    lines.append({"task_id": rows[5]["item_id"], "actions": ['Action: Answer\nFinal Answer: ["certainly wrong"]']})
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    graded = tmp_path / "graded.jsonl"
    run = cli(
        "evaluate", "--config", config(tmp_path), "--skill", "db", "--answers", str(answers), "--out", str(graded)
    )
    assert run.returncode == 0, run.stderr
    scores = [json.loads(line)["score"] for line in graded.read_text().splitlines()]
    assert len(scores) == 5 and scores[-1] == 0.0


def test_bad_input_exits_2_and_keeps_what_was_saved(tmp_path):
    saved = tmp_path / "results.jsonl"
    saved.write_text("previous results\n")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"task_id": "db-does-not-exist", "actions": ["x"]}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"description": "no table"}\n')
    cases = [
        (["--skill", "db", "--answers", str(unknown)], "does not have: 'db-does-not-exist'", DB),
        (["--skill", "db", "--answers", str(broken)], "line 1: not valid JSON", DB),
        (["--gold", "--skill", "chess"], "--skill 'chess': not configured", DB),
        (["--gold"], "bench.jsonl", f"skills:\n  db: {{kind: agentbench_db, path: {bench}}}\n"),
        (
            ["--gold"],
            "max_turns': Input should be greater than or equal to 1",
            "skills:\n  db: {kind: agentbench_db, max_turns: 0}\n",
        ),
    ]
    for args, needle, text in cases:
        run = cli("evaluate", "--config", config(tmp_path, text), *args, "--out", str(saved))
        assert run.returncode == 2, (args, run.stderr)
        assert needle in " ".join(run.stderr.split()), (needle, run.stderr)
        assert "Traceback" not in run.stderr
        assert saved.read_text() == "previous results\n"
