"""`cycleqd-serve route-episodes` through the real router: every turn of an episode carries the whole
conversation, the router's session affinity keeps it on the elite the first turn chose, and the episodes are
graded by the task's own checker."""

from __future__ import annotations

import openai
import pytest

from evolve.evaluators import get_skill
from evolve.evaluators.episodes import Action, EpisodeItem, EpisodeTask
from serve.manifest import load_manifest
from serve.route_episodes import RoutedSkill, asker, oracle, route_skill


class Log:
    """An environment that keeps what each turn said."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def step(self, action: Action) -> str:
        self.seen.append(action.content)
        return f"observation {len(self.seen)}"

    def close(self) -> None:
        pass


class ThreeTurns(EpisodeTask):
    """Held-out world tasks as three-turn episodes: passed when every turn was answered by ``want``."""

    name = "code"
    max_turns = 3

    def __init__(self, skill: str, want: str) -> None:
        super().__init__()
        self.skill, self.want = skill, want

    def load_items(self):
        return [
            EpisodeItem(f"{self.skill}{i}", it.prompt, {})
            for i, it in enumerate(get_skill(self.skill).items("test", 6, seed=3))
        ]

    def messages(self, item):
        return [{"role": "user", "content": item.prompt}]

    def parse(self, item, reply):
        return Action("act", reply)

    def open(self, item):
        return Log()

    def grade(self, item, env, final):
        return float(len(env.seen) == 3 and all(s == f"answer from {self.want}" for s in env.seen))

    def gold(self, item):
        return []


@pytest.mark.parametrize(("skill", "elite"), [("code", "coder"), ("db", "querier")])
def test_routed_episodes_stay_on_the_elite_their_first_turn_chose(start_router, upstreams, skill, elite):
    router = start_router()
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0)
    task = ThreeTurns(skill, elite)
    items = task.load_items()
    routed = route_skill(task, items, asker(client, classifier_wait=30, notice=print), concurrency=4)
    assert isinstance(routed, RoutedSkill) and len(routed.transcripts) == len(items)
    assert all(len(e) == 3 for e in routed.elites)  # every turn went through the router
    assert routed.split == 0 and {e for turns in routed.elites for e in turns} == {elite}
    assert routed.score == 1.0
    # each later turn carried the whole conversation so far
    sent = [r for r in upstreams[elite].received if r.get("messages")]
    assert max(len(r["messages"]) for r in sent) == 5


def test_split_episodes_are_counted_and_the_oracle_is_the_best_served_test_score(tmp_path, upstreams):
    from tests.router.conftest import write_manifest

    r = RoutedSkill("os", [], elites=[["a", "a"], ["a", "b"], ["b"]])
    assert r.split == 1
    path = tmp_path / "m.json"
    write_manifest(path, upstreams)
    m = load_manifest(path)
    m.elites[0].test_scores, m.elites[1].test_scores = {"os": 0.5, "db": 0.9}, {"os": 0.7}
    assert oracle(m, ["os", "db", "code"]) == {"os": 0.7, "db": 0.9, "code": None}
