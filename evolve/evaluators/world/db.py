"""The ``db`` skill: a question -> one SQL query over a fixed SQLite database, graded by executing it.

Mirrors the paper's database task (AgentBench DB). The database is built in memory from a seed, then opened
read-only for answers (``PRAGMA query_only``, an authorizer that allows reads only, a step budget as time
limit, SQLite's length limit and a cap on the result's size for memory). An answer scores 1 when its result set equals the gold query's: as a multiset, or in order when the
gold query orders its rows; floats compare to 6 decimals.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator, Sequence

from evolve.evaluators.base import Item, SkillTask, Template, first_line

DEPTS = ("sales", "hr", "it", "ops", "legal", "finance")
CITIES = ("paris", "tokyo", "lima", "oslo", "cairo", "perth")
NAMES = (
    "ada alan ben cleo dana eli fay gus hana ivan jon kim lea max nia omar pia quin rosa sam tara uma vic wes "
    "xena yuri zoe abel bea cyd dora emil finn gia hugo iris jade kai lou mia ned ola paz rey sky tom una val"
).split()
SCHEMA = """
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, dept TEXT, city TEXT, age INTEGER, salary INTEGER);
CREATE TABLE departments (name TEXT PRIMARY KEY, floor INTEGER, budget INTEGER);
"""
MAX_STEPS = 200_000  # sqlite VM instructions: far above any reasonable query on this data, far below a hang
# Memory bounds for model-written SQL, which runs in the evolution process: no string or blob above MAX_LENGTH
# bytes can be made (``randomblob(200000000)`` fails instead of allocating), and a result larger than
# MAX_ROWS rows or MAX_RESULT_BYTES is refused while it is fetched. The data's answers are at most 50 short rows.
MAX_LENGTH = 100_000
MAX_ROWS = 1_000
MAX_RESULT_BYTES = 1_000_000

# name -> (level, gold SQL, phrasings). {d} dept, {c} city, {n} {m} numbers.
SPECS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "names_dept": (1, "SELECT name FROM employees WHERE dept = '{d}'", ("List the names of employees in the {d} department.", "Who works in {d}?")),
    "names_city": (1, "SELECT name FROM employees WHERE city = '{c}'", ("List the names of employees who live in {c}.", "Which employees are based in {c}?")),
    "count_older": (1, "SELECT COUNT(*) FROM employees WHERE age > {n}", ("How many employees are older than {n}?", "Count the employees over {n} years old.")),
    "count_paid": (1, "SELECT COUNT(*) FROM employees WHERE salary > {n}", ("How many employees earn more than {n}?", "Count the employees with a salary above {n}.")),
    "max_salary_dept": (1, "SELECT MAX(salary) FROM employees WHERE dept = '{d}'", ("What is the highest salary in {d}?", "Give the top salary of the {d} department.")),
    "avg_age_city": (1, "SELECT AVG(age) FROM employees WHERE city = '{c}'", ("What is the average age of employees in {c}?", "Give the mean age of the staff in {c}.")),
    "names_dept_older": (2, "SELECT name FROM employees WHERE dept = '{d}' AND age > {n}", ("List the employees in {d} who are older than {n}.", "Who in {d} is over {n} years old?")),
    "count_dept_city": (2, "SELECT COUNT(*) FROM employees WHERE dept = '{d}' AND city = '{c}'", ("How many employees of {d} live in {c}?", "Count the {d} staff based in {c}.")),
    "names_age_between": (2, "SELECT name FROM employees WHERE age BETWEEN {n} AND {m}", ("List the employees aged between {n} and {m}.", "Who is from {n} to {m} years old?")),
    "top_paid": (2, "SELECT name FROM employees ORDER BY salary DESC LIMIT {n}", ("List the {n} best paid employees, highest first.", "Who are the top {n} earners, in order?")),
    "per_dept_city": (3, "SELECT dept, COUNT(*) FROM employees WHERE city = '{c}' GROUP BY dept", ("For each department, how many employees live in {c}?", "Count the staff in {c} per department.")),
    "names_budget": (3, "SELECT employees.name FROM employees JOIN departments ON employees.dept = departments.name WHERE departments.budget > {n}", ("List the employees whose department has a budget above {n}.", "Who works in a department with more than {n} of budget?")),
    "depts_avg_salary": (3, "SELECT dept FROM employees GROUP BY dept HAVING AVG(salary) > {n}", ("Which departments pay more than {n} on average?", "List the departments whose mean salary is above {n}.")),
    "city_oldest": (3, "SELECT name FROM employees WHERE city = '{c}' ORDER BY age DESC LIMIT {n}", ("List the {n} oldest employees in {c}, oldest first.", "Who are the {n} eldest staff in {c}, in order?")),
}  # fmt: skip


def build_database(seed: int = 11) -> sqlite3.Connection:
    """The fixed database of the skill world, deterministic from ``seed``, then made read-only."""
    rng = random.Random(seed)
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(SCHEMA)
    for i, name in enumerate(NAMES, 1):
        conn.execute(
            "INSERT INTO employees VALUES (?, ?, ?, ?, ?, ?)",
            (i, name, rng.choice(DEPTS), rng.choice(CITIES), rng.randint(21, 64), rng.randrange(30, 121)),
        )
    for floor, dept in enumerate(DEPTS, 1):
        conn.execute("INSERT INTO departments VALUES (?, ?, ?)", (dept, (floor + 1) // 2, rng.randrange(100, 900)))
    conn.commit()
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_LENGTH)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_LENGTH)
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_read_only)
    return conn


def _read_only(action: int, *args: object) -> int:
    allowed = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION)
    return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY


class DbTask(SkillTask):
    name = "db"
    max_new_tokens = 64

    def __init__(self) -> None:
        super().__init__()
        self.conn = build_database()

    def templates(self) -> Sequence[Template]:
        return [Template(name, level, phrasings) for name, (level, _, phrasings) in SPECS.items()]

    def parameter_space(self, template: Template) -> Iterator[tuple]:
        gold = SPECS[template.name][1]
        depts = DEPTS if "{d}" in gold else ("",)
        cities = CITIES if "{c}" in gold else ("",)
        if "{m}" in gold:
            numbers = [(n, m) for n in range(21, 60) for m in range(n + 3, min(n + 15, 65))]
        elif "{n}" not in gold:
            numbers = [(0, 0)]
        elif "budget" in gold:
            numbers = [(n, 0) for n in range(100, 900, 10)]
        elif "LIMIT" in gold:
            numbers = [(n, 0) for n in range(1, 9)]
        elif "salary" in gold:
            numbers = [(n, 0) for n in range(30, 120)]
        else:
            numbers = [(n, 0) for n in range(21, 64)]
        for d in depts:
            for c in cities:
                for n, m in numbers:
                    params = (d, c, n, m)
                    if self._run(self.render(template, params, "")[1]):
                        yield params

    def render(self, template: Template, params: tuple, phrasing: str) -> tuple[str, str]:
        fields = dict(zip("dcnm", params, strict=True))
        return phrasing.format(**fields), SPECS[template.name][1].format(**fields)

    def _run(self, sql: str) -> list[tuple] | None:
        """Rows of ``sql``, or None for anything that is not one successful read-only query."""
        steps = [0]

        def budget() -> int:
            steps[0] += 1
            return 1 if steps[0] > MAX_STEPS // 1000 else 0

        self.conn.set_progress_handler(budget, 1000)
        rows: list[tuple] = []
        size = 0
        cursor = self.conn.cursor()
        try:
            cursor.execute(sql)
            while batch := cursor.fetchmany(100):
                rows.extend(batch)
                size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for row in batch for v in row)
                if len(rows) > MAX_ROWS or size > MAX_RESULT_BYTES:
                    return None
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
            return None
        finally:
            cursor.close()
            self.conn.set_progress_handler(None, 0)
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]

    def grade(self, items: Sequence[Item], answers: Sequence[str]) -> list[float]:
        scores = []
        for item, answer in zip(items, answers, strict=True):
            want = self._run(item.answer)
            try:
                got = self._run(first_line(answer).rstrip(";"))
            except Exception:  # a grader never raises: whatever SQLite or the driver trips over scores zero
                got = None
            if got is None or want is None:
                scores.append(0.0)
            elif "ORDER BY" in item.answer:
                scores.append(float(got == want))
            else:
                scores.append(float(sorted(got, key=repr) == sorted(want, key=repr)))
        return scores
