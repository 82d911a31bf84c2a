"""The registry: kinds by config, a plain list still means world skills, third-party skills by entry point, and
bad specs named by file and field."""

from __future__ import annotations

import textwrap

import pytest

from cycleqd.configfile import ConfigError, load_yaml_model
from evolve.evaluators import build_evaluators
from evolve.evaluators.base import Evaluator, EvaluatorError
from evolve.evaluators.registry import build
from evolve.evaluators.specs import ENTRY_POINT_GROUP, PluginSpec, WorldSpec, entry_point_names
from evolve.evaluators.world.code import CodeTask
from evolve.run_config import EvolveConfig
from tests.evolve.evaluators.data import lm_eval_task, shop_database, sql_jsonl


def test_a_list_of_names_still_means_world_skills():
    cfg = EvolveConfig(skills=["code", "db"])
    assert cfg.skill_names == ["code", "db"]
    assert all(isinstance(s, WorldSpec) for s in cfg.skills.values())
    # a run directory written before kinds existed validates to the same config as one written now
    old = EvolveConfig.model_validate({"skills": ["code", "os", "db"]})
    assert old == EvolveConfig() == EvolveConfig.model_validate(old.model_dump())
    tasks = build_evaluators(cfg.skills)
    assert isinstance(tasks["code"], CodeTask) and list(tasks) == ["code", "db"]


def test_kinds_build_from_a_yaml_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shop_database(tmp_path / "shop.sqlite")
    sql_jsonl(tmp_path / "sql.jsonl")
    lm_eval_task(tmp_path / "tasks")
    (tmp_path / "evolve.yaml").write_text(
        textwrap.dedent("""\
        skills:
          code: {kind: world}
          sql: {kind: jsonl, path: sql.jsonl, grader: sql, database: shop.sqlite}
          shell: {kind: lm_eval, task: world_shell, include_path: tasks}
          mine: {kind: plugin, name: "evolve.evaluators.world.shell:ShellTask"}
        """)
    )
    cfg = load_yaml_model(tmp_path / "evolve.yaml", EvolveConfig)
    tasks = build_evaluators(cfg.skills)
    assert list(tasks) == ["code", "sql", "shell", "mine"]
    assert all(isinstance(t, Evaluator) for t in tasks.values())
    assert tasks["shell"].exemplars("validation", 3) and tasks["sql"].exemplars("train", 3)


@pytest.mark.parametrize(
    ("skill", "field", "message"),
    [
        ("{kind: jsonl, path: sql.jsonl, grader: fuzzy}", "skills.x.jsonl.grader", "unknown grader 'fuzzy'"),
        (
            "{kind: jsonl, path: sql.jsonl, grader: sql, database: gone.sqlite}",
            "skills.x.jsonl",
            "gone.sqlite: no such",
        ),
        ("{kind: jsonl, path: nowhere.jsonl, grader: exact}", "skills.x.jsonl", "nowhere.jsonl: no such JSONL file"),
        ("{kind: chess}", "skills.x.entry_point.kind", "unknown skill kind 'chess'"),
        ("{kind: world, skill: chess}", "", "skills.x: no world skill 'chess'"),
    ],
)
def test_bad_specs_name_the_file_and_the_field(tmp_path, monkeypatch, skill, field, message):
    monkeypatch.chdir(tmp_path)
    sql_jsonl(tmp_path / "sql.jsonl", per_split=2)
    (tmp_path / "bad.yaml").write_text(f"skills:\n  code: {{kind: world}}\n  x: {skill}\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml_model(tmp_path / "bad.yaml", EvolveConfig)
    text = str(exc.value)
    assert "bad.yaml" in text and message in text and f"field '{field}" in text


def test_unknown_lm_eval_task_is_named(tmp_path):
    lm_eval_task(tmp_path / "tasks")
    cfg = EvolveConfig(
        skills={"code": {}, "gsm": {"kind": "lm_eval", "task": "gsm_local", "include_path": tmp_path / "tasks"}}
    )
    with pytest.raises(
        EvaluatorError, match=r"skills\.gsm\.task: no lm-eval task 'gsm_local'.*tasks found: world_shell"
    ):
        build_evaluators(cfg.skills)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_pkg.skills:Summaries", r"skills\.mine\.name: cannot import module 'no_such_pkg\.skills'"),
        ("evolve.evaluators.world.code:Nothing", r"skills\.mine\.name: module .* has no 'Nothing'"),
        ("nothing_registered", r"skills\.mine\.name: no entry point 'nothing_registered' in group cycleqd\.skills"),
        ("json:dumps", r"skills\.mine\.name: .*failed"),
    ],
)
def test_a_plugin_that_cannot_be_imported_is_named(name, message):
    with pytest.raises(EvaluatorError, match=message):
        build("mine", PluginSpec(kind="plugin", name=name))


PLUGIN = '''
from evolve.evaluators.base import Evaluator, TaskResult


class Parrot(Evaluator):
    """Scores 1 when the model repeats the word it is asked to repeat."""

    def __init__(self, words=("alpha", "beta", "gamma", "delta"), times=1):
        self.words, self.times = list(words), times

    def prompts(self, split, n, seed):
        return [f"Repeat the word {w}" for w in self.words][:n]

    def exemplars(self, split, n, *, seed=0):
        return self.prompts(split, n, seed)

    def evaluate(self, engine, split, limit, *, seed=0):
        prompts = self.prompts(split, limit, seed)
        answers = engine.generate(prompts, max_new_tokens=8)
        scores = [float(a.strip() == " ".join([p.split()[-1]] * self.times)) for p, a in zip(prompts, answers)]
        return TaskResult(self.name, split, scores, answers)
'''


@pytest.fixture()
def installed_plugin(tmp_path, monkeypatch):
    """A third-party package with a ``cycleqd.skills`` entry point, installed into a directory on sys.path (as
    pip --target would): a package and its dist-info, found by importlib.metadata like any installed one."""
    site = tmp_path / "site"
    (site / "parrot_skills").mkdir(parents=True)
    (site / "parrot_skills" / "__init__.py").write_text(PLUGIN)
    info = site / "parrot_skills-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parrot-skills\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nparrot = parrot_skills:Parrot\n")
    monkeypatch.syspath_prepend(str(site))
    yield site


class Repeater:
    def generate(self, prompts, *, max_new_tokens):
        return [" " + p.split()[-1] if "gamma" not in p else "no" for p in prompts]


def test_a_third_party_skill_registered_by_entry_point_is_found_and_used(installed_plugin):
    assert "parrot" in entry_point_names()
    # as a kind of its own (extra fields are its options), and as a plugin by entry-point name
    cfg = EvolveConfig(
        skills={"code": {}, "echo": {"kind": "parrot", "times": 1}, "p2": {"kind": "plugin", "name": "parrot"}}
    )
    tasks = build_evaluators(cfg.skills)
    assert type(tasks["echo"]).__name__ == "Parrot" and tasks["echo"].name == "echo"
    result = tasks["echo"].evaluate(Repeater(), "validation", 4)
    assert result.scores == [1.0, 1.0, 0.0, 1.0] and result.quality == 0.75
    assert tasks["p2"].exemplars("train", 2) == ["Repeat the word alpha", "Repeat the word beta"]
    # its options are checked by the class itself, and a failure names the field
    bad = EvolveConfig(skills={"code": {}, "echo": {"kind": "parrot", "colour": "red"}})
    with pytest.raises(EvaluatorError, match=r"skills\.echo\.kind: .*colour"):
        build_evaluators(bad.skills)
