"""Generators are deterministic, splits are disjoint by parameters, answers are extracted from free text."""

from __future__ import annotations

import hashlib

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
        assert task.split_size(split) >= (90 if split == "calibration" else 100)
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


#: sha256 of (key, prompt, answer) of 200 items per split and seed, recorded before the calibration split was
#: carved out of train: validation and test must hold exactly the items they held (old run directories and the
#: README's numbers stay comparable).
BEFORE_CALIBRATION = {
    ("code", "validation", 0): "6368eb91927fd9c1", ("code", "validation", 1): "ed136cf47aaafd77",
    ("code", "test", 0): "56a25d1b10357eb8", ("code", "test", 1): "0227d2368606878e",
    ("os", "validation", 0): "2504e47611846d8b", ("os", "validation", 1): "2660fc09cfc36b7d",
    ("os", "test", 0): "a079ad209028ec0b", ("os", "test", 1): "3c425a666743391c",
    ("db", "validation", 0): "cfacfb1f72f45dbf", ("db", "validation", 1): "03882465f5c212fc",
    ("db", "test", 0): "50fb99fcb5fcedc5", ("db", "test", 1): "c84d750aa78eb11d",
}  # fmt: skip
SIZES_BEFORE = {"code": (407, 376), "os": (570, 613), "db": (142, 168)}


def _old_split(key: str) -> str:
    """split_of as it was: cumulative train .7, validation .15, test .15."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    return "train" if h < 0.7 else "validation" if h < 0.85 else "test"


@pytest.mark.parametrize("skill", SKILL_NAMES)
def test_calibration_comes_out_of_train_and_validation_and_test_are_unchanged(skill):
    task = get_skill(skill)
    for (s, split, seed), digest in BEFORE_CALIBRATION.items():
        if s == skill:
            items = task.items(split, 200, seed=seed)
            got = hashlib.sha256(repr([(i.key, i.prompt, i.answer) for i in items]).encode()).hexdigest()[:16]
            assert got == digest, (split, seed)
    assert (task.split_size("validation"), task.split_size("test")) == SIZES_BEFORE[skill]
    # every parameter tuple keeps its split, except that some of train is now calibration
    for t in task.templates():
        for params in task.parameter_space(t):
            key = f"{skill}|{t.name}|{params!r}"
            new, old = split_of(key), _old_split(key)
            assert new == old or (new == "calibration" and old == "train"), key
    cal = task.items("calibration", 300, seed=0)
    assert cal and all(_old_split(i.key) == "train" for i in cal)
