"""``cycleqd-router serve --workers N``: N worker processes answering on one port, as one router.

One Python process tops out at about one core (the GIL), so a router that must use more cores runs N uvicorn
workers on one port: the parent checks the policy and the manifest once (as the single-process path does),
binds one listening socket per worker (``SO_REUSEPORT``, so that the kernel spreads connections evenly; see
``listen_sockets``), then supervises the workers (uvicorn's ``Multiprocess``: a worker that dies is replaced,
on the same socket). What makes the N processes one router:

- **the policy**: the parent writes the policy it checked to ``policy.json`` in a private state directory, with
  a fresh token; each worker starts from that file (``app_from_env``, uvicorn's app factory) and, in the poll
  loop it already runs every second, applies any policy published there since (``router.policy_sync``). A
  reload read from the policy
  file by one worker (``POST /admin/reload``, or a SIGHUP sent to that worker) is published there, and so is
  one the parent reads on SIGHUP; so every trigger reaches every worker within about a second, an invalid
  policy reaches none (it is checked before it is published), and a worker started later (a replacement)
  runs the policy the others run, not an edit of the file nobody has reloaded yet.
- **metrics**: prometheus-client's multiprocess mode, in a fresh directory (``PROMETHEUS_MULTIPROC_DIR``):
  each worker writes its counts to its own files, and ``/metrics`` on any worker sums every worker's.
- **session affinity**: already a pure function of the session key and the healthy elites (rendezvous
  hashing, ``router.selection``), so every worker picks the same elite, as separate replicas do.
- **outcome feedback** with ``store: memory``: a feedback may reach another worker than the one that answered,
  so the workers' "memory" is one SQLite file in the state directory (``router.policy_sync.shared_feedback_file``):
  any worker
  attributes any answered request, rates it once, and reads every worker's evidence (``sqlite`` and ``redis``
  are shared by nature).

What stays per worker (see docs/workers.md): rate-limit buckets (each worker takes 1/N of the rate), the /ui
page's recent decisions, circuit breakers, in-flight counts and the classifier (each builds its own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from cycleqd.configfile import ConfigError
from router.policy import RoutingPolicy
from router.policy_sync import COUNT_ENV, FEEDBACK_FILE, POLICY_PATH_ENV, STATE_ENV, WorkerSync

if TYPE_CHECKING:
    from fastapi import FastAPI

    from router.decision import Router

log = logging.getLogger("cycleqd.router")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How long the parent waits for every worker to finish its start-up before it gives up announcing the URL.
STARTUP_TIMEOUT_S = 120.0


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


def listen_sockets(host: str, port: int, n: int, backlog: int) -> list[socket.socket]:
    """One listening socket per worker, all on ``host:port`` (``SO_REUSEPORT``): the kernel spreads new
    connections evenly over them. With one socket shared by all workers (uvicorn's way) the worker that wakes
    first accepts every connection waiting (asyncio accepts up to ``backlog`` per wake-up), so a burst of
    keep-alive connections, as a load balancer's pool opens them, lands mostly on one worker: 93% on one of two
    in ``benchmarks/bench_workers.py``. The parent keeps every socket, so a worker's replacement takes over its
    queue. Without ``SO_REUSEPORT`` (not Linux or BSD): one shared socket.

    Another process could join a ``SO_REUSEPORT`` group on the same port and silently take a share of the
    connections; so the port is first bound once without it, which fails (address in use) if anyone listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # in use: fail as uvicorn's own bind would
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    reuseport = getattr(socket, "SO_REUSEPORT", None)
    out: list[socket.socket] = []
    for _ in range(n if reuseport is not None else 1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport is not None:
            sock.setsockopt(socket.SOL_SOCKET, reuseport, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
        out.append(sock)
    return out


class Supervisor(Multiprocess):
    """uvicorn's ``Multiprocess`` supervisor (start N workers, replace one that dies, stop them on SIGINT/SIGTERM)
    with the router's differences: worker i always gets listening socket i, the URL is announced once every
    worker answers, SIGHUP reloads the policy instead of restarting every worker, a dead worker's metric files
    are marked dead. ``read_policy`` reads the policy file and checks it (ConfigError), changing nothing."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], *, read_policy: Callable[[], RoutingPolicy],
        sync: WorkerSync, metrics_dir: Path, announce: Callable[[], None],
    ) -> None:  # fmt: skip
        super().__init__(config, sockets)
        self.read_policy, self.sync, self.metrics_dir, self.announce = read_policy, sync, metrics_dir, announce
        self.announced = False

    def new_process(self, idx: int) -> Process:
        return Process(self.config, [self.sockets[idx % len(self.sockets)]])

    def init_processes(self) -> None:
        """Start the workers, then announce once every one has finished its start-up (is answering)."""
        for idx in range(self.processes_num):
            process = self.new_process(idx)
            process.start()
            self.processes.append(process)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.should_exit.is_set():
            self.handle_signals()  # Ctrl-C or SIGTERM during the start-up
            if any(not p.process.is_alive() for p in self.processes):
                return  # a failed start: keep_subprocess_alive sees it and stops (uvicorn's STARTUP_FAILURE)
            if all(p.is_ready(timeout=1) for p in self.processes):
                self.announced = True
                self.announce()
                return
            if time.monotonic() > deadline:
                log.error("the workers did not all start within %.0f s", STARTUP_TIMEOUT_S)
                return
            time.sleep(0.05)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's, but the replacement gets the dead worker's socket (and the dead worker's files are marked)."""
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or already gone
            process.join()
            if process.exitcode == STARTUP_FAILURE:  # the app cannot start: restarting would fail the same way
                log.error("worker %s failed to start; stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning("worker %s died (exit code %s); starting another", process.pid, process.exitcode)
            if process.pid is not None:  # its live gauges (none so far) stop counting; its counters stay
                multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))
            self.processes[idx] = self.new_process(idx)
            self.processes[idx].start()

    def handle_hup(self) -> None:
        """SIGHUP: read and check the policy file here, then publish it to every worker (uvicorn's own SIGHUP
        restarts every worker instead: a classifier rebuilt per worker, for nothing). The parent serves nothing,
        so it only passes the policy on."""
        try:
            new = self.read_policy()
        except ConfigError as exc:
            log.error("policy not reloaded, the old one stays: %s", exc)
            return
        self.sync.publish(new)
        log.warning("policy reloaded (SIGHUP); every worker applies it within a second")

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN ignored: restart with another --workers (each worker's rate-limit share is 1/N)")

    def handle_ttou(self) -> None:
        log.warning("SIGTTOU ignored: restart with another --workers (each worker's rate-limit share is 1/N)")


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
    root = Path(tempfile.mkdtemp(prefix="cycleqd-router-"))
    given, user_dir = False, metrics_dir
    metrics_path: Path | None = None
    try:
        metrics_path, given = metrics_dir_for(root, user_dir)
        sync = WorkerSync(root, workers)
        if router.policy.feedback.enabled and router.policy.feedback.store == "memory":
            # the workers' shared "memory" (shared_feedback_file), created once here rather than by N at once
            from router.feedback_stores import SQLiteStore

            try:
                SQLiteStore(root / FEEDBACK_FILE).close()
            except Exception as exc:  # sqlite3.Error, OSError
                raise ConfigError(f"feedback.store memory: cannot create the workers' shared file ({exc})") from exc
        sync.publish(router.policy)
        os.environ.update({
            METRICS_ENV: str(metrics_path), STATE_ENV: str(root), COUNT_ENV: str(workers),
            POLICY_PATH_ENV: str(router.policy_path or ""),
        })  # fmt: skip
        # the same settings as the single-process path (cli.serve), and why, is said there
        config = uvicorn.Config(
            "router.workers:app_from_env", factory=True, host=host, port=port, workers=workers,
            log_level=log_level, timeout_graceful_shutdown=30, timeout_keep_alive=75,
        )  # fmt: skip
        try:
            socks = listen_sockets(host, port, workers, config.backlog)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

        def read_policy() -> RoutingPolicy:  # against the manifest as it is now
            router.refresh_manifest(force=True)
            return router.read_policy()[0]

        sup = Supervisor(config, socks, read_policy=read_policy, sync=sync, metrics_dir=metrics_path, announce=announce)
        try:
            sup.run()
        finally:
            for sock in socks:
                sock.close()
        return sup.announced
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if given and metrics_path is not None:
            for f in metrics_path.glob("*.db"):
                f.unlink(missing_ok=True)
