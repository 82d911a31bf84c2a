"""Local skill data the evaluator tests build in a temporary directory: a SQLite file with JSONL questions over it,
and an offline lm-eval task (YAML + JSONL). Both are made from the skill world's own items, so the tiny models
the tests train answer them as well as they answer the world."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from evolve.evaluators import SPLITS, get_skill
from evolve.evaluators.world.db import build_database


def shop_database(path: Path) -> Path:
    """The world db skill's database, saved as a file (what a user's ``database:`` points to)."""
    src = build_database()
    dst = sqlite3.connect(path)
    src.backup(dst)
    dst.close()
    return path


def sql_jsonl(path: Path, per_split: int = 40) -> Path:
    """Questions and gold SQL from every split of the world db skill, as one JSONL file."""
    task = get_skill("db")
    with path.open("w") as f:
        for split in SPLITS:
            for item in task.items(split, per_split, seed=7):
                f.write(json.dumps({"prompt": item.prompt, "answer": item.answer}) + "\n")
    return path


TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 48
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^ +"]
"""


def lm_eval_task(directory: Path, name: str = "world_shell", skill: str = "os", per_split: int = 30) -> Path:
    """An offline lm-eval task over the world skill's items (exact match of the command line); returns its
    include_path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    task = get_skill(skill)
    with data.open("w") as f:
        for split in ("calibration", "validation", "test"):
            for item in task.items(split, per_split, seed=3):
                f.write(json.dumps({"question": item.prompt, "answer": item.answer}) + "\n")
    (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data.resolve()))
    return directory
