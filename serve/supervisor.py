"""The supervision loop over a plan's engines (``serve.engine``), and the serving manifest that follows them.

The supervisor polls every engine: a dead one is restarted after a backoff that doubles up to a cap, and marked
``failed`` after ``max_restarts``; a live one that stops answering ``/health`` is marked ``unhealthy``; a restart
still not answering after ``readiness_timeout_s`` is stopped and counted as one more restart. Every change of health,
pid or elites rewrites the manifest atomically.

In multi-LoRA mode, elites can be added or removed at run time through vLLM's LoRA load/unload endpoints
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); the engine keeps serving the others, and a later restart of that engine
brings the current set back. The runtime LoRA endpoints, which load a directory named in the request, are guarded by
the engines' key; the supervisor itself loads only adapters inside its own output directory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from serve.config import ServeConfig
from serve.engine import Engine, cpu_shares
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest
from serve.materialise import Artifact
from serve.preflight import ServeError, resolve_engine_key


class Supervisor:
    """Starts, watches and stops the engines of a plan, keeping the manifest in step."""

    def __init__(
        self,
        cfg: ServeConfig,
        engines: list[Engine],
        manifest: ServingManifest,
        *,
        materialise_one: Callable[[str], Artifact] | None = None,
    ) -> None:
        self.cfg = cfg
        self.engines = {e.plan.id: e for e in engines}
        for e in engines:
            e._bind = cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104 - a comparison
            e._host = cfg.advertise_host or e._bind
            e.log = cfg.out / "logs" / f"{e.plan.id}.log"
        cpu = [e for e in engines if e.plan.device.kind == "cpu"]
        for e, share in zip(cpu, cpu_shares(len(cpu)), strict=True):
            e.cpu_bind = share
        self.manifest = manifest
        self.manifest_path = cfg.out / "manifest.json"
        self.materialise_one = materialise_one
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.adding: set[str] = set()  # elites being materialised for add_elite (outside the lock)
        # One materialisation at a time (the scorer's engine holds one set of weights), without the main lock.
        self.materialise_lock = threading.Lock()
        for e in engines:
            for path in e.adapters.values():
                self._check_adapter_path(path)

    def _check_adapter_path(self, path: Path) -> Path:
        """Adapters are loaded only from this supervisor's output directory, where it wrote them itself."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.cfg.out.resolve()):
            raise ServeError(
                f"adapter {path} is outside the serve output directory {self.cfg.out}; refusing to load it"
            )
        return resolved

    # -- start-up --------------------------------------------------------------------------------------------
    def start(self, on_ready: Callable[[Engine, float], None] | None = None) -> dict[str, float]:
        """Start every engine and wait until all answer; on any failure stop them all and raise.

        Returns the start-up time of each engine in seconds.
        """
        t0 = time.monotonic()
        ready_at: dict[str, float] = {}
        key = resolve_engine_key(self.cfg.out)
        for e in self.engines.values():
            e.api_key = key
        try:
            for e in self.engines.values():
                e.start(self.cfg)
            self._write()
            deadline = t0 + self.cfg.readiness_timeout_s
            while len(ready_at) < len(self.engines):
                for e in self.engines.values():
                    if e.plan.id in ready_at:
                        continue
                    if not e.alive():
                        raise ServeError(
                            f"{e.plan.id} exited with code {e.proc.returncode if e.proc else '?'} while starting; "
                            f"its log {e.log} ends with:\n{e.log_tail()}"
                        )
                    if e.answers():
                        ready_at[e.plan.id] = time.monotonic() - t0
                        e.ready()
                        e.health = Health.READY
                        self._write()
                        if on_ready:
                            on_ready(e, ready_at[e.plan.id])
                if time.monotonic() > deadline:
                    late = [i for i in self.engines if i not in ready_at]
                    raise ServeError(
                        f"{', '.join(late)} not ready after {self.cfg.readiness_timeout_s:.0f} s "
                        f"(readiness_timeout_s); see {self.cfg.out / 'logs'}"
                    )
                time.sleep(0.5)
        except BaseException:
            self.shutdown()
            raise
        return ready_at

    # -- supervision -----------------------------------------------------------------------------------------
    def tick(self) -> None:
        """One round of health checks and restarts."""
        changed = False
        with self.lock:
            for e in self.engines.values():
                before = (e.health, e.proc.pid if e.proc else None)
                if e.health in (Health.FAILED, Health.STOPPED):
                    continue
                if not e.alive():
                    if e.health != Health.RESTARTING:
                        self._restart_later(e)
                    elif time.monotonic() >= e.next_start:
                        e.restarts += 1
                        e.start(self.cfg)
                elif e.answers():
                    e.ready()
                    e.health, e.failed_checks = Health.READY, 0
                elif e.health == Health.STARTING and time.monotonic() - e.started_at > self.cfg.readiness_timeout_s:
                    # a restart that never becomes ready must not stay "starting" for ever: stop it and count it
                    e.note(f"not ready {self.cfg.readiness_timeout_s:.0f} s after its start (readiness_timeout_s)")
                    e.stop(timeout=5)
                    self._restart_later(e)
                elif e.health == Health.READY:
                    e.failed_checks += 1
                    if e.failed_checks >= 2:
                        e.health = Health.UNHEALTHY
                changed |= before != (e.health, e.proc.pid if e.proc else None)
            if changed:
                self._write()

    def _restart_later(self, e: Engine) -> None:
        """A dead (or never ready) engine: restart it after the backoff, or mark it failed after max_restarts."""
        rcfg = self.cfg.restart
        if e.restarts >= rcfg.max_restarts:
            e.health = Health.FAILED
        else:
            e.health = Health.RESTARTING
            e.next_start = time.monotonic() + min(rcfg.backoff_max_s, rcfg.backoff_s * 2**e.restarts)

    def run(self) -> None:
        while not self.stop_event.wait(self.cfg.health_interval_s):
            self.tick()

    def shutdown(self) -> None:
        with self.lock:
            for e in self.engines.values():
                e.stop()
                e.health = Health.STOPPED
            self._write()

    # -- run-time changes ------------------------------------------------------------------------------------
    def add_elite(self, elite_id: str) -> EliteEntry:
        """Materialise ``elite_id`` as an adapter and load it into the least-loaded ready engine.

        Materialisation and scoring (minutes on a real model) run without the supervisor lock, so health checks,
        restarts and ``/manifest`` carry on meanwhile; the lock is taken to check, and again to load and publish.
        """
        with self.lock:
            self._check_can_add(elite_id)
            if self.materialise_one is None:
                raise ServeError("this supervisor cannot materialise elites")
            self.adding.add(elite_id)
        try:
            with self.materialise_lock:
                art = self.materialise_one(elite_id)
            path = self._check_adapter_path(art.path)
            with self.lock:
                self.adding.discard(elite_id)
                lora = self._check_can_add(elite_id)
                engine = min(lora, key=lambda e: len(e.adapters))
                r = httpx.post(
                    f"{engine.local_url}/v1/load_lora_adapter",
                    json={"lora_name": elite_id, "lora_path": str(path)},
                    headers=engine.auth,
                    timeout=120,
                )
                if r.status_code != 200:
                    raise ServeError(
                        f"{engine.plan.id} refused adapter {elite_id!r}: HTTP {r.status_code} {r.text[:300]}"
                    )
                engine.adapters[elite_id] = path
                engine.plan.elites.append(elite_id)
                entry = elite_entry(art, engine)
                self.manifest.elites.append(entry)
                self._write()
                return entry
        finally:
            with self.lock:
                self.adding.discard(elite_id)

    def _check_can_add(self, elite_id: str) -> list[Engine]:
        """The ready multi-LoRA engines, when ``elite_id`` can be added (call with the lock held)."""
        self._check_single_replica("adding")
        if any(el.id == elite_id for el in self.manifest.elites) or elite_id in self.adding:
            raise ServeError(f"elite {elite_id!r} is already served or being added")
        lora = [e for e in self.engines.values() if e.plan.mode == "lora" and e.health == Health.READY]
        if not lora:
            raise ServeError("adding an elite at run time needs mode: lora and a ready engine")
        return lora

    def _check_single_replica(self, what: str) -> None:
        """Run-time changes act on one engine; with replicas the others would silently serve a different set."""
        if self.cfg.replicas > 1:
            raise ServeError(
                f"{what} an elite at run time is not supported with replicas: {self.cfg.replicas} (only one replica "
                "would change); change the selection and restart"
            )

    def remove_elite(self, elite_id: str) -> None:
        with self.lock:
            self._check_single_replica("removing")
            entry = next((el for el in self.manifest.elites if el.id == elite_id), None)
            if entry is None:
                raise ServeError(f"elite {elite_id!r} is not served")
            engine = self.engines[entry.engine_id]
            if engine.plan.mode != "lora":
                raise ServeError(f"elite {elite_id!r} has its own full-weight engine; removing it needs a restart")
            r = httpx.post(
                f"{engine.local_url}/v1/unload_lora_adapter",
                json={"lora_name": elite_id},
                headers=engine.auth,
                timeout=60,
            )
            if r.status_code != 200:
                raise ServeError(
                    f"{engine.plan.id} refused to unload {elite_id!r}: HTTP {r.status_code} {r.text[:300]}"
                )
            engine.adapters.pop(elite_id, None)
            engine.plan.elites.remove(elite_id)
            self.manifest.elites = [el for el in self.manifest.elites if el.id != elite_id]
            self._write()

    # -- manifest --------------------------------------------------------------------------------------------
    def _write(self) -> None:
        with self.lock:
            self.manifest.engines = [
                EngineEntry(
                    id=e.plan.id,
                    url=e.url,
                    device=e.plan.device.name,
                    mode=e.plan.mode,  # type: ignore[arg-type]
                    base_model=str(e.model),
                    pid=e.proc.pid if e.proc else None,
                    health=e.health,
                    restarts=e.restarts,
                    log=str(e.log),
                )
                for e in self.engines.values()
            ]
            for elite in self.manifest.elites:
                elite.health = self.manifest.health_of(elite)
            save_manifest(self.manifest_path, self.manifest)


def elite_entry(art: Artifact, engine: Engine) -> EliteEntry:
    sel = art.selected
    return EliteEntry(
        id=sel.id,
        engine_id=engine.plan.id,
        served_model_name=sel.id,
        endpoint=f"{engine.url}/v1",
        kind=art.kind,  # type: ignore[arg-type]
        lora_rank=art.lora_rank,
        scores=art.scores,
        served_scores=art.served_scores,
        calibration_scores=art.calibration_scores,
        test_scores=sel.test_scores,
        lineage=sel.lineage,
        selected_by=sel.selected_by,
    )
