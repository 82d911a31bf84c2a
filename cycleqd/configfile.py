"""Reading a YAML config file into a pydantic model, with errors that name the file and the field.

One helper for every config file of the project (``evolve``'s and ``serve``'s configs, the router's routing
policy); torch-free, so the router can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cycleqd.errors import UserError

T = TypeVar("T", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A configuration file that cannot be used; the message says which file, which field and why."""


def load_yaml_model(path: Path, model: type[T]) -> T:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  field '{field}': {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc
