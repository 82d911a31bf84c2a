from __future__ import annotations

import pytest

from evolve.evaluators.world.code import CodeTask


@pytest.fixture(scope="module")
def task():
    return CodeTask()


def _item(task, template):
    return next(i for i in task.items("test", 400) if i.template == template)


@pytest.mark.parametrize(
    ("template", "variants"),
    [
        ("add_mul", ["def f(x): return (x+{a})*{b}", "lambda y: y * {b} + {a} * {b}", "(x + {a}) * {b}"]),
        ("keep_gt", ["lambda xs: list(filter(lambda v: v > {a}, xs))", "def g(xs):\n    return [y for y in xs if y > {a}]"]),
        ("sum_gt", ["lambda xs: sum([v for v in xs if {a} < v])", "```python\nlambda xs: sum(v for v in xs if v > {a})\n```"]),
    ],
)  # fmt: skip
def test_right_answers_written_differently_pass(task, template, variants):
    item = _item(task, template)
    fields = dict(zip("ab", item.params, strict=False))
    answers = [v.format(**fields) for v in variants]
    assert task.grade([item] * len(answers), answers) == [1.0] * len(answers)


def test_wrong_answers_fail(task):
    item = _item(task, "add_mul")
    a, b = item.params
    wrong = [f"lambda x: x + {a} * {b}", f"lambda x: (x + {a + 1}) * {b}", "lambda x: x", "lambda x: (x +", "print(1)"]
    assert task.grade([item] * len(wrong), wrong) == [0.0] * len(wrong)


@pytest.mark.parametrize(
    "answer",
    [
        "Answer: def f(x): return (x - {a}) * {b}",
        "`def f(x): return (x - {a}) * {b}`",
        "```python\ndef f(x):\n    return (x - {a}) * {b}\n```\nThat subtracts, then multiplies.",
    ],
)
def test_one_line_defs_in_any_wrapping_are_graded(task, answer):
    """These raised StopIteration (aborting a whole generation); a grader scores, it never raises."""
    item = _item(task, "sub_mul")
    a, b = item.params
    assert task.grade([item], [answer.format(a=a, b=b)]) == [1.0]
    assert task.grade([item], ["Answer: def f(x): return x"]) == [0.0]


def test_strange_answers_score_zero_without_raising(task):
    item = _item(task, "sub_mul")
    strange = [
        "def",
        "Answer: def",
        "```",
        "`def f(x):`",
        "def f(x):\n",
        "\x00def f(x): return x",
        "\ud800",
        "def é(",
        "",
    ]
    assert task.grade([item] * len(strange), strange) == [0.0] * len(strange)


def test_non_ascii_names_pass_and_homoglyph_tricks_are_refused_with_a_reason(task):
    from evolve.evaluators import sandbox

    item = _item(task, "sub_mul")
    a, b = item.params
    assert task.grade([item], [f"lambda é: (é - {a}) * {b}"]) == [1.0]
    # fullwidth letters: Python reads ｅｖａｌ as eval; refused, and the reason says so
    (outcome,) = sandbox.run([sandbox.Job("lambda x: ｌｅｎ([x])", ("x",), ((1,),))])
    assert not outcome.ok
    assert "look-alike" in outcome.error and "'len'" in outcome.error
