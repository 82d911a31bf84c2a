"""What the worker processes of one server share (``cycleqd-router serve --workers N``): a private state directory,
named to each worker by environment variables, that holds the policy every worker runs and outcome feedback's
``memory`` store.

The parent writes the policy it checked there (``WorkerSync.publish``) and every worker starts from it
(``WorkerSync.current``). A reload read from the policy file by one process is published there too; each worker
asks ``WorkerSync.follow`` in its poll loop, which returns a policy another process published since (or None),
and applies it itself. This module knows the file and its tokens only: applying a policy is the router's business
(``router.decision.Router.reload_policy``), supervising the workers is ``router.workers``'.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from pydantic import ValidationError

from cycleqd.atomic import atomic_file
from router.policy import RoutingPolicy

log = logging.getLogger("cycleqd.router.policy_sync")

#: What the parent tells its workers (environment variables survive uvicorn's spawn; arguments do not).
STATE_ENV = "CYCLEQD_ROUTER_STATE_DIR"
COUNT_ENV = "CYCLEQD_ROUTER_WORKERS"
POLICY_PATH_ENV = "CYCLEQD_ROUTER_POLICY_PATH"
#: What ``feedback.store: memory`` is with N workers: this file in the state directory, removed with it at exit.
FEEDBACK_FILE = "feedback.sqlite"


def shared_feedback_file() -> Path | None:
    """In a worker of ``--workers N`` (N > 1): the SQLite file its ``feedback.store: memory`` lives in, shared by
    every worker (one process's memory would 404 each feedback that reaches another worker than the one that
    answered, and each worker would learn from its own share only). None in a single process."""
    state = os.environ.get(STATE_ENV)
    try:
        count = int(os.environ.get(COUNT_ENV, "1"))
    except ValueError:
        return None
    return Path(state) / FEEDBACK_FILE if state and count > 1 else None


class WorkerSync:
    """The policy every worker runs, in ``<state dir>/policy.json``: ``{"token": ..., "policy": {...}}``.

    Replaced whole (written beside it, then renamed), so a reader sees the old file or the new one, never half.
    Each process remembers the token it runs; a different token there is a reload to apply."""

    def __init__(self, directory: Path, count: int) -> None:
        self.path = Path(directory) / "policy.json"
        self.count = count
        self.seen: str | None = None
        self._stamp: tuple[int, int] | None = None

    def publish(self, policy: RoutingPolicy) -> None:
        token = uuid.uuid4().hex
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps({"token": token, "policy": policy.model_dump(mode="json")}))
            self.seen = token  # before the rename: this process's own poll must not apply it a second time

    def current(self) -> RoutingPolicy:
        """The published policy, now taken as this process's own (a worker's start)."""
        data = json.loads(self.path.read_text())
        self.seen = data["token"]
        return RoutingPolicy.model_validate(data["policy"])

    def follow(self) -> RoutingPolicy | None:
        """A policy another process published since the last call, for the caller to apply; None when there is
        none (a stat per call when nothing changed) or it cannot be read."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("token") == self.seen:
            return None
        self.seen = data["token"]
        try:
            return RoutingPolicy.model_validate(data["policy"])
        except ValidationError as exc:
            log.error("worker %d: the published policy is not valid, the old one stays: %s", os.getpid(), exc)
            return None
