"""``cycleqd-router serve --workers N``: N worker processes answering on one port, as one router.

One Python process tops out at about one core (the GIL), so a router that must use more cores runs N uvicorn
workers behind one listening socket: the parent binds it, checks the policy and the manifest once (as the
single-process path does), then supervises the workers (uvicorn's ``Multiprocess``: a worker that dies is
replaced). What makes the N processes one router:

- **the policy**: the parent writes the policy it checked to ``policy.json`` in a private state directory, with
  a fresh token; each worker starts from that file (``app_from_env``, uvicorn's app factory) and, in the poll
  loop it already runs every second, applies any policy published there since. A reload read from the policy
  file by one worker (``POST /admin/reload``, or a SIGHUP sent to that worker) is published there, and so is
  one the parent reads on SIGHUP; so every trigger reaches every worker within about a second, an invalid
  policy reaches none (it is checked before it is published), and a worker started later (a replacement)
  runs the policy the others run, not an edit of the file nobody has reloaded yet.
- **metrics**: prometheus-client's multiprocess mode, in a fresh directory (``PROMETHEUS_MULTIPROC_DIR``):
  each worker writes its counts to its own files, and ``/metrics`` on any worker sums every worker's.
- **session affinity**: already a pure function of the session key and the healthy elites (rendezvous
  hashing, ``router.selection``), so every worker picks the same elite, as separate replicas do.

What stays per worker (see docs/workers.md): rate-limit buckets (each worker takes 1/N of the rate), the /ui
page's recent decisions, circuit breakers, in-flight counts and the classifier (each builds its own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from socket import socket
from typing import TYPE_CHECKING

from pydantic import ValidationError

from router.configfile import ConfigError
from router.policy import RoutingPolicy

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from router.decision import Router

log = logging.getLogger("cycleqd.router")

#: What the parent tells its workers (environment variables survive uvicorn's spawn; arguments do not).
STATE_ENV = "CYCLEQD_ROUTER_STATE_DIR"
COUNT_ENV = "CYCLEQD_ROUTER_WORKERS"
POLICY_PATH_ENV = "CYCLEQD_ROUTER_POLICY_PATH"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How long the parent waits for every worker to finish its start-up before it gives up announcing the URL.
STARTUP_TIMEOUT_S = 120.0


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
        tmp = self.path.with_name(f".policy-{os.getpid()}-{token}.tmp")
        tmp.write_text(json.dumps({"token": token, "policy": policy.model_dump(mode="json")}))
        self.seen = token  # before the rename: this process's own poll must not apply it a second time
        os.replace(tmp, self.path)

    def current(self) -> RoutingPolicy:
        """The published policy, now taken as this process's own (a worker's start)."""
        data = json.loads(self.path.read_text())
        self.seen = data["token"]
        return RoutingPolicy.model_validate(data["policy"])

    def follow(self, router: Router) -> bool:
        """Apply a policy another process published since; a stat per call when nothing changed. True if applied."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        if data.get("token") == self.seen:
            return False
        self.seen = data["token"]
        try:
            router.reload_policy(RoutingPolicy.model_validate(data["policy"]))
        except (ConfigError, ValidationError) as exc:
            log.error("worker %d: the published policy not applied, the old one stays: %s", os.getpid(), exc)
            return False
        log.warning("worker %d: policy reloaded (published by another process)", os.getpid())
        return True


def app_from_env() -> FastAPI:
    """uvicorn's app factory in each worker: the router as the parent configured it (see the module's doc)."""
    from router.app import create_app
    from router.decision import Router

    # a SIGHUP before the app's own handler is installed (lifespan) must not kill the worker (the default action)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sync = WorkerSync(Path(os.environ[STATE_ENV]), int(os.environ[COUNT_ENV]))
    path = os.environ.get(POLICY_PATH_ENV) or None
    return create_app(Router(sync.current(), policy_path=Path(path) if path else None, workers=sync))


def metrics_dir_for(root: Path, given: str | None) -> tuple[Path, bool]:
    """Where the workers' metric files go: ``given`` (``PROMETHEUS_MULTIPROC_DIR`` as the user set it) if set (it
    must be empty: files left from another server would be summed into this one's counts), else a fresh directory
    under ``root``. Returns the directory and whether it was given (then only its files are removed at exit)."""
    if not given:
        (root / "metrics").mkdir()
        return root / "metrics", False
    d = Path(given)
    if d.exists() and any(d.iterdir()):
        raise ConfigError(
            f"{METRICS_ENV}={d} is not empty: another server's metric files would be counted as this one's; "
            "empty it, or unset the variable (the router then uses a private directory)"
        )
    d.mkdir(parents=True, exist_ok=True)
    return d, True


def make_supervisor(base: type) -> type:
    """uvicorn's ``Multiprocess`` supervisor with the router's differences (a function: uvicorn is imported late)."""

    class Supervisor(base):  # type: ignore[misc, valid-type]
        def __init__(
            self, config: uvicorn.Config, sockets: list[socket], *, router: Router, sync: WorkerSync,
            metrics_dir: Path, announce: Callable[[], None],
        ) -> None:  # fmt: skip
            super().__init__(config, sockets)
            self.router, self.sync, self.metrics_dir, self.announce = router, sync, metrics_dir, announce
            self.announced = False

        def init_processes(self) -> None:
            """Start the workers, then announce once every one has finished its start-up (is answering)."""
            super().init_processes()
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not self.should_exit.is_set():
                self.handle_signals()  # Ctrl-C or SIGTERM during the start-up
                if any(not p.process.is_alive() for p in self.processes):
                    return  # a failed start: the supervisor's loop sees it and stops (uvicorn's STARTUP_FAILURE)
                if all(p.is_ready(timeout=1) for p in self.processes):
                    self.announced = True
                    self.announce()
                    return
                if time.monotonic() > deadline:
                    log.error("the workers did not all start within %.0f s", STARTUP_TIMEOUT_S)
                    return
                time.sleep(0.05)

        def handle_hup(self) -> None:
            """SIGHUP: read and check the policy file here, then publish it to every worker (uvicorn's own
            SIGHUP restarts every worker instead: a classifier rebuilt per worker, for nothing)."""
            try:
                self.router.refresh_manifest(force=True)
                new, manifests = self.router.read_policy()
            except ConfigError as exc:
                log.error("policy not reloaded, the old one stays: %s", exc)
                return
            self.router.policy, self.router.manifests = new, manifests
            self.sync.publish(new)
            log.warning(
                "policy reloaded from %s (SIGHUP); every worker applies it within a second", self.router.policy_path
            )

        def keep_subprocess_alive(self) -> None:
            before = {p.pid for p in self.processes}
            super().keep_subprocess_alive()
            from prometheus_client import multiprocess

            for pid in before - {p.pid for p in self.processes}:  # replaced: its live gauges no longer count
                if pid is not None:
                    multiprocess.mark_process_dead(pid, str(self.metrics_dir))

        def handle_ttin(self) -> None:
            log.warning("SIGTTIN ignored: restart with another --workers (each worker's rate-limit share is 1/N)")

        def handle_ttou(self) -> None:
            log.warning("SIGTTOU ignored: restart with another --workers (each worker's rate-limit share is 1/N)")

    return Supervisor


def serve_workers(
    router: Router,
    *,
    workers: int,
    host: str,
    port: int,
    log_level: str,
    announce: Callable[[], None],
    metrics_dir: str | None = None,
) -> bool:
    """Run ``workers`` processes on ``host:port`` until SIGINT/SIGTERM; ``router`` is the parent's, already
    checked against the manifest; ``metrics_dir``: the user's ``PROMETHEUS_MULTIPROC_DIR``, if any (the parent
    must not have it in its own environment when it imports prometheus-client). ConfigError for a metrics
    directory that cannot be used; False if the workers never all started."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    root = Path(tempfile.mkdtemp(prefix="cycleqd-router-"))
    given, user_dir = False, metrics_dir
    metrics_path: Path | None = None
    try:
        metrics_path, given = metrics_dir_for(root, user_dir)
        sync = WorkerSync(root, workers)
        sync.publish(router.policy)
        router.workers = sync
        os.environ.update({
            METRICS_ENV: str(metrics_path), STATE_ENV: str(root), COUNT_ENV: str(workers),
            POLICY_PATH_ENV: str(router.policy_path or ""),
        })  # fmt: skip
        # the same settings as the single-process path (cli.serve), and why, is said there
        config = uvicorn.Config(
            "router.workers:app_from_env", factory=True, host=host, port=port, workers=workers,
            log_level=log_level, timeout_graceful_shutdown=30, timeout_keep_alive=75,
        )  # fmt: skip
        sock = config.bind_socket()
        sup = make_supervisor(Multiprocess)(
            config, [sock], router=router, sync=sync, metrics_dir=metrics_path, announce=announce
        )
        try:
            sup.run()
        finally:
            sock.close()
        return sup.announced
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if given and metrics_path is not None:
            for f in metrics_path.glob("*.db"):
                f.unlink(missing_ok=True)
