"""AgentBench's OS interaction (``agentbench_os``): the vendored tasks load, episodes run and are graded as
AgentBench grades them, the gold control reproduces the shipped exclusion list, doing nothing scores 0, a bad
turn scores 0 without raising, and episodes leave nothing behind and cannot see each other."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from evolve.evaluators import os_sandbox
from evolve.evaluators.agentbench_os import (
    DATA_DIR,
    EMPTY_OUTPUT,
    KNOWN_BROKEN,
    ONE_SHOT,
    OUTPUT_PREFIX,
    PROMPT,
    TRUNCATED,
    AgentBenchOsTask,
    extract_action,
    read_tasks,
    static_reason,
)
from evolve.evaluators.base import EvaluatorError
from evolve.evaluators.episodes import Action
from evolve.evaluators.registry import build
from evolve.evaluators.specs import AgentBenchOsSpec

WHY_NOT = os_sandbox.available(privileged=True)
needs_sandbox = pytest.mark.skipif(WHY_NOT is not None, reason=f"no privileged OS sandbox here: {WHY_NOT}")


def shipped_excluded() -> dict[str, str]:
    return json.loads((DATA_DIR / "excluded.json").read_text())["excluded"]


def bash(code: str) -> str:
    return f"Think: run it.\n\nAct: bash\n\n```bash\n{code}\n```"


@pytest.fixture(scope="module")
def task() -> AgentBenchOsTask:
    return AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", workers=4))


def write_tasks(root: Path, tasks: object, scripts: dict[str, str] | None = None) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "dev.json").write_text(tasks if isinstance(tasks, str) else json.dumps(tasks))
    for rel, text in (scripts or {}).items():
        path = root / "scripts" / "dev" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# -- data, no sandbox needed ---------------------------------------------------------------------------------


def test_vendored_tasks_load_with_stable_ids_and_licence():
    items = read_tasks(DATA_DIR)
    assert len(items) == 170  # AgentBench's os-dev (26) and os-std (144)
    ids = [i.id for i in items]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "os/dev/0" and "os/4/Q47/0" in ids and ids[-1] == "os/7/bootstrap/87"
    assert "Apache License" in (DATA_DIR / "LICENSE").read_text()
    assert "578c5e9f706fc2dd96188ca6c8cf9095ca0c6528" in (DATA_DIR / "SOURCE.md").read_text()
    by_id = {i.id: i for i in items}
    q47 = by_id["os/4/Q47/0"].data
    assert q47["start"] == ("bash", "mkdir /home/user2 && cd /home/user2")
    assert [s[0] for s in q47["check"]] == ["python", "bash", "bash"]
    stock = by_id["os/1/stock/0"].data
    assert stock["check"][0] is None and stock["check"][1][0] == "python"  # null: the example runs there
    assert "int(argv[1]) == int(argv[2])" in stock["check"][1][1]  # integer-match.py, read from scripts/1/


def test_excluded_json_holds_every_static_and_known_reason():
    shipped = shipped_excluded()
    for item in read_tasks(DATA_DIR):
        why = KNOWN_BROKEN.get(item.id) or static_reason(item.data)
        if why:
            assert shipped.get(item.id) == why, item.id
    doc = json.loads((DATA_DIR / "excluded.json").read_text())
    assert doc["total"] == 170 and doc["passed"] == 170 - len(shipped)


def test_splits_leave_out_the_excluded_tasks(task):
    usable = task.load_items()
    assert len(usable) == 170 - len(shipped_excluded())
    assert not {i.id for i in usable} & shipped_excluded().keys()
    assert sum(task.split_counts().values()) == len(usable)
    assert all(task.split_size(s) > 0 for s in ("train", "calibration", "validation", "test"))


def test_registry_builds_the_task():
    ev = build("os", AgentBenchOsSpec(kind="agentbench_os", max_turns=3, timeout=5))
    assert isinstance(ev, AgentBenchOsTask) and ev.name == "os" and ev.max_turns == 3 and ev.timeout == 5


def test_messages_are_agentbench_prompt_and_one_shot(task):
    item = task.load_items()[0]
    msgs = task.messages(item)
    assert msgs[0]["role"] == "user" and msgs[0]["content"].startswith(PROMPT)
    assert msgs[0]["content"].endswith('Now, my problem is:\n\ntell me how many files are in the directory "/etc"?')
    assert msgs[1 : len(ONE_SHOT)] == list(ONE_SHOT[1:])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "Now, I will start a new problem in a new OS. My problem is:\n\n" + item.prompt


@pytest.mark.parametrize(
    ("reply", "kind", "content"),
    [
        (bash("ls /etc\nwc -l x"), "act", "ls /etc\nwc -l x"),
        ("Act: bash\n```bash\na\n```\nmore\n```bash\nb\n```", "act", "a\n\nb"),
        ("Think: x\nAct: answer(f(1) (2))", "answer", "f(1) (2)"),
        ("Act: answer(  7 )", "answer", "  7 "),
        ("Act: Finish", "finish", ""),
        ("Act: bash\n```bash\nls\n```\nAct: answer(3)", "answer", "3"),  # the last Act line wins
        ("Act: answer(3)\nAct: answer no parens", "answer", "3"),  # an answer without (...) is skipped
        ("Act: bash\nls -la", "act", ""),  # AgentBench runs an empty command: no ```bash block
        ("", "invalid", None),
        ("I would run ls.", "invalid", None),
        ("Act: sudo reboot", "invalid", None),
        ("Act: answer without parentheses", "invalid", None),
    ],
)
def test_parse_is_agentbench_extract_action_and_never_raises(task, reply, kind, content):
    item = task.load_items()[0]
    action = task.parse(item, reply)
    assert action.kind == kind
    if content is not None:
        assert action.content == content
    else:
        assert "Act: bash" in action.content  # the reason says what a turn needs
    assert extract_action(reply)["action"] == {"act": "bash", "answer": "commit", "finish": "commit"}.get(kind)


def test_observation_is_agentbench_phrasing_and_truncation(task):
    item = task.load_items()[0]
    act = Action("act", "x")
    assert task.observe(item, act, "220\n") == {"role": "user", "content": OUTPUT_PREFIX + "220\n"}
    assert task.observe(item, act, "") == {"role": "user", "content": EMPTY_OUTPUT}
    long = task.observe(item, act, "a" * 801)["content"]
    assert long == OUTPUT_PREFIX + "a" * 780 + TRUNCATED  # AgentBench: result[:780] + its note, beyond 800
    assert task.observe(item, act, "a" * 800)["content"] == OUTPUT_PREFIX + "a" * 800


@pytest.mark.parametrize(
    ("tasks", "scripts", "expect"),
    [
        ("{", {}, ["dev.json", "not valid JSON", "line 1"]),
        (3, {}, ["dev.json", "holds a task object or a list"]),
        ([{"evaluation": {"match": "1"}}], {}, ["dev.json: task 0.description", "missing"]),
        ([{"description": "d"}], {}, ["dev.json: task 0.evaluation", "missing"]),
        ([{"description": "d", "evaluation": {}}], {}, ["dev.json: task 0.evaluation", "check or match must exist"]),
        (
            [{"description": "d", "evaluation": {"match": "1"}}, {"description": "d", "evaluation": {"match": 5}}],
            {},
            ["dev.json: task 1.evaluation.match", "a string, or an object"],
        ),
        (
            [{"description": "d", "evaluation": {"check": [None, {"language": "python", "file": "check/nope.py"}]}}],
            {},
            ["dev.json: task 0.evaluation.check[1].file", "nope.py"],
        ),
        (
            [{"description": "d", "evaluation": {"check": [{"language": "c", "code": "int main(){}"}]}}],
            {},
            ["dev.json: task 0.evaluation.check[0].language", "'c' is not supported"],
        ),
        (
            [{"description": "d", "evaluation": {"check": [None, "exit 0"]}}],
            {},
            ["dev.json: task 0.evaluation.example", "a null check runs it"],
        ),
        (
            [{"description": "d", "create": {"init": [{"language": "bash"}]}, "evaluation": {"match": "1"}}],
            {},
            ["dev.json: task 0.create.init[0]", "needs code or file"],
        ),
        (
            [{"description": "d", "evaluation": {"check": {"file": "../../../etc/passwd"}}}],
            {"check/ok.sh": "exit 0"},
            ["dev.json: task 0.evaluation.check.file", "leaves the script directory"],
        ),
    ],
)
def test_malformed_task_file_is_a_clear_error(tmp_path, tasks, scripts, expect):
    root = write_tasks(tmp_path, tasks, scripts)
    with pytest.raises(EvaluatorError) as err:
        AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", path=root)).load_items()
    for part in expect:
        assert part in str(err.value), str(err.value)


def test_not_a_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluatorError, match="not an AgentBench os_interaction directory"):
        AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", path=tmp_path)).load_items()


def test_no_sandbox_refuses_with_the_sandboxs_message(task, monkeypatch):
    def missing(*, privileged=False):
        raise os_sandbox.SandboxUnavailable("bubblewrap (bwrap) is not installed: install it with apt")

    monkeypatch.setattr(os_sandbox, "check_available", missing)
    item = task.load_items()[0]
    with pytest.raises(os_sandbox.SandboxUnavailable, match="bubblewrap"):
        task.replay([item], [["Act: finish"]])


# -- episodes in the sandbox ---------------------------------------------------------------------------------

#: A subset of the gold control: passing check tasks (answer as argument, several checks, finish with system
#: state checked, the start script's cd and variables), match tasks (a background writer), and excluded ones
#: for each kind of reason.
SUBSET = (
    "os/3/ac/0",
    "os/4/Q47/0",
    "os/2/environment/4",
    "os/6/new/4",
    "os/7/bootstrap/3",
    "os/4/Q49/0",
    "os/dev/1",
    "os/1/stock/0",
    "os/5/new/0",
    "os/6/new/5",
    "os/4/N4/0",
    "os/7/bootstrap/0",
)


@needs_sandbox
def test_gold_control_subset_reproduces_excluded_json(task):
    by_id = {i.id: i for i in task.all_items()}
    passed, reasons = task.gold_control([by_id[i] for i in SUBSET])
    shipped = shipped_excluded()
    assert reasons == {i: shipped[i] for i in SUBSET if i in shipped}
    assert passed == [i for i in SUBSET if i not in shipped]
    assert len(passed) == 9


@needs_sandbox
@pytest.mark.slow
def test_gold_control_full_recompute_matches_excluded_json(task):
    t0 = time.monotonic()
    passed, reasons = task.gold_control()
    shipped = shipped_excluded()
    # a task whose outcome differs is run once more, alone: on a loaded machine an episode of 170 run four at a time
    # can fail once for the load (seen once in CI: os/4/N225/0), and a task that really differs does so again
    differ = sorted({i for i in set(reasons) | set(shipped) if reasons.get(i) != shipped.get(i)})
    if differ:
        print(f"run again alone: {differ}")
        by_id = {i.id: i for i in task.all_items()}
        again_passed, again = task.gold_control([by_id[i] for i in differ])
        reasons = {i: r for i, r in reasons.items() if i not in differ} | again
        passed = [i for i in passed if i not in differ] + again_passed
    assert reasons == shipped
    assert len(passed) + len(reasons) == 170
    with_example = [i for i in task.all_items() if i.data["check"] is not None]
    ok = [i for i in with_example if i.id in set(passed)]
    print(f"gold control: {len(passed)}/170 usable; check tasks' examples pass {len(ok)}/{len(with_example)}")
    print(f"took {time.monotonic() - t0:.1f} s")


@needs_sandbox
def test_gold_conversations_score_one_and_end_in_an_answer(task):
    convs = task.gold_conversations("train", 12)
    assert len(convs) >= 8
    for conv in convs:
        agent = conv[len(task.messages(task.load_items()[0])) :]
        if len(agent) == 1:  # a match task without an example: its expected answer, at once
            assert agent[0]["role"] == "assistant" and "Act: answer(" in agent[0]["content"]
            continue
        assert agent[0]["role"] == "assistant" and "Act: bash" in agent[0]["content"]
        assert agent[1]["role"] == "user" and agent[1]["content"].startswith(("The output of the OS", EMPTY_OUTPUT))
        assert agent[-1]["role"] == "assistant" and (
            "Act: answer(" in agent[-1]["content"] or "Act: finish" in agent[-1]["content"]
        )


@needs_sandbox
def test_doing_nothing_scores_zero(task):
    """Negative control: a wrong answer, or finish without acting, fails every task that needs work (all of a
    sample here; all 136 were checked when the exclusion list was made)."""
    items = [i for n, i in enumerate(task.load_items()) if n % 4 == 0]
    for turn in ("Act: answer(__wrong__)", "Act: finish", "Act: answer()"):
        transcripts = task.replay(items, [[turn]] * len(items))
        assert [t.item_id for t in transcripts if t.score > 0] == [], turn


@needs_sandbox
def test_right_answer_without_work_passes_match_and_wrong_fails(task):
    by_id = {i.id: i for i in task.all_items()}
    item = by_id["os/4/Q49/0"]  # start: var=3.14 in the agent's shell; match "no"
    good, bad = task.replay([item, item], [["Act: answer( no )"], ["Act: answer(yes)"]])
    assert (good.score, bad.score) == (1.0, 0.0)  # the match answer is stripped, as AgentBench does


@needs_sandbox
def test_start_script_runs_in_the_agents_shell(task):
    by_id = {i.id: i for i in task.all_items()}
    q49, q47, dev0 = by_id["os/4/Q49/0"], by_id["os/4/Q47/0"], by_id["os/dev/0"]
    turns = [[bash('echo "var=$var"; pwd'), "Act: finish"], [bash("pwd")], [bash("sleep 2.2; cat /root/log")]]
    t49, t47, t0 = task.replay([q49, q47, dev0], turns)
    assert t49.messages[8]["content"] == OUTPUT_PREFIX + "var=3.14\n/root\n"
    assert t47.messages[8]["content"] == OUTPUT_PREFIX + "/home/user2\n"  # start: cd /home/user2
    assert t0.messages[8]["content"].count("succeed") >= 2  # start: a background writer, once a second


@needs_sandbox
def test_check_scripts_get_the_answer_as_argument(task):
    by_id = {i.id: i for i in task.all_items()}
    item = by_id["os/4/Q47/0"]
    move = bash("mv /home/user1/os/linux/commands/MyPersonalComputer.config .")
    right = [move, "Act: answer(/home/user1/os/linux/commands/MyPersonalComputer.config)"]
    wrong_path = [move, "Act: answer(/home/user1/MyPersonalComputer.config)"]
    not_moved = ["Act: answer(/home/user1/os/linux/commands/MyPersonalComputer.config)"]
    scores = [t.score for t in task.replay([item] * 3, [right, wrong_path, not_moved])]
    assert scores == [1.0, 0.0, 0.0]


@needs_sandbox
def test_unparseable_turns_score_zero_and_never_raise(task):
    item = task.load_items()[0]
    replies = ["", "I would run ls.", "Act: answer without parentheses", "Act: sudo make me a sandwich", "\x00\ufffd"]
    transcripts = task.replay([item] * len(replies), [[r] for r in replies])
    for t in transcripts:
        assert (t.score, t.status, t.turns) == (0.0, "invalid", 1)
        assert "Act: bash" in t.error


@needs_sandbox
def test_turn_limit_scores_zero(tmp_path):
    root = write_tasks(tmp_path, [{"description": "say 1", "evaluation": {"match": "1"}}])
    t = AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", path=root, max_turns=2))
    (tr,) = t.replay(t.all_items(), [[bash("echo 1")] * 5])
    assert (tr.score, tr.status, tr.turns) == (0.0, "turn_limit", 2)


@needs_sandbox
def test_a_background_process_does_not_outlive_the_episode(tmp_path):
    root = write_tasks(tmp_path, [{"description": "d", "evaluation": {"match": "done"}}])
    t = AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", path=root))
    start = bash("nohup setsid sleep 4321.123 >/dev/null 2>&1 &\n(trap '' HUP TERM; sleep 4321.124) &\necho started")
    count = bash("sleep 0.2; ps -eo args | grep -c '[s]leep 4321'")
    (tr,) = t.replay(t.all_items(), [[start, count, "Act: answer(done)"]])
    assert tr.score == 1.0
    assert tr.messages[-2]["content"] == OUTPUT_PREFIX + "2\n"  # both were running during the episode
    deadline = time.monotonic() + 5
    while (left := _host_processes("4321.12")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def _host_processes(token: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if token in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(pid))
            except OSError:
                pass
    return found


@needs_sandbox
def test_an_episode_cannot_see_another_episodes_files(tmp_path):
    tasks = [{"description": "d", "evaluation": {"match": "x"}}, {"description": "e", "evaluation": {"match": "x"}}]
    root = write_tasks(tmp_path, tasks)
    t = AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", path=root, workers=2))
    a, b = t.all_items()
    write = bash("echo secret > /root/secret-a; echo secret > /tmp/secret-a; mkdir -p /srv/a; ls /root /tmp")
    look = bash("ls /root/secret-a /tmp/secret-a /srv/a 2>&1 | sed 's/^.*cannot access/gone/'")
    # Both episodes live at once (one turn per engine call): a writes in turn 1, b looks in turn 2.
    ta, tb = t.replay([a, b], [[write, bash("true"), "Act: answer(x)"], [bash("true"), look, "Act: answer(x)"]])
    assert "secret-a" in ta.messages[8]["content"]
    assert tb.messages[10]["content"].count("gone") == 3
    # A later episode of the same task starts from a fresh root too.
    (tc,) = t.replay([a], [[look]])
    assert tc.messages[8]["content"].count("gone") == 3


@needs_sandbox
def test_observations_interleave_stderr_and_an_empty_command_is_empty(tmp_path):
    root = write_tasks(tmp_path, [{"description": "d", "evaluation": {"match": "x"}}])
    t = AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", path=root, timeout=2))
    turns = [
        bash("echo a; ls /nonexistent; echo b"),
        "Act: bash\n\nls",  # no ```bash block: AgentBench runs an empty command
        bash("# only a comment"),
        bash("sleep 30"),
        "Act: answer(x)",
    ]
    (tr,) = t.replay(t.all_items(), [turns])
    obs = [m["content"] for m in tr.messages[8::2]]
    assert obs[0] == OUTPUT_PREFIX + "a\nls: cannot access '/nonexistent': No such file or directory\nb\n"
    assert obs[1] == obs[2] == EMPTY_OUTPUT
    assert "ran past 2 seconds and was interrupted" in obs[3]
    assert tr.score == 1.0


@needs_sandbox
def test_the_gold_policy_passes_every_usable_task_of_a_split(task):
    """What `cycleqd-evolve evaluate --gold` and the gold trajectories run: every usable test task scores 1."""
    items = task.episode_items("test", 1000)
    assert [t.score for t in task.replay_gold(items)] == [1.0] * len(items)
