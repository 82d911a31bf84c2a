"""The ``agentbench_db`` skill: AgentBench's DBBench (THUDM/AgentBench, Apache-2.0), multi-turn SQL episodes, each
on a fresh SQLite database built from the item's own table, with AgentBench's prompt, action format and answer
comparison.

**Data.** The DBBench file the CycleQD paper evaluated on (``data_dbbench_standard_dev.jsonl``, as SakanaAI/CycleQD
ships it: AgentBench's ``standard.jsonl`` then its ``dev.jsonl``), vendored unmodified in ``evolve/data/agentbench_db/``
with its licence and ``SOURCE.md``. Each line is one task: its table (name, columns, rows), the question
(``description`` and ``add_description``), its ``type`` (``INSERT``/``UPDATE``/``DELETE``: modify the table; anything
else: answer a question), the gold SQL (``sql.query``; for modification items the ``label``) and the label (the answer
list; for modification items ``answer_md5``, AgentBench's hash of the table after the gold SQL on MySQL).

**Protocol** (AgentBench v0.2's ``src/server/tasks/dbbench``, the text-action version CycleQD ran): the
conversation opens with AgentBench's instruction as a user turn, the agent's ``Ok.`` and the question
(``description + "\\n" + add_description``). A turn is read as AgentBench reads it: ``Action: (.*?)\\n``; if the
action is ``Operation``, the first ```` ```sql ```` block (newlines made spaces) is executed and the rows come back
as the next user turn, ``str(list of row tuples)`` as the MySQL connector's ``fetchall()`` gives them (errors as
the error's text), cut at ``observation_chars`` with AgentBench's ``[TRUNCATED]``; an Operation without a SQL
block is a failed turn (:class:`Action` ``invalid``). Any other turn is an answer if it has
``\\nFinal Answer:(.*)``, else invalid. Grading (never raises):

- question items: AgentBench's comparison of the ``Final Answer`` with the label: the answer read as a list
  literal (``ast.literal_eval`` where AgentBench calls ``eval``; anything else is a one-element list of the raw
  text), then one value each: equal as floats, else as strings; otherwise equal as sets;
- modification items: AgentBench hashes the table after the episode (MD5 of its sorted row hashes) and compares
  with the hash after the gold SQL; here the gold SQL runs on a separate fresh copy of the item's database and
  the two tables' contents are compared (the same multiset-of-rows comparison, without the hash's 5-hex-digit
  row hashes and 1024-byte ``GROUP_CONCAT`` truncation). As in AgentBench the table is graded however the
  episode ended.

**SQLite for MySQL.** Every column is ``TEXT`` as AgentBench creates it, except columns whose every value is a plain
integer (``INTEGER`` affinity, so ``WHERE Pick < 198`` compares numbers as MySQL does); text compares under a MySQL-like
collation (``utf8mb4_0900_ai_ci``: case- and accent-insensitive). Statements go through a small MySQL shim: backslash
escapes in single-quoted strings (``'Don\\'t'``), unquoted identifiers that start with a digit
(``1952_British_Grand_Prix_0``), ``#`` comments and MySQL's ``CONCAT``, ``CONCAT_WS``, ``IF``, ``LEFT``, ``RIGHT``,
``LOCATE``, ``CHAR_LENGTH``, ``LCASE``, ``UCASE`` and ``MD5``. What still differs (``/`` on integers divides as
integers, no ``SHOW``/``DESCRIBE``, errors in SQLite's words) is SQLite's.

**Isolation.** Each episode's database is its own in-memory SQLite connection; a statement has a budget of VM
steps and seconds (a progress handler interrupts it: a runaway recursive CTE costs one turn); an authorizer
denies ``ATTACH``/``DETACH`` (so ``VACUUM INTO`` too), every ``PRAGMA`` but read-only schema introspection,
virtual tables, and ``load_extension``; string sizes and the database's pages are capped.

**Gold control.** The gold SQL replayed as a one-turn trajectory must reproduce the label (question items: its
rows against the label, numbers as numbers; modification items: AgentBench's MySQL hash of the table, computed
here, against ``answer_md5``). Items that do not are excluded from every split, with the reason
(:meth:`AgentBenchDbTask.excluded`); for the vendored file the list is ``excluded.json`` next to the data,
rewritten by ``python -m evolve.evaluators.agentbench_db --write`` (a test recomputes and compares it). Of the
360 vendored items 281 pass: 239 of the 240 modifications, 42 of the 120 questions (most question items' gold
SQL is invalid in MySQL too: keywords run together, names with spaces unquoted, tables that do not exist; or
their label disagrees with their own table, whose rows were extended after the label was written).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sqlite3
import time
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolve.evaluators.base import EvaluatorError
from evolve.evaluators.episodes import Action, EpisodeItem, EpisodeTask, Message
from evolve.evaluators.specs import AgentBenchDbSpec

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "agentbench_db"
DEFAULT_PATH = DATA_DIR / "data_dbbench_standard_dev.jsonl"
EXCLUDED_PATH = DATA_DIR / "excluded.json"

#: AgentBench's instruction (``big_prompt`` of v0.2's ``src/server/tasks/dbbench/__init__.py``), verbatim.
PROMPT = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""  # noqa: E501 - verbatim
#: The agent's reply to the instruction, as AgentBench injects it.
ACK = "Ok."
#: Item types whose answer is the table's state (AgentBench's list).
MODIFYING = ("INSERT", "DELETE", "UPDATE")
#: AgentBench's cut of a long result (its ``Container.execute``).
TRUNCATED = "[TRUNCATED]"

_ACTION = re.compile(r"Action: (.*?)\n")
_SQL = re.compile(r"```sql\n([\s\S]*?)\n```")
_FINAL = re.compile(r"\nFinal Answer:(.*)")

#: VM steps one statement may take (a query on an item's table takes thousands; checked every ``_EVERY``).
MAX_STEPS = 20_000_000
#: Wall-clock seconds one statement may take (the backstop of the step budget).
MAX_SECONDS = 5.0
_EVERY = 1000
#: Longest string or blob a statement may build, and longest statement.
MAX_LENGTH = 100_000
MAX_SQL_LENGTH = 100_000
#: Pages (4 KiB) the episode's database may grow to.
MAX_PAGES = 8192
#: Read-only schema introspection is the only PRAGMA a model may run.
_PRAGMAS = frozenset({"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo"})
_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
_COLLATION = "mysql_ci"


# -- AgentBench's action format and comparison -------------------------------------------------------------------
def parse_reply(reply: str) -> Action:
    """One agent turn read as AgentBench reads it; never raises."""
    if not isinstance(reply, str):
        return Action("invalid", f"not text: {type(reply).__name__}")
    action = _ACTION.search(reply)
    if action and action.group(1) == "Operation":
        block = _SQL.search(reply)
        if not block:
            return Action("invalid", "Action: Operation without a ```sql block")
        sql = block.group(1).strip().replace("\n", " ")
        if not sql:
            return Action("invalid", "Action: Operation with an empty ```sql block")
        return Action("act", sql)
    final = _FINAL.search(reply)
    if final:
        return Action("answer", final.group(1))
    return Action("invalid", "neither Action: Operation with a ```sql block nor a Final Answer line")


def answer_list(answer: str) -> list[Any]:
    """AgentBench's reading of a Final Answer: ``list(eval(answer))``, else ``[answer]`` (``literal_eval`` here:
    model text is never evaluated)."""
    try:
        return list(ast.literal_eval(answer))
    except Exception:  # what AgentBench's bare except catches: anything that is not a list literal
        return [answer]


def compare_answer(answer: str, label: Sequence[Any]) -> bool:
    """AgentBench's comparison of a Final Answer with a question item's label (its ``metrics``)."""
    ans = answer_list(answer)
    cor = list(label)
    if len(ans) == 1 and len(cor) == 1:
        try:
            return float(ans[0]) == float(cor[0])
        except (ValueError, TypeError, OverflowError):
            return bool(ans[0] == cor[0])
    try:
        return set(ans) == set(cor)
    except TypeError:  # unhashable elements: AgentBench counts it wrong
        return False


def mysql_table_hash(rows: Sequence[Sequence[Any]]) -> str:
    """What AgentBench's hash query returns on MySQL for a table of ``rows``, as ``str(fetchall())``::

    select md5(group_concat(rowhash order by rowhash)) as hash
    from (SELECT substring(MD5(CONCAT_WS(',', cols...)), 1, 5) AS rowhash FROM t) as sub

    (``CONCAT_WS`` skips NULLs; ``GROUP_CONCAT`` joins with ``,`` and stops at 1024 bytes; no rows: NULL)."""
    hashes = sorted(
        hashlib.md5(",".join(_mysql_text(v) for v in row if v is not None).encode(), usedforsecurity=False).hexdigest()[
            :5
        ]
        for row in rows
    )
    if not hashes:
        return "[(None,)]"
    joined = ",".join(hashes).encode()[:1024]
    return str([(hashlib.md5(joined, usedforsecurity=False).hexdigest(),)])


def _mysql_text(v: Any) -> str:
    """A value as MySQL's TEXT column holds it (AgentBench inserts ``str(value)``)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


# -- the database ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """One table of an item: its name, column names and rows (values as the benchmark file has them)."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


def quote(name: str) -> str:
    """An SQLite identifier, whatever its characters."""
    return '"' + name.replace('"', '""') + '"'


_PLAIN_INT = re.compile(r"0|-?[1-9][0-9]{0,17}")


def column_type(values: Sequence[Any]) -> str:
    """``INTEGER`` for a column whose every value is a plain integer (stored and shown the same either way, and
    compared with numbers as numbers, as MySQL compares a TEXT column with a number); else ``TEXT``, as
    AgentBench creates every column."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int | str) and _PLAIN_INT.fullmatch(str(v)) for v in present):
        return "INTEGER"
    return "TEXT"


def _fold(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).casefold()


_FOLDED: dict[str, str] = {}


def _mysql_ci(a: str, b: str) -> int:
    """MySQL's default collation, near enough: case- and accent-insensitive, no padding."""
    fa = _FOLDED.get(a)
    if fa is None:
        fa = _fold(a)
        if len(a) < 256 and len(_FOLDED) < 100_000:
            _FOLDED[a] = fa
    fb = _FOLDED.get(b)
    if fb is None:
        fb = _fold(b)
        if len(b) < 256 and len(_FOLDED) < 100_000:
            _FOLDED[b] = fb
    return (fa > fb) - (fa < fb)


def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA:
        return sqlite3.SQLITE_OK if (arg1 or "").lower() in _PRAGMAS else sqlite3.SQLITE_DENY
    if action in (sqlite3.SQLITE_CREATE_VTABLE, sqlite3.SQLITE_DROP_VTABLE):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


# MySQL functions SQLite lacks (NULL in, NULL out, as MySQL's).
def _concat(*args: Any) -> str | None:
    return None if any(a is None for a in args) else "".join(_mysql_text(a) for a in args)


def _concat_ws(sep: Any, *args: Any) -> str | None:
    return None if sep is None else _mysql_text(sep).join(_mysql_text(a) for a in args if a is not None)


def _if(cond: Any, a: Any, b: Any) -> Any:
    try:
        return a if cond is not None and float(cond) != 0 else b
    except (TypeError, ValueError):
        return b


def _left(s: Any, n: Any) -> str | None:
    return None if s is None or n is None else _mysql_text(s)[: max(0, int(n))]


def _right(s: Any, n: Any) -> str | None:
    if s is None or n is None:
        return None
    n = int(n)
    return _mysql_text(s)[-n:] if n > 0 else ""


def _locate(sub: Any, s: Any, pos: Any = 1) -> int | None:
    if sub is None or s is None or pos is None:
        return None
    start = max(0, int(pos) - 1)
    return _mysql_text(s).lower().find(_mysql_text(sub).lower(), start) + 1


def _char_length(s: Any) -> int | None:
    return None if s is None else len(_mysql_text(s))


def _lcase(s: Any) -> str | None:
    return None if s is None else _mysql_text(s).lower()


def _ucase(s: Any) -> str | None:
    return None if s is None else _mysql_text(s).upper()


def _md5(s: Any) -> str | None:
    return None if s is None else hashlib.md5(_mysql_text(s).encode(), usedforsecurity=False).hexdigest()


_FUNCTIONS: tuple[tuple[str, int, Any], ...] = (
    ("CONCAT", -1, _concat),
    ("CONCAT_WS", -1, _concat_ws),
    ("IF", 3, _if),
    ("MYSQL_LEFT", 2, _left),
    ("MYSQL_RIGHT", 2, _right),
    ("LOCATE", 2, _locate),
    ("LOCATE", 3, _locate),
    ("CHAR_LENGTH", 1, _char_length),
    ("CHARACTER_LENGTH", 1, _char_length),
    ("LCASE", 1, _lcase),
    ("UCASE", 1, _ucase),
    ("MD5", 1, _md5),
)

_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "%": "\\%", "_": "\\_"}
_DIGITS = frozenset("0123456789")
_NUMBER = re.compile(r"(?:0x[0-9A-Fa-f]+|0b[01]+|[0-9]+(?:[eE][+-]?[0-9]+)?)")


def mysql_to_sqlite(sql: str) -> str:
    """The MySQL that SQLite would read differently, rewritten: backslash escapes in ``'...'`` strings and bare
    identifiers that start with a digit (``1952_results``). Everything else (``"..."``, `````...`````, ``[...]``,
    comments) is passed through; never raises."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'":
            j, chars, closed = i + 1, [], False
            while j < n:
                d = sql[j]
                if d == "\\" and j + 1 < n:
                    e = sql[j + 1]
                    chars.append(_MYSQL_ESCAPES.get(e, e))
                    j += 2
                elif d == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        chars.append("'")
                        j += 2
                    else:
                        closed = True
                        j += 1
                        break
                else:
                    chars.append(d)
                    j += 1
            if not closed:  # an unterminated string: let SQLite say so
                out.append(sql[i:])
                break
            out.append(_sqlite_string("".join(chars)))
            i = j
        elif c in '"`[':
            end = {'"': '"', "`": "`", "[": "]"}[c]
            j = i + 1
            while j < n:
                if sql[j] == end:
                    if end != "]" and j + 1 < n and sql[j + 1] == end:
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i : j + 1])
            i = j + 1
        elif (c == "-" and sql.startswith("--", i)) or (c == "/" and sql.startswith("/*", i)):
            j = sql.find("\n" if c == "-" else "*/", i + 2)
            j = n if j < 0 else j + (1 if c == "-" else 2)
            out.append(sql[i:j])
            i = j
        elif c == "#":  # a MySQL comment, to the end of the line
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif c in _DIGITS and not (i and (sql[i - 1].isalnum() or sql[i - 1] in "_$.")):
            j = i
            while j < n and (sql[j].isalnum() or sql[j] in "_$"):
                j += 1
            word = sql[i:j]
            if _NUMBER.fullmatch(word) or (word[-1] in "eE" and j < n and sql[j] in "+-"):
                out.append(word)  # a number (1e+5's "1e" continues with its exponent)
            else:
                out.append("`" + word + "`")
            i = j
        elif c.isalpha() or c in "_$":
            j = i
            while j < n and (sql[j].isalnum() or sql[j] in "_$"):
                j += 1
            word = sql[i:j]
            if word.upper() in ("LEFT", "RIGHT") and sql[j:].lstrip().startswith("("):
                word = "MYSQL_" + word.upper()  # MySQL's LEFT(s, n): SQLite's grammar has LEFT only in joins
            out.append(word)
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _sqlite_string(s: str) -> str:
    parts = s.split("\0")
    quoted = ["'" + p.replace("'", "''") + "'" for p in parts]
    return quoted[0] if len(quoted) == 1 else "(" + "||char(0)||".join(quoted) + ")"


class Database:
    """One episode's SQLite database: the item's tables, the MySQL collation and functions, an authorizer and a
    budget for every statement. Built trusted, then locked down before any statement of a model runs."""

    def __init__(
        self,
        tables: Sequence[Table],
        *,
        max_steps: int = MAX_STEPS,
        max_seconds: float = MAX_SECONDS,
        max_chars: int = MAX_LENGTH,
    ) -> None:
        self.tables = tuple(tables)
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        #: An observation's fetching stops once its text is longer than this (the model sees less anyway).
        self.max_chars = max_chars
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            conn.create_collation(_COLLATION, _mysql_ci)
            for name, nargs, fn in _FUNCTIONS:
                conn.create_function(name, nargs, fn, deterministic=True)
            conn.execute(f"PRAGMA max_page_count = {MAX_PAGES}")
            conn.execute("PRAGMA temp_store = MEMORY")
            for t in self.tables:
                self._create(conn, t)
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_LENGTH)
            conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_LENGTH)
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.set_authorizer(_authorize)
        except BaseException:
            conn.close()
            raise
        self.conn: sqlite3.Connection | None = conn

    @staticmethod
    def _create(conn: sqlite3.Connection, t: Table) -> None:
        width = len(t.columns)
        for k, row in enumerate(t.rows, 1):
            if len(row) != width:
                raise ValueError(f"table {t.name!r}: row {k} has {len(row)} values for {width} columns")
        defs = []
        for j, col in enumerate(t.columns):
            typ = column_type([row[j] for row in t.rows])
            defs.append(f"{quote(col)} {typ}" + (f" COLLATE {_COLLATION}" if typ == "TEXT" else ""))
        conn.execute(f"CREATE TABLE {quote(t.name)} ({', '.join(defs)})")
        marks = ", ".join("?" * width)
        conn.executemany(
            f"INSERT INTO {quote(t.name)} VALUES ({marks})",  # noqa: S608 - a quoted name; values are bound
            [tuple(None if v is None else str(v) for v in row) for row in t.rows],
        )

    def run(self, sql: str) -> tuple[list[tuple] | None, str]:
        """Execute one statement (through the MySQL shim) within the budget: its rows (None on an error) and
        what AgentBench would show (``str(rows)``, or the error's text); fetching stops past ``max_chars``."""
        if self.conn is None:
            return None, "the database is closed"
        conn = self.conn
        self._budget()
        cursor = conn.cursor()
        rows: list[tuple] = []
        try:
            cursor.execute(mysql_to_sqlite(sql))
            size = 2
            while batch := cursor.fetchmany(64):
                rows.extend(batch)
                size += sum(len(repr(r)) + 2 for r in batch)
                if size > self.max_chars:
                    break
        except sqlite3.OperationalError as exc:
            if str(exc) == "interrupted":
                return None, (
                    f"Error: the statement was stopped: it ran past its budget ({self.max_steps} steps, "
                    f"{self.max_seconds:g} s)"
                )
            return None, str(exc)
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError, UnicodeError) as exc:
            return None, str(exc) or type(exc).__name__
        finally:
            cursor.close()
            conn.set_progress_handler(None, 0)
        return rows, str(rows)

    def _budget(self) -> None:
        """Arm the step and time budget for the next statement (disarmed when it is done)."""
        assert self.conn is not None
        steps = [0]
        deadline = time.monotonic() + self.max_seconds

        def budget() -> int:
            steps[0] += _EVERY
            return 1 if steps[0] > self.max_steps or time.monotonic() > deadline else 0

        self.conn.set_progress_handler(budget, _EVERY)

    def contents(self) -> dict[str, Counter | None]:
        """Each of the item's tables as a multiset of rows (its original columns, values as text); None for a
        table that is gone or has lost a column."""
        return {t.name: _multiset(rows) if (rows := self.table_rows(t)) is not None else None for t in self.tables}

    def table_rows(self, t: Table) -> list[tuple] | None:
        """The rows of one of the item's tables, its original columns (within the budget: a model may have made
        the name a view of anything); None when it cannot be read."""
        if self.conn is None:
            return None
        cols = ", ".join(quote(c) for c in t.columns)
        self._budget()
        try:
            return self.conn.execute(f"SELECT {cols} FROM main.{quote(t.name)}").fetchall()  # noqa: S608 - quoted
        except (sqlite3.Error, MemoryError):
            return None
        finally:
            self.conn.set_progress_handler(None, 0)

    def mysql_hash(self) -> str:
        """AgentBench's MySQL hash of the item's table(s) as they stand (its v0.2 value for one table, the
        sorted ``_``-joined hashes for several)."""
        hashes = []
        for t in self.tables:
            rows = self.table_rows(t)
            hashes.append(mysql_table_hash(rows) if rows is not None else "error")
        if len(hashes) == 1:
            return hashes[0]
        return "_".join(sorted(h.strip("[]()").split(",")[0].strip().strip("'") for h in hashes))

    # -- the Environment protocol --------------------------------------------------------------------------
    def step(self, action: Action) -> str:
        return self.run(action.content)[1]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _multiset(rows: Sequence[Sequence[Any]]) -> Counter:
    return Counter(tuple(v if v is None or isinstance(v, str | bytes) else _mysql_text(v) for v in r) for r in rows)


# -- the benchmark file ------------------------------------------------------------------------------------------
def _tables(obj: Any, where: str) -> tuple[Table, ...]:
    raw = obj if isinstance(obj, list) else [obj]
    if not raw:
        raise EvaluatorError(f'{where}: "table" is an empty list')
    tables = []
    for t in raw:
        if not isinstance(t, dict) or not isinstance(t.get("table_name"), str) or not t["table_name"]:
            raise EvaluatorError(f'{where}: "table" needs "table_name" (a non-empty string) and "table_info"')
        info = t.get("table_info")
        if not isinstance(info, dict) or not isinstance(info.get("columns"), list) or not info["columns"]:
            raise EvaluatorError(f'{where}: table {t["table_name"]!r} needs "table_info": {{"columns": [...], ...}}')
        if any(not isinstance(c, dict) or not isinstance(c.get("name"), str) for c in info["columns"]):
            raise EvaluatorError(f'{where}: table {t["table_name"]!r}: every column needs a "name" (a string)')
        rows = info.get("rows", [])
        if not isinstance(rows, list) or any(not isinstance(r, list) for r in rows):
            raise EvaluatorError(f'{where}: table {t["table_name"]!r}: "rows" must be a list of lists')
        if any(v is not None and not isinstance(v, str | int | float) for r in rows for v in r):
            raise EvaluatorError(f"{where}: table {t['table_name']!r}: row values must be strings, numbers or null")
        tables.append(
            Table(
                t["table_name"],
                tuple(c["name"] for c in info["columns"]),
                tuple(tuple(r) for r in rows),
            )
        )
    return tuple(tables)


def item_id(entry: Mapping[str, Any]) -> str:
    """A task's stable id: a hash of what it asks of which table (DBBench items have no id of their own, and the
    line number would move an item's split when the file is reordered)."""
    table = entry["table"]
    names = [t.get("table_name") for t in table] if isinstance(table, list) else [table.get("table_name")]
    key = json.dumps([entry.get("description"), entry.get("add_description"), entry.get("type"), names])
    return "db-" + hashlib.blake2b(key.encode(), digest_size=5).hexdigest()


def read_items(path: Path) -> list[EpisodeItem]:
    """Every task of a DBBench-format ``.jsonl``; a malformed line is an :class:`EvaluatorError` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluatorError(f"{path}: cannot read it ({exc})") from exc
    items: list[EpisodeItem] = []
    seen: Counter = Counter()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluatorError(f"{where}: not valid JSON ({exc.msg}); each line must be one DBBench task") from exc
        if not isinstance(entry, dict):
            raise EvaluatorError(f"{where}: a JSON {type(entry).__name__}, expected a DBBench task object")
        if not isinstance(entry.get("description"), str) or not entry["description"].strip():
            raise EvaluatorError(f'{where}: no "description" (the question, a non-empty string)')
        if not isinstance(entry.get("add_description", ""), str):
            raise EvaluatorError(f'{where}: "add_description" must be a string')
        typ = entry.get("type")
        if not isinstance(typ, list) or not typ or not isinstance(typ[0], str):
            raise EvaluatorError(f'{where}: "type" must be a list whose first element names the task type')
        if "table" not in entry:
            raise EvaluatorError(f'{where}: no "table" (the table the task runs on)')
        tables = _tables(entry["table"], where)
        label = entry.get("label")
        if not isinstance(label, list):
            raise EvaluatorError(f'{where}: "label" must be a list (the answers, or the gold SQL of a modification)')
        modifying = typ[0] in MODIFYING
        if modifying:
            gold_sql = label[0] if label and isinstance(label[0], str) else None
            md5 = entry.get("answer_md5")
            if md5 is not None and not isinstance(md5, str):
                raise EvaluatorError(f'{where}: "answer_md5" must be a string')
        else:
            if any(isinstance(v, dict | list) for v in label):
                raise EvaluatorError(f'{where}: the "label" of a question must be a list of strings or numbers')
            sql = entry.get("sql")
            if sql is not None and not (isinstance(sql, dict) and isinstance(sql.get("query"), str)):
                raise EvaluatorError(f'{where}: "sql" must be {{"query": "..."}}')
            gold_sql = sql["query"] if sql else None
            md5 = None
        prompt = entry["description"] + "\n" + entry.get("add_description", "")
        iid = item_id(entry)
        seen[iid] += 1
        if seen[iid] > 1:
            iid = f"{iid}-{seen[iid]}"
        data = {
            "line": n,
            "index": len(items),
            "type": typ[0],
            "modifying": modifying,
            "tables": tables,
            "label": tuple(label),
            "gold_sql": gold_sql.strip().replace("\n", " ") if gold_sql else None,
            "answer_md5": md5,
        }
        items.append(EpisodeItem(iid, prompt, data))
    if not items:
        raise EvaluatorError(f"{path}: no DBBench task in it")
    return items


# -- gold control --------------------------------------------------------------------------------------------------
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _value_key(v: Any) -> tuple[str, Any]:
    """A result value or label as the gold control compares them: numbers as numbers (``1``, ``'1.0'`` and
    ``'1,000'`` style agree), NULL as ``none`` (the labels' word for no answer), other text as text."""
    if v is None:
        return ("s", "none")
    s = _mysql_text(v).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        f = float(s)
    except ValueError:
        return ("s", s)
    return ("n", round(f, 6)) if f == f else ("s", s)


def rows_match_label(rows: Sequence[Sequence[Any]], label: Sequence[Any]) -> bool:
    """Whether the gold SQL's rows give the label: the values of every row against the label's, as sets; no rows
    stands for ``["none"]``."""
    values = [v for r in rows for v in r]
    if not values:
        values = [None]
    return {_value_key(v) for v in values} == {_value_key(v) for v in label}


_RESERVED = frozenset({"TABLE", "SELECT", "FROM", "WHERE", "ORDER", "GROUP", "BY", "INDEX", "KEY", "RANK"})


def _kind_of(sql: str, error: str, tables: Sequence[Table]) -> str:
    """What is wrong with a gold SQL that SQLite rejects, where it is plain (these fail on MySQL too)."""
    if re.search(r"[a-z0-9)`'\"\]](FROM|WHERE|LIMIT|ORDER BY|GROUP BY)\b|\b(DESC|ASC)LIMIT\b", sql):
        return "keywords run together, invalid in MySQL too"
    names = [n for t in tables for n in (t.name, *t.columns) if " " in n.strip()]
    if any(re.search(r"(?<![`\"'\[])" + re.escape(n) + r"(?![`\"'\]])", sql) for n in names):
        return "a name with spaces left unquoted, invalid in MySQL too"
    if error.startswith("no such table"):
        return "a table the item does not have, invalid in MySQL too"
    if error.startswith("no such column"):
        return "a column the table does not have, invalid in MySQL too"
    if error.startswith("no such function"):
        return "a function MySQL does not have either"
    near = re.match(r'near "(\w+)": syntax error', error)
    if near and near.group(1).upper() in _RESERVED:
        return f"the reserved word {near.group(1)} used as a name, invalid in MySQL too"
    return "SQLite cannot read it"


def check_gold(item: EpisodeItem) -> str | None:
    """Why replaying ``item``'s gold SQL on SQLite does not reproduce its label; None when it does."""
    d = item.data
    sql = d["gold_sql"]
    if not sql:
        return "no gold SQL to replay"
    try:
        db = Database(d["tables"])
    except (ValueError, sqlite3.Error) as exc:
        return f"the table cannot be built ({exc}; MySQL rejects it too)"
    try:
        rows, text = db.run(sql)
        if rows is None:
            return f"the gold SQL fails on SQLite ({text}; {_kind_of(sql, text, d['tables'])}): {sql}"
        if d["modifying"]:
            if d["answer_md5"] is None:
                return None
            got = db.mysql_hash()
            if got != d["answer_md5"]:
                return (
                    f"the table after the gold SQL hashes to {got}, not AgentBench's answer_md5 {d['answer_md5']} "
                    f"(the gold state on MySQL differs): {sql}"
                )
            return None
        if not rows_match_label(rows, d["label"]):
            return f"the gold SQL gives {_short(text)}, not the label {list(d['label'])!r}: {sql}"
        return None
    finally:
        db.close()


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def gold_control(items: Sequence[EpisodeItem]) -> tuple[list[str], dict[str, str]]:
    """Replay every item's gold SQL: the ids that reproduce their labels, and why each other one does not."""
    passed: list[str] = []
    reasons: dict[str, str] = {}
    for item in items:
        why = check_gold(item)
        if why is None:
            passed.append(item.id)
        else:
            reasons[item.id] = f"line {item.data['line']} ({item.data['type']}): {why}"
    return passed, reasons


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def exclusions_of(path: Path = DEFAULT_PATH) -> dict[str, Any]:
    """The exclusion list of a DBBench file as ``excluded.json`` holds it."""
    items = read_items(path)
    passed, reasons = gold_control(items)
    return {
        "data": path.name,
        "sha256": file_digest(path),
        "items": len(items),
        "usable": len(passed),
        "excluded": reasons,
    }


def write_exclusions(path: Path = DEFAULT_PATH, out: Path = EXCLUDED_PATH) -> dict[str, Any]:
    """Recompute the gold control of ``path`` and write it to ``out`` (``python -m evolve.evaluators.agentbench_db
    --write``)."""
    doc = exclusions_of(path)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return doc


def _shipped_exclusions(path: Path) -> dict[str, str] | None:
    """``excluded.json``'s list when it was computed from exactly this file, else None (recompute)."""
    if path.resolve() != DEFAULT_PATH.resolve() or not EXCLUDED_PATH.is_file():
        return None
    try:
        doc = json.loads(EXCLUDED_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("sha256") != file_digest(path) or not isinstance(doc.get("excluded"), dict):
        return None
    return {str(k): str(v) for k, v in doc["excluded"].items()}


# -- the skill ---------------------------------------------------------------------------------------------------
class AgentBenchDbTask(EpisodeTask):
    """AgentBench's DBBench as an episode skill (see the module's docstring)."""

    def __init__(self, name: str, spec: AgentBenchDbSpec | None = None) -> None:
        super().__init__()
        spec = spec or AgentBenchDbSpec(kind="agentbench_db")
        self.name = name
        self.spec = spec
        self.path = Path(spec.path) if spec.path is not None else DEFAULT_PATH
        self.max_turns = spec.max_turns
        self.max_new_tokens = spec.max_new_tokens
        self.observation_chars = spec.observation_chars
        self.workers = spec.workers
        if not self.path.is_file():
            raise EvaluatorError(f"skills.{name}.path: {self.path}: no such DBBench .jsonl")
        self.all_items = read_items(self.path)
        shipped = _shipped_exclusions(self.path)
        self._excluded = shipped if shipped is not None else gold_control(self.all_items)[1]
        self._gold_states: dict[str, dict[str, Counter | None] | None] = {}

    # -- EpisodeTask ------------------------------------------------------------------------------------------
    def load_items(self) -> list[EpisodeItem]:
        return [i for i in self.all_items if i.id not in self._excluded]

    def excluded(self) -> dict[str, str]:
        return dict(self._excluded)

    def gold_control(self) -> tuple[list[str], dict[str, str]]:
        """Recompute the gold control over every item of the file (excluded ones too)."""
        return gold_control(self.all_items)

    def messages(self, item: EpisodeItem) -> list[Message]:
        return [
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": ACK},
            {"role": "user", "content": item.prompt},
        ]

    def parse(self, item: EpisodeItem, reply: str) -> Action:
        return parse_reply(reply)

    def observe(self, item: EpisodeItem, action: Action, observation: str) -> Message:
        if len(observation) > self.observation_chars:
            observation = observation[: self.observation_chars] + TRUNCATED
        return {"role": "user", "content": observation}

    def open(self, item: EpisodeItem) -> Database:
        return Database(item.data["tables"], max_chars=self.observation_chars + 16)

    def grade(self, item: EpisodeItem, env: Any, final: Action | None) -> float:
        try:
            if item.data["modifying"]:
                want = self._gold_state(item)
                if want is None:
                    return 0.0
                got = env.contents()
                return 1.0 if got == want and all(v is not None for v in got.values()) else 0.0
            answer = final.content if final is not None and final.kind == "answer" else ""
            return 1.0 if compare_answer(answer, item.data["label"]) else 0.0
        except Exception:  # a grader never raises: it scores
            return 0.0

    def gold(self, item: EpisodeItem) -> list[str]:
        d = item.data
        turns = []
        if d["gold_sql"]:
            turns.append(f"Action: Operation\n```sql\n{d['gold_sql']}\n```")
        final = ["none"] if d["modifying"] else list(d["label"])
        turns.append("Action: Answer\nFinal Answer: " + json.dumps(final, ensure_ascii=False))
        return turns

    # -- grading ------------------------------------------------------------------------------------------------
    def _gold_state(self, item: EpisodeItem) -> dict[str, Counter | None] | None:
        """The item's tables after its gold SQL, on a fresh copy of its database (cached)."""
        if item.id in self._gold_states:
            return self._gold_states[item.id]
        state = None
        if item.data["gold_sql"]:
            db = Database(item.data["tables"])
            try:
                rows, _ = db.run(item.data["gold_sql"])
                if rows is not None:
                    state = db.contents()
            finally:
                db.close()
        self._gold_states[item.id] = state
        return state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evolve.evaluators.agentbench_db",
        description="Replay every DBBench item's gold SQL on SQLite and report (or write) the exclusion list.",
    )
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH, help="a DBBench .jsonl (default: vendored)")
    parser.add_argument("--write", action="store_true", help=f"write the list to {EXCLUDED_PATH.name} (vendored file)")
    args = parser.parse_args(argv)
    if args.write:
        if args.path.resolve() != DEFAULT_PATH.resolve():
            parser.error("--write is for the vendored file only")
        doc = write_exclusions(args.path)
    else:
        doc = exclusions_of(args.path)
    print(f"{doc['usable']}/{doc['items']} items reproduce their labels; excluded:")
    for reason in doc["excluded"].values():
        print("  " + reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
