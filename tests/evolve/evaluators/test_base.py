"""Generators are deterministic, splits are disjoint by parameters, answers are extracted from free text."""

from __future__ import annotations

import pytest

from evolve.evaluators import SKILL_NAMES, UnknownSkillError, get_skill
from evolve.evaluators.base import SPLITS, first_line, split_of


@pytest.mark.parametrize("skill", SKILL_NAMES)
def test_items_are_deterministic_per_seed(skill):
    a = get_skill(skill).items("train", 50, seed=3)
    b = get_skill(skill).items("train", 50, seed=3)
    c = get_skill(skill).items("train", 50, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("skill", SKILL_NAMES)
def test_splits_are_disjoint_in_parameters(skill):
    task = get_skill(skill)
    keys = {split: {i.key for i in task.items(split, 2000, seed=0)} for split in SPLITS}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    for split in SPLITS:
        assert all(split_of(k) == split for k in keys[split])


@pytest.mark.parametrize("skill", SKILL_NAMES)
def test_every_level_is_present_in_every_split(skill):
    task = get_skill(skill)
    for split in SPLITS:
        assert task.split_size(split) >= 100
        assert {i.level for i in task.items(split, 300)} == {1, 2, 3}
    assert {i.level for i in task.items("train", 50, levels=[1])} == {1}


@pytest.mark.parametrize("skill", SKILL_NAMES)
def test_gold_answers_score_one_and_junk_zero(skill):
    task = get_skill(skill)
    items = task.items("test", 60, seed=1)
    assert task.grade(items, [i.answer for i in items]) == [1.0] * len(items)
    assert task.grade(items, ["I do not know"] * len(items)) == [0.0] * len(items)
    assert task.grade(items, [""] * len(items)) == [0.0] * len(items)


def test_unknown_skill_names_the_known_ones():
    with pytest.raises(UnknownSkillError, match="code, os, db"):
        get_skill("chess")


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        get_skill("code").items("dev", 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("  lambda x: x + 1  ", "lambda x: x + 1"),
        ("lambda x: x + 1\nThis adds one.", "lambda x: x + 1"),
        ("```python\nlambda x: x + 1\n```", "lambda x: x + 1"),
        ("\n\nAnswer: ls /etc", "ls /etc"),
        ("`sort /etc/app.conf`", "sort /etc/app.conf"),
    ],
)
def test_first_line_extracts_the_answer(text, line):
    assert first_line(text) == line
