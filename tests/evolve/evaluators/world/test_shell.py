from __future__ import annotations

import pytest

from evolve.evaluators.world.shell import ShellTask
from evolve.evaluators.world.simshell import Shell


@pytest.fixture(scope="module")
def task():
    return ShellTask()


def _item(task, template):
    return next(i for i in task.items("test", 400) if i.template == template)


def test_equivalent_commands_pass(task):
    item = _item(task, "grep_c")
    f, w, _ = item.params
    answers = [f"grep -c {w} {f}", f"grep {w} {f} | wc -l", f"cat {f} | grep {w} | wc -l", f"grep  -c  '{w}'  {f}"]
    assert task.grade([item] * 4, answers) == [1.0] * 4
    item = _item(task, "head")
    f, _, n = item.params
    assert task.grade([item] * 3, [f"head -{n} {f}", f"cat {f} | head -n {n}", f"head -n{n} {f}"]) == [1.0] * 3


def test_wrong_commands_fail(task):
    item = _item(task, "head")
    f, _, n = item.params
    wrong = [f"head -n {n + 1} {f}", f"tail -n {n} {f}", f"head -n {n} /nope", "rm -rf /", f"head -n {n} {f}; ls", ""]
    assert task.grade([item] * len(wrong), wrong) == [0.0] * len(wrong)


def test_shell_matches_gnu_output():
    sh = Shell({"/d/a.txt": "b\na\nb\n", "/d/e/c.log": "x\n"})
    assert sh.run("sort /d/a.txt | uniq -c").stdout == "      1 a\n      2 b\n"
    assert sh.run("wc -l /d/a.txt").stdout == "3 /d/a.txt\n"
    assert sh.run("cat /d/a.txt | wc -l").stdout == "3\n"
    assert sh.run("find /d -name '*.log'").stdout == "/d/e/c.log\n"
    assert sh.run("find /d -type d").stdout == "/d\n/d/e\n"
    assert sh.run("ls /d").stdout == "a.txt\ne\n"
    assert sh.run("grep -v b /d/a.txt").stdout == "a\n"
    assert sh.run("grep zzz /d/a.txt").status == 1
    assert sh.run("tail -n 1 /d/a.txt").stdout == "b\n"


@pytest.mark.parametrize(
    "line", ["rm -rf /", "ls > /tmp/x", "ls && ls", "$(whoami)", "cat /etc/passwd", "ls 'unclosed"]
)
def test_unsupported_or_dangerous_lines_are_errors(line):
    result = Shell().run(line)
    assert result.status != 0 and result.stdout in ("", "$(whoami)\n")


@pytest.mark.timeout(300)  # a hang guard: RE2 answers in milliseconds, Python's re in hours
def test_model_written_regexes_cannot_backtrack_catastrophically():
    """With Python's re, ``(a*)*b`` against 40 a's and a '!' takes hours; RE2 matches in linear time."""
    sh = Shell()
    assert sh.run("echo " + "a" * 40 + "! | grep '(a*)*b'") == sh.run("echo x | grep b")
    assert sh.run("echo " + "a" * 40 + "b | grep -c '(a*)*b'").stdout == "1\n"


@pytest.mark.parametrize("pattern", [r"'(a)\1'", "'(?=error)'", "'(?<!x)error'"])
def test_patterns_re2_cannot_run_are_grep_errors_with_a_reason(task, pattern):
    result = Shell().run(f"grep {pattern} /var/log/syslog.log")
    assert result.status == 2 and result.stdout == ""
    assert "RE2" in result.error
    item = _item(task, "grep")
    assert task.grade([item], [f"grep {pattern} {item.params[0]}"]) == [0.0]


def test_grep_flags_still_work_on_re2():
    sh = Shell({"/d/a.txt": "Error here\nerrors\nan error.\na.b\n"})
    assert sh.run("grep -i ERROR /d/a.txt").stdout == "Error here\nerrors\nan error.\n"
    assert sh.run("grep -w error /d/a.txt").stdout == "an error.\n"
    assert sh.run("grep -F a.b /d/a.txt").stdout == "a.b\n"
    assert sh.run("grep -c 'err(or)?s$' /d/a.txt").stdout == "1\n"
