from __future__ import annotations

import pytest

from evolve.config import BootstrapConfig, ConfigError, load_yaml_model


def test_defaults_load_from_an_empty_file(tmp_path):
    (tmp_path / "c.yaml").write_text("")
    assert load_yaml_model(tmp_path / "c.yaml", BootstrapConfig) == BootstrapConfig()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("skills: [code, chess]", "field 'skills': Value error, unknown skill 'chess'"),
        ("base: {steps: -1, lr: 0.1, levels: [1]}", "field 'base.steps'"),
        ("expert: {steps: 1, lr: 0.1, levels: [1], warmup: 3}", "field 'expert.warmup': Extra inputs"),
        ("replay: 2", "field 'replay'"),
        ("seed: [1, 2", "not valid YAML"),
        ("- 1\n- 2", "expected a mapping"),
        ("skills: [code, code]", "must not repeat"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml_model(path, BootstrapConfig)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml_model(tmp_path / "nope.yaml", BootstrapConfig)
