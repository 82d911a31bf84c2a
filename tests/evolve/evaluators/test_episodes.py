"""Multi-turn episodes: batched turns, observations, endings, grading that never raises, gold trajectories."""

from __future__ import annotations

import re
from typing import ClassVar

import pytest

from evolve.evaluators.base import EvaluatorError, split_of
from evolve.evaluators.episodes import (
    Action,
    EpisodeItem,
    EpisodeTask,
    Transcript,
    run_episodes,
    scripted_policy,
    truncate,
)


class Counter:
    """An environment holding one number; ``add N`` changes it, ``show`` prints it."""

    closed: ClassVar[list[Counter]] = []

    def __init__(self, start: int) -> None:
        self.value = start

    def step(self, action: Action) -> str:
        if action.content == "boom":
            raise RuntimeError("the environment broke")
        if action.content == "flood":
            return "x" * 5000
        m = re.fullmatch(r"add (-?\d+)", action.content)
        if m:
            self.value += int(m.group(1))
            return "ok"
        if action.content == "show":
            return str(self.value)
        return f"unknown command {action.content!r}"

    def close(self) -> None:
        Counter.closed.append(self)


class CounterTask(EpisodeTask):
    """Reach ``target`` from ``start``, then answer the number."""

    name = "counter"
    max_turns = 4
    observation_chars = 100

    def __init__(self, n: int = 200, broken: set[str] | None = None) -> None:
        super().__init__()
        self.n = n
        self.broken = broken or set()

    def load_items(self):
        return [EpisodeItem(f"c{i}", f"Make {i} into {i + 3}.", {"start": i, "target": i + 3}) for i in range(self.n)]

    def messages(self, item):
        return [
            {"role": "system", "content": "Use `act: CMD` or `answer: N`."},
            {"role": "user", "content": item.prompt},
        ]

    def parse(self, item, reply):
        m = re.match(r"\s*(act|answer):\s*(.*)", reply)
        if not m:
            return Action("invalid", f"no action in {reply[:40]!r}")
        return Action("act" if m.group(1) == "act" else "answer", m.group(2).strip())

    def open(self, item):
        if item.id in self.broken:
            raise OSError("cannot build this one")
        return Counter(item.data["start"])

    def grade(self, item, env, final):
        if item.id == "c7":
            raise ValueError("a grader bug")
        return float(env.value == item.data["target"] and final is not None and final.content == str(env.value))

    def gold(self, item):
        return ["act: add 3", f"answer: {item.data['target']}"]


def test_splits_follow_the_stable_hash_of_the_task_id():
    task = CounterTask()
    for split in ("train", "calibration", "validation", "test"):
        for item in task.pool(split):
            assert split_of(f"counter|{item.id}") == split
    assert sum(task.split_size(s) for s in ("train", "calibration", "validation", "test")) == 200
    a = task.episode_items("test", 5, seed=1)
    assert a == task.episode_items("test", 5, seed=1) and len(a) == 5
    assert task.episode_items("test", 10_000) == task.pool("test")


def test_every_live_episode_advances_one_turn_per_policy_call():
    task = CounterTask(n=12)
    items = task.pool("train")[:6] + task.pool("test")[:2]
    calls: list[int] = []
    gold = scripted_policy([task.gold(i) for i in items])

    def policy(indices, conversations):
        calls.append(len(indices))
        return gold(indices, conversations)

    transcripts = run_episodes(task, items, policy)
    assert calls == [len(items), len(items)]  # one call per turn, every episode in it
    assert [t.score for t in transcripts] == [0.0 if i.id == "c7" else 1.0 for i in items]
    t = transcripts[0]
    assert t.status == "answered" and t.turns == 2 and t.answer == str(items[0].data["target"])
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert t.messages[3]["content"] == "ok"


def test_endings_invalid_turn_limit_errors_and_graders_that_raise_are_scored_not_raised():
    Counter.closed.clear()
    task = CounterTask(n=10, broken={"c2"})
    items = [task.by_id()[f"c{i}"] for i in range(6)] + [task.by_id()["c7"]]
    scripts = [
        ["I think it is 5"],  # c0: unparseable -> invalid, scored
        ["act: show"] * 10,  # c1: never answers -> turn limit
        ["act: add 3", "answer: 5"],  # c2: its environment cannot be built -> error, 0
        ["act: boom", "act: add 3", "answer: 6"],  # c3: the environment raises on one action; the episode goes on
        ["act: flood", "act: add 3", "answer: 7"],  # c4: a flood is truncated
        ["answer: 5"],  # c5: answers at once, wrong
        ["act: add 3", "answer: 10"],  # c7: its grader raises
    ]
    out = run_episodes(task, items, scripted_policy(scripts))
    by = {t.item_id: t for t in out}
    assert by["c0"].status == "invalid" and by["c0"].score == 0 and "no action" in by["c0"].error
    assert by["c1"].status == "turn_limit" and by["c1"].turns == task.max_turns and by["c1"].score == 0
    assert by["c2"].status == "error" and "cannot build" in by["c2"].error and by["c2"].turns == 0
    assert by["c3"].score == 1 and "the environment broke" in by["c3"].messages[3]["content"]
    assert by["c4"].score == 1 and len(by["c4"].messages[3]["content"]) < 200
    assert "[truncated: 4900 more characters]" in by["c4"].messages[3]["content"]
    assert by["c5"].score == 0 and by["c5"].status == "answered"
    assert by["c7"].score == 0 and "a grader bug" in by["c7"].error
    assert len(Counter.closed) == 6  # every environment that was opened was closed


def test_a_sandbox_that_cannot_run_here_is_an_error_for_the_user_not_a_zero():
    class NoSandbox(CounterTask):
        def open(self, item):
            raise EvaluatorError("bubblewrap is not installed: apt-get install bubblewrap")

    task = NoSandbox(n=5)
    with pytest.raises(EvaluatorError, match="bubblewrap"):
        run_episodes(task, task.pool("train") or task.pool("test"), scripted_policy([[]] * 5))


def test_evaluate_uses_one_batched_chat_call_per_turn_and_keeps_transcripts():
    task = CounterTask(n=60)

    class Engine:
        calls: ClassVar[list[int]] = []

        def generate_chat(self, conversations, *, max_new_tokens, stop=()):
            self.calls.append(len(conversations))
            out = []
            for conv in conversations:
                start = int(re.search(r"Make (\d+)", conv[1]["content"]).group(1))
                out.append("act: add 3" if len(conv) == 2 else f"answer: {start + 3}")
            return out

    engine = Engine()
    result = task.evaluate(engine, "test", 8, seed=0)
    assert engine.calls == [len(result.scores)] * 2
    assert result.transcripts and all(isinstance(t, Transcript) for t in result.transcripts)
    assert result.quality == pytest.approx(sum(result.scores) / len(result.scores))
    assert result.transcripts[0].to_json()["messages"][-1]["role"] == "assistant"
    assert set(task.last_timings) == {"setup", "generation", "environment", "grading"}
    assert all(v >= 0 for v in task.last_timings.values())


def test_an_engine_without_chat_is_refused_with_the_reason():
    class OldEngine:
        def generate(self, prompts, *, max_new_tokens, chat=False):
            return [""] * len(prompts)

    with pytest.raises(EvaluatorError, match="generate_chat"):
        CounterTask(n=40).evaluate(OldEngine(), "test", 2)


def test_gold_conversations_are_real_replays_that_score():
    task = CounterTask(n=40)
    convs = task.gold_conversations("train", 6)
    wanted = [i for i in task.episode_items("train", 6) if i.id != "c7"]  # c7's grader raises: not kept
    assert len(convs) == len(wanted)
    assert convs[0][2] == {"role": "assistant", "content": "act: add 3"} and convs[0][3]["content"] == "ok"


def test_truncate():
    assert truncate("abc", 5) == "abc"
    assert truncate("abcdef", 2).startswith("ab\n[truncated: 4 more")


def test_a_script_replays_from_its_first_turn_when_the_opening_holds_assistant_turns():
    """AgentBench's openings hold one-shot assistant turns; a replay must not skip the script's first turn."""

    class OneShot(CounterTask):
        def messages(self, item):
            return [*super().messages(item)[:1], {"role": "assistant", "content": "Ok."}, *super().messages(item)[1:]]

    task = OneShot(n=20)
    items = [i for i in task.pool("train") if i.id != "c7"][:3]
    assert [t.score for t in task.replay(items, [task.gold(i) for i in items])] == [1.0] * len(items)


def test_exemplars_are_what_the_router_classifies_the_first_user_message():
    class Instructed(CounterTask):
        def messages(self, item):
            return [{"role": "user", "content": "Shared instruction."}, {"role": "assistant", "content": "Ok."},
                    {"role": "user", "content": item.prompt}]  # fmt: skip

    assert set(Instructed(n=30).exemplars("train", 5)) == {"Shared instruction."}
    assert CounterTask(n=30).exemplars("train", 2)[0].startswith("Make ")
