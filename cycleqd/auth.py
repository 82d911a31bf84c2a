"""The engine key and the Bearer-key check, shared by the router (``router.app``, ``router.decision``) and the
supervisor (``serve.engine``, ``serve.admin``).

The engine key is what every vLLM engine is started with (``vllm serve --api-key``) and what the router presents to
them: ``CYCLEQD_ENGINE_KEY``, else the contents of the file named by ``CYCLEQD_ENGINE_KEY_FILE``; ``cycleqd-serve``
generates one per run (``<out>/engine.key``, mode 0600) when neither is set. It never comes from a manifest, which
anyone who can read the router's volume reads.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cycleqd.atomic import write_text_atomic
from cycleqd.configfile import ConfigError

ENGINE_KEY_ENV = "CYCLEQD_ENGINE_KEY"
ENGINE_KEY_FILE_ENV = "CYCLEQD_ENGINE_KEY_FILE"
GENERATED_KEY_FILE = "engine.key"


def engine_key(error: type[Exception] = ConfigError) -> str | None:
    """The engine key from the environment (the variable, else the file it names), or None when neither is set.

    A named file that cannot be read or is empty raises ``error``, whose message names the variable and the file.
    """
    if key := os.environ.get(ENGINE_KEY_ENV, "").strip():
        return key
    name = os.environ.get(ENGINE_KEY_FILE_ENV, "").strip()
    if not name:
        return None
    try:
        key = Path(name).read_text().strip()
    except OSError as exc:
        raise error(
            f"{ENGINE_KEY_FILE_ENV}={name}: cannot read the engines' API key ({exc.strerror or exc}); point it at a "
            f"readable file holding the key, or set {ENGINE_KEY_ENV} instead"
        ) from exc
    if not key:
        raise error(f"{ENGINE_KEY_FILE_ENV}={name}: the file is empty; write the engines' API key into it")
    return key


def new_engine_key(directory: Path) -> str:
    """A fresh random engine key, written to ``directory/engine.key`` (mode 0600 from its creation on, replaced
    atomically), the file to give the router."""
    key = secrets.token_urlsafe(32)
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(directory) / GENERATED_KEY_FILE, key + "\n", mode=0o600)
    return key


def bearer_token(authorization: str) -> bytes:
    """The credential of an ``Authorization`` header's value (``Bearer <key>``), as bytes; empty when there is none."""
    return authorization.removeprefix("Bearer ").strip().encode()


def key_matches(given: bytes, keys: Iterable[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``. Every key is compared, each in constant time, so neither the time taken
    nor an early exit tells which key matched or how much of one did. Pass keys encoded once, not per request."""
    match = False
    for key in keys:
        match |= hmac.compare_digest(given, key)
    return match
