"""Versioned JSON files: atomic writes (write a new file next to the target, then rename it over, so there is
never a half-written file) and reads that check ``format_version`` and say which file is wrong and why."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_versioned_json(path: Path, version: int, error: type[Exception], hint: str) -> dict[str, Any]:
    """The JSON object at ``path``, refused with ``error`` when it is not JSON or has another ``format_version``.

    ``hint`` ends each message with what the user can do about it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: corrupt, not valid JSON ({exc}); {hint}") from exc
    found = data.get("format_version") if isinstance(data, dict) else None
    if found != version:
        raise error(f"{path}: field 'format_version' is {found!r}, expected {version}; {hint}")
    return data
