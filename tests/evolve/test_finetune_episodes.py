"""Fine-tuning on an episode skill: gold trajectories, multi-turn, loss on the assistant turns."""

from __future__ import annotations

import copy
import json

import pytest

from evolve.finetune import FinetuneConfig, FinetuneError, finetune
from tests.evolve.models.test_conversation import CHATML

PLUGIN = {"kind": "plugin", "name": "tests.evolve.evaluators.test_episodes:CounterTask", "options": {"n": 60}}


@pytest.fixture()
def chat_base(tmp_path, tiny_model, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    d = tmp_path / "base"
    tiny_model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def config(**kw):
    settings = {"steps": 4, "lr": 1e-3, "batch_size": 2, "warmup": 0, "train_items": 10, "checkpoint_every": 0}
    return FinetuneConfig(**{**settings, "skills": {"count": PLUGIN}, "replay": 0.0, **kw})


def test_an_expert_trains_on_its_gold_trajectories(tmp_path, chat_base):
    meta = finetune(chat_base, ["count"], tmp_path / "count", config(prompt_format="chat"))
    assert meta["role"] == "expert" and meta["skill"] == "count" and meta["tokens"] > 0
    assert json.loads((tmp_path / "count" / "cycleqd.json").read_text())["skill"] == "count"
    again = finetune(chat_base, ["count"], tmp_path / "count", config(prompt_format="chat"))
    assert again["reused"] is True


def test_episode_skills_need_a_chat_model_and_known_names(tmp_path, chat_base):
    with pytest.raises(FinetuneError, match="chat model"):
        finetune(chat_base, ["count"], tmp_path / "raw", config(prompt_format="raw"))
    with pytest.raises(FinetuneError, match="not in the config's skills"):
        finetune(chat_base, ["chess"], tmp_path / "chess", config(prompt_format="chat"))
    with pytest.raises(FinetuneError, match="max_tokens"):
        finetune(chat_base, ["count"], tmp_path / "short", config(prompt_format="chat", max_tokens=16))
