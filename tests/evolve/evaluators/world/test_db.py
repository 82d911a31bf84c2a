from __future__ import annotations

import pytest

from evolve.evaluators.world.db import NAMES, DbTask


@pytest.fixture(scope="module")
def task():
    return DbTask()


def _item(task, template):
    return next(i for i in task.items("test", 400) if i.template == template)


def test_equivalent_queries_pass(task):
    item = _item(task, "names_dept_older")
    d, _, n, _ = item.params
    answers = [
        f"select name from employees where age > {n} and dept = '{d}';",
        f'SELECT e.name FROM employees AS e WHERE e.dept = "{d}" AND e.age >= {n + 1} ORDER BY e.id DESC',
        # right, but graders read an answer's first line only ("SELECT name"), so it scores 0
        f"SELECT name\nFROM employees WHERE dept = '{d}' AND age > {n}",
    ]
    assert task.grade([item] * 3, answers) == [1.0, 1.0, 0.0]


def test_order_matters_only_when_the_question_orders(task):
    item = next(i for i in task.items("test", 400) if i.template == "city_oldest" and i.params[2] > 2)
    _, c, n, _ = item.params
    flipped = f"SELECT name FROM employees WHERE city = '{c}' ORDER BY age ASC LIMIT {n}"
    nested = f"SELECT name FROM (SELECT * FROM employees WHERE city = '{c}' ORDER BY age DESC) LIMIT {n}"
    assert task.grade([item, item], [flipped, nested]) == [0.0, 1.0]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM employees",
        "DROP TABLE employees",
        "INSERT INTO departments VALUES ('x', 1, 1)",
        "ATTACH DATABASE '/tmp/cycleqd-x.db' AS x",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
        "PRAGMA query_only = OFF",
        "SELECT name FROM employees; DELETE FROM employees",
        "SELECT load_extension('/tmp/x')",
    ],
)
def test_writes_and_runaway_queries_score_zero_and_change_nothing(task, sql):
    item = _item(task, "count_older")
    assert task.grade([item], [sql]) == [0.0]
    assert task.conn.execute("SELECT COUNT(*) FROM employees").fetchone()[0] == len(NAMES)
    assert task.grade([item], [item.answer]) == [1.0]


def test_huge_values_are_refused_before_they_are_allocated(task):
    """``randomblob(200000000)`` used to allocate 200 MB in the evolution process; SQLite's length limit stops it."""
    assert task._run("SELECT length(randomblob(1000))") == [(1000,)]
    assert task._run("SELECT length(randomblob(20000000))") is None
    assert task._run("SELECT length(zeroblob(20000000))") is None
    item = _item(task, "count_older")
    assert task.grade([item, item], ["SELECT randomblob(200000000)", item.answer]) == [0.0, 1.0]


def test_huge_results_are_refused_while_fetched(task):
    # 2,500 rows of 40 KB each: 100 MB if fetched whole; refused after the first ~1 MB
    assert task._run("SELECT hex(randomblob(20000)) FROM employees a, employees b") is None
    assert task._run("SELECT a.id FROM employees a, employees b") is None  # 2,500 rows > MAX_ROWS
    assert len(task._run("SELECT a.id FROM employees a, employees b WHERE a.id < 10")) == 9 * len(NAMES)
