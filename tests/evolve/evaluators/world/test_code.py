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
