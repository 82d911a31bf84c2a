"""AgentBench's DBBench on SQLite: the vendored file and its gold control, AgentBench's protocol (prompt, actions,
observations, comparison), negative controls, malformed files named by line, the statement budget, isolation and
multi-turn episodes."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time

import pytest

from evolve.evaluators.agentbench_db import (
    ACK,
    DATA_DIR,
    DEFAULT_PATH,
    EXCLUDED_PATH,
    PROMPT,
    TRUNCATED,
    AgentBenchDbTask,
    Database,
    Table,
    compare_answer,
    exclusions_of,
    mysql_table_hash,
    mysql_to_sqlite,
    parse_reply,
    read_items,
)
from evolve.evaluators.base import SPLITS, EvaluatorError
from evolve.evaluators.episodes import Action
from evolve.evaluators.registry import build
from evolve.evaluators.specs import AgentBenchDbSpec

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


@pytest.fixture(scope="module")
def task():
    return AgentBenchDbTask("db")


def op(sql: str) -> str:
    return f"Let me look.\nAction: Operation\n```sql\n{sql}\n```"


def answer(values) -> str:
    return "Done.\nAction: Answer\nFinal Answer: " + json.dumps(values)


def one(task, kind: str):
    """The first usable item of a kind (``question`` or ``modification``)."""
    return next(i for i in task.load_items() if i.data["modifying"] == (kind == "modification"))


# -- the vendored data ---------------------------------------------------------------------------------------------
def test_the_data_is_vendored_with_its_licence_and_source():
    assert DEFAULT_PATH.is_file() and not list(DATA_DIR.glob("*.pkl"))
    licence = (DATA_DIR / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    source = (DATA_DIR / "SOURCE.md").read_text()
    digest = hashlib.sha256(DEFAULT_PATH.read_bytes()).hexdigest()
    for needle in (
        "SakanaAI/CycleQD",
        "evaluation/fishfarm/data/db/data_dbbench_standard_dev.jsonl",
        "3d14971e0b50c8111c4cb13abd1b261d4c6685ec",
        "THUDM/AgentBench",
        "41e6807349f741e06428fae3e9e4d334e7002362",
        digest,
        "| Changed | nothing |",
    ):
        assert needle in source
    items = read_items(DEFAULT_PATH)
    assert len(items) == 360 and len({i.id for i in items}) == 360
    assert sum(i.data["modifying"] for i in items) == 240


def test_gold_control_recomputed_matches_the_shipped_exclusion_list(task):
    shipped = json.loads(EXCLUDED_PATH.read_text())
    fresh = exclusions_of(DEFAULT_PATH)
    assert fresh == shipped, "stale excluded.json: run python -m evolve.evaluators.agentbench_db --write"
    passed, reasons = task.gold_control()
    assert len(passed) == shipped["usable"] and reasons == shipped["excluded"]
    assert len(passed) + len(reasons) == 360
    by_id = {i.id: i for i in task.all_items}
    modifying = [i for i in passed if by_id[i].data["modifying"]]
    # the table hash reproduces AgentBench's MySQL answer_md5 for all modification items but one
    assert len(modifying) >= 239
    assert len(passed) >= 281
    assert all(r.startswith("line ") for r in reasons.values())


def test_excluded_items_are_in_no_split(task):
    excluded = task.excluded()
    usable = task.load_items()
    assert excluded and not {i.id for i in usable} & set(excluded)
    pooled = [i.id for s in SPLITS for i in task.pool(s)]
    assert sorted(pooled) == sorted(i.id for i in usable)
    assert all(task.split_size(s) > 0 for s in SPLITS)


def test_every_usable_gold_trajectory_scores_one(task):
    items = task.load_items()
    transcripts = task.replay(items, [task.gold(i) for i in items])
    assert [t.item_id for t in transcripts if t.score != 1.0] == []
    question = next(t for t, i in zip(transcripts, items, strict=True) if not i.data["modifying"])
    assert [m["role"] for m in question.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert question.messages[4]["content"].startswith("[(")  # the rows, as str(list of tuples)
    convs = task.gold_conversations("train", 20)
    assert len(convs) == 20 and all(c[0]["content"] == PROMPT and c[1]["content"] == ACK for c in convs)


# -- AgentBench's protocol -------------------------------------------------------------------------------------------
def test_the_conversation_opens_as_agentbench_opens_it(task):
    item = one(task, "question")
    msgs = task.messages(item)
    assert msgs[0] == {"role": "user", "content": PROMPT}
    assert msgs[1] == {"role": "assistant", "content": "Ok."}
    raw = json.loads(DEFAULT_PATH.read_text().splitlines()[item.data["line"] - 1])
    assert msgs[2] == {"role": "user", "content": raw["description"] + "\n" + raw["add_description"]}
    assert "Action: Operation\n```sql\nSELECT * FROM table WHERE condition;\n```" in PROMPT
    assert 'Final Answer: ["ANSWER1", "ANSWER2", ...]' in PROMPT


def test_actions_parse_as_agentbench_reads_them():
    assert parse_reply(op("SELECT 1;")) == Action("act", "SELECT 1;")
    assert parse_reply("Action: Operation\n```sql\nSELECT a,\n b FROM t\n```") == Action("act", "SELECT a,  b FROM t")
    assert parse_reply('Action: Answer\nFinal Answer: ["x"]') == Action("answer", ' ["x"]')
    assert parse_reply("Action: Answer\nFinal Answer: 5\nmore").content == " 5"


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "The answer is 5.",
        "Action: Operation\nSELECT 1",  # no sql block
        "Action: Operation\n```sql\n\n```",
        "Final Answer: [1]",  # AgentBench wants it on a line of its own
        "Action: Operation",
        "\x00\udcff```sql",
    ],
)
def test_an_unparseable_turn_scores_zero_and_never_raises(task, reply):
    assert parse_reply(reply).kind == "invalid"
    items = [one(task, "question"), one(task, "modification")]
    transcripts = task.replay(items, [[reply], [reply]])
    assert [t.status for t in transcripts] == ["invalid", "invalid"]
    assert [t.score for t in transcripts] == [0.0, 0.0] and all(t.error for t in transcripts)


def test_parse_never_raises_on_noise():
    rng = random.Random(0)
    alphabet = "Action: OperationAnswerFinal`sql\n[]\"' \\x"
    for _ in range(2000):
        reply = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        assert parse_reply(reply).kind in ("act", "answer", "invalid")
    assert parse_reply(None).kind == "invalid"  # type: ignore[arg-type]


def test_agentbench_comparison():
    assert compare_answer(' ["12"]', ["12.0"]) and compare_answer(" [12]", ["12.0"])
    assert compare_answer(' ["b", "a"]', ["a", "b"]) and not compare_answer(' ["a"]', ["a", "b"])
    assert compare_answer(' ["Dallas"]', ["Dallas"]) and not compare_answer(' ["dallas"]', ["Dallas"])
    assert compare_answer(" 5", ["5"])  # a bare number: AgentBench's [answer] fallback, then float equality
    assert not compare_answer(" Dallas", ["Dallas"])  # a bare word keeps its leading space, as in AgentBench
    assert not compare_answer("", ["Dallas"]) and not compare_answer(" []", ["Dallas"])
    assert not compare_answer(' [["a"]]', ["a", "b"])  # unhashable: wrong, not an error
    # the answer is read as a literal, never evaluated
    assert not compare_answer(" __import__('os').getcwd()", ["x"])


def test_negative_controls_score_zero(task):
    questions = [i for i in task.load_items() if not i.data["modifying"]]
    modifications = [i for i in task.load_items() if i.data["modifying"]][:40]
    for script in (["Action: Answer\nFinal Answer: []"], [answer(["certainly not the label"])], [""]):
        transcripts = task.replay(questions, [script] * len(questions))
        assert sum(t.score for t in transcripts) == 0.0
    # a modification left undone, or done wrong, scores 0 whatever is answered
    undone = task.replay(modifications, [[answer(["none"])]] * len(modifications))
    assert sum(t.score for t in undone) == 0.0
    wrong = [[op(f"DELETE FROM `{i.data['tables'][0].name}`"), answer(["none"])] for i in modifications]
    assert sum(t.score for t in task.replay(modifications, wrong)) == 0.0
    # the right SQL with the wrong answer: a question still fails
    q = questions[0]
    assert task.replay([q], [[op(q.data["gold_sql"]), answer(["nope"])]])[0].score == 0.0


# -- episodes ----------------------------------------------------------------------------------------------------
def test_a_multi_turn_scripted_episode_scores_one(task):
    q = one(task, "question")
    name = q.data["tables"][0].name.replace("`", "``")
    script = [op(f"SELECT * FROM `{name}` LIMIT 2;"), op(q.data["gold_sql"]), answer(list(q.data["label"]))]
    (t,) = task.replay([q], [script])
    assert (t.score, t.status, t.turns) == (1.0, "answered", 3)
    assert t.messages[4]["content"].startswith("[(") and t.messages[6]["content"].startswith("[(")
    m = one(task, "modification")
    name = m.data["tables"][0].name.replace("`", "``")
    script = [op(f"SELECT COUNT(*) FROM `{name}`"), op(m.data["gold_sql"]), answer(["done"])]
    (t,) = task.replay([m], [script])
    assert (t.score, t.turns) == (1.0, 3) and t.messages[6]["content"] == "[]"
    # the modification is graded from the table however the episode ends (AgentBench hashes it regardless)
    (t,) = task.replay([m], [[op(m.data["gold_sql"]), "I am done."]])
    assert (t.status, t.score) == ("invalid", 1.0)


def test_each_episode_gets_a_fresh_database(task):
    m = one(task, "modification")
    first, second = task.replay([m, m], [[op(m.data["gold_sql"]), answer([])], [answer([])]])
    assert (first.score, second.score) == (1.0, 0.0)


def test_an_engine_runs_the_episodes(task):
    class Gold:
        """An engine that plays the gold solution, turn by turn, from the conversation it is given."""

        def __init__(self):
            self.batches = []

        def generate_chat(self, conversations, *, max_new_tokens, stop=()):
            self.batches.append(len(conversations))
            by_prompt = {i.prompt: i for i in task.load_items()}
            out = []
            for conv in conversations:
                item = by_prompt[conv[2]["content"]]
                turn = sum(m["role"] == "assistant" for m in conv) - 1
                out.append(task.gold(item)[turn])
            return out

    engine = Gold()
    result = task.evaluate(engine, "validation", 12)
    assert result.quality == 1.0 and len(result.scores) == 12
    assert engine.batches == [12, 12]  # every live episode advances in one batched call per turn


def test_long_results_are_truncated_as_agentbench_does(task):
    item = max(task.load_items(), key=lambda i: len(i.data["tables"][0].rows))
    name = item.data["tables"][0].name.replace("`", "``")
    (t,) = task.replay([item], [[op(f"SELECT * FROM `{name}`"), answer([])]])
    shown = t.messages[4]["content"]
    assert shown.endswith(TRUNCATED) and len(shown) == task.observation_chars + len(TRUNCATED)


# -- the statement budget and isolation -----------------------------------------------------------------------------
TABLE = Table("t t", ("name", "n"), (("Ann", "3"), ("bob", "12"), ("Émile", "5")))


def test_a_runaway_query_is_stopped_within_its_budget():
    db = Database([TABLE], max_seconds=1.0)
    start = time.monotonic()
    rows, text = db.run(RUNAWAY)
    assert rows is None and "stopped" in text and time.monotonic() - start < 3.0
    # the step budget stops it long before the clock does, and the database still answers
    db = Database([TABLE], max_steps=200_000, max_seconds=60)
    start = time.monotonic()
    assert db.run(RUNAWAY)[0] is None and time.monotonic() - start < 2.0
    assert db.run('SELECT count(*) FROM "t t"')[0] == [(3,)]
    db.close()


def test_a_runaway_query_costs_the_model_one_turn(task):
    q = one(task, "question")
    start = time.monotonic()
    (t,) = task.replay([q], [[op(RUNAWAY), op(q.data["gold_sql"]), answer(list(q.data["label"]))]])
    assert t.score == 1.0 and "stopped" in t.messages[4]["content"]
    assert time.monotonic() - start < 15


def test_grading_a_hostile_table_is_bounded_too(task):
    m = one(task, "modification")
    table = m.data["tables"][0]
    name = table.name.replace("`", "``")
    cols = ", ".join("`" + c.replace("`", "``") + "`" for c in table.columns)
    view = (
        f"CREATE VIEW `{name}` ({cols}) AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
        f"SELECT {', '.join(['x'] * len(table.columns))} FROM c"
    )
    start = time.monotonic()
    (t,) = task.replay([m], [[op(f"DROP TABLE `{name}`"), op(view), answer([])]])
    assert t.messages[6]["content"] == "[]"  # the view was made
    assert t.score == 0.0 and time.monotonic() - start < 15


@pytest.mark.parametrize(
    "sql",
    [
        "ATTACH DATABASE '{path}' AS other",
        "VACUUM INTO '{path}'",
        "SELECT load_extension('{path}')",
        "PRAGMA writable_schema = ON",
        "CREATE VIRTUAL TABLE v USING fts5(x)",
    ],
)
def test_a_models_sql_runs_only_against_its_own_database(tmp_path, sql):
    path = tmp_path / "escape.db"
    db = Database([TABLE])
    rows, text = db.run(sql.format(path=path))
    assert rows is None and "authoriz" in text
    assert not path.exists()
    assert db.run('SELECT name FROM "t t" WHERE n = 12')[0] == [("bob",)]
    db.close()


def test_sqlite_behaves_like_agentbenchs_mysql_where_it_matters():
    db = Database([TABLE])
    assert db.run("PRAGMA table_info(`t t`)")[0][0][1] == "name"  # schema introspection is allowed
    assert db.run("SELECT n FROM `t t` WHERE name = 'BOB'")[0] == [(12,)]  # case-insensitive
    assert db.run("SELECT n FROM `t t` WHERE name = 'emile'")[0] == [(5,)]  # accent-insensitive
    assert db.run("SELECT name FROM `t t` WHERE n > 4 ORDER BY n")[0] == [("Émile",), ("bob",)]  # numbers
    assert db.run("SELECT 'Don\\'t', CONCAT('a', 1), LEFT('abc', 2), IF(1 > 0, 'y', 'n')")[0] == [
        ("Don't", "a1", "ab", "y")
    ]
    assert db.run("SELECT * FROM nowhere") == (None, "no such table: nowhere")
    assert db.run("INSERT INTO `t t` VALUES ('Cy', '7')") == ([], "[]")
    assert db.run("SELECT 1; SELECT 2")[0] is None
    db.close()
    assert db.run("SELECT 1")[0] is None  # closed: an answer, not an exception


def test_the_mysql_shim():
    assert mysql_to_sqlite(r"SELECT 'Don\'t', 'a\nb', 'it''s', '\\'") == "SELECT 'Don''t', 'a\nb', 'it''s', '\\'"
    assert mysql_to_sqlite("SELECT * FROM 1952_GP WHERE x = 1e+5 AND y = 1.5e3 AND z = 0x1F") == (
        "SELECT * FROM `1952_GP` WHERE x = 1e+5 AND y = 1.5e3 AND z = 0x1F"
    )
    assert mysql_to_sqlite('SELECT "a\\b", `x``y`, [p q], t1.c2 # note') == 'SELECT "a\\b", `x``y`, [p q], t1.c2 '
    assert mysql_to_sqlite("SELECT RIGHT(s, 2) FROM a LEFT JOIN b") == "SELECT MYSQL_RIGHT(s, 2) FROM a LEFT JOIN b"
    assert mysql_to_sqlite("SELECT 'unterminated") == "SELECT 'unterminated"
    for noise in ("'\\", "`", "[", "--", "/*", "1e", "'\\0'"):
        mysql_to_sqlite(noise)  # never raises


def test_the_mysql_table_hash_is_agentbenchs():
    # select md5(group_concat(rowhash order by rowhash)) from (select substring(md5(concat_ws(',', ...)), 1, 5) ...)
    rows = [("a", None, "1"), ("b", "2", "3")]
    row_hashes = sorted(hashlib.md5(s.encode()).hexdigest()[:5] for s in ("a,1", "b,2,3"))
    assert mysql_table_hash(rows) == str([(hashlib.md5(",".join(row_hashes).encode()).hexdigest(),)])
    assert mysql_table_hash([]) == "[(None,)]"


# -- files and config --------------------------------------------------------------------------------------------
def good_line(**over):
    line = {
        "description": "How many rows?",
        "add_description": "The name of this table is t.",
        "type": ["counting"],
        "table": {
            "table_name": "t",
            "table_info": {"columns": [{"name": "a", "type": "TEXT"}], "rows": [["x"], ["y"]]},
        },
        "label": ["2"],
        "sql": {"query": "SELECT COUNT(*) FROM t"},
    }
    line.update(over)
    return line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a JSON list"),
        (json.dumps(good_line(description="")), 'no "description"'),
        (json.dumps(good_line(type="counting")), '"type" must be a list'),
        (json.dumps(good_line(table={"table_name": "t"})), '"table_info"'),
        (
            json.dumps(good_line(table={"table_name": "t", "table_info": {"columns": [{"name": "a"}], "rows": [1]}})),
            '"rows"',
        ),
        (json.dumps(good_line(label="2")), '"label" must be a list'),
        (json.dumps(good_line(sql="SELECT 1")), '"sql" must be'),
    ],
)
def test_a_malformed_benchmark_file_names_its_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good_line()) + "\n\n" + text + "\n")
    with pytest.raises(EvaluatorError, match=message) as err:
        AgentBenchDbTask("db", AgentBenchDbSpec(kind="agentbench_db", path=path))
    assert f"{path}:3" in str(err.value)


def test_a_users_file_gets_its_gold_control_at_load(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [
        good_line(),
        good_line(description="Broken gold", sql={"query": "SELECT COUNT(*) FROM nowhere"}),
        good_line(description="Wrong label", label=["3"]),
        good_line(
            description="Insert z",
            type=["INSERT"],
            label=["INSERT INTO t VALUES ('z')"],
            answer_md5=mysql_table_hash([("x",), ("y",), ("z",)]),
        ),
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    task = AgentBenchDbTask("mine", AgentBenchDbSpec(kind="agentbench_db", path=path))
    assert len(task.load_items()) == 2 and len(task.excluded()) == 2
    assert sorted(r.split(":")[0] for r in task.excluded().values()) == ["line 2 (counting)", "line 3 (counting)"]
    items = task.load_items()
    assert [t.score for t in task.replay(items, [task.gold(i) for i in items])] == [1.0, 1.0]


def test_the_registry_builds_the_kind(tmp_path):
    spec = AgentBenchDbSpec(kind="agentbench_db", max_turns=3, observation_chars=100)
    task = build("db", spec)
    assert isinstance(task, AgentBenchDbTask) and (task.max_turns, task.observation_chars) == (3, 100)
    with pytest.raises(EvaluatorError, match="no such DBBench"):
        AgentBenchDbTask("db", AgentBenchDbSpec(kind="agentbench_db", path=tmp_path / "gone.jsonl"))


def test_building_the_vendored_task_is_fast():
    start = time.monotonic()
    AgentBenchDbTask("db").load_items()
    assert time.monotonic() - start < 5.0
    assert sqlite3.sqlite_version  # the in-process SQLite is all it needs
