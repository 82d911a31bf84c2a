"""Versioned JSON files: atomic writes (write a new file next to the target, then rename it over, so there is
never a half-written file) and reads that check ``format_version`` and say which file is wrong and why."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to fill; on success it replaces ``path`` by renames (an older
    ``path`` is moved aside first and removed only once the new one is in place), on any failure it is removed
    and ``path`` is left exactly as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
