"""One engine process: a vLLM OpenAI-compatible server, its command line, environment, priority and stop.

Each engine is ``python -m vllm.entrypoints.openai.api_server`` in its own process group (so a stop reaches
vLLM's engine-core and worker children too) with the kernel told to SIGTERM it if the supervisor dies
(``PR_SET_PDEATHSIG``): no orphan survives either a graceful stop or a killed supervisor. Its output goes to one
log file per engine. An engine starts at a raised CPU priority (``startup_nice``, back to normal once it answers), so
that a restart next to a busy replica on a saturated CPU completes.

Every engine requires an API key on its ``/v1`` routes (vLLM's ``--api-key``, given as ``VLLM_API_KEY`` so that it
appears in neither the process list nor the engine's log; see ``serve.preflight.resolve_engine_key``). The key is
never written to the manifest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cycleqd.auth import ENGINE_KEY_ENV, ENGINE_KEY_FILE_ENV
from serve.config import ServeConfig
from serve.manifest import Health
from serve.plan import GIB, EnginePlan
from serve.preflight import ServeError

BASE_SERVED_NAME = "base"


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
