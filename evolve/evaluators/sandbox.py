"""Run model-written Python safely: a batch of answers per locked-down worker process.

One process per *batch* rather than per answer keeps grading fast enough for evolution (hundreds of answers a
second); an answer that kills its worker (CPU or memory bomb) costs only itself: the parent keeps the results
already streamed back, scores the culprit zero and starts a fresh worker for the rest. An answer whose worker
died after others had run in it is re-run alone on a fresh worker first, so that a crash left behind by an
earlier answer is never charged to it. What the worker does to
confine itself is documented in ``_sandbox_worker.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("_sandbox_worker.py")


@dataclass(frozen=True)
class Job:
    """One answer to run: ``code`` is called once per argument tuple in ``calls``."""

    code: str
    argnames: tuple[str, ...]
    calls: tuple[tuple, ...]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    outputs: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class Limits:
    seconds_per_job: float = 1.0
    memory_bytes: int = 256 * 2**20
    max_output_chars: int = 10_000


def run(jobs: Sequence[Job], limits: Limits = Limits()) -> list[Outcome]:
    """Run every job; never raises because of what an answer does. Outputs are ``repr`` strings."""
    results: list[Outcome] = []
    pending = list(jobs)
    while pending:
        done, crashed = _run_worker(pending, limits)
        results.extend(done)
        pending = pending[len(done) :]
        if pending and crashed:
            if done:
                # Earlier answers ran in that worker: re-run this one alone on a fresh worker, so that what they
                # left behind can never be charged to it.
                alone, crashed_alone = _run_worker(pending[:1], limits)
                results.append(alone[0] if alone else Outcome(False, error=crashed_alone))
            else:
                results.append(Outcome(False, error=crashed))
            pending = pending[1:]
    return results


def _run_worker(jobs: Sequence[Job], limits: Limits) -> tuple[list[Outcome], str]:
    payload = json.dumps(
        {
            "jobs": [{"code": j.code, "argnames": list(j.argnames), "calls": [list(c) for c in j.calls]} for j in jobs],
            "limits": {
                "seconds_per_job": limits.seconds_per_job,
                "memory_bytes": limits.memory_bytes,
                "max_output_chars": limits.max_output_chars,
            },
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(WORKER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so a kill takes anything it managed to start
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        text=True,
    )
    # A hang guard, not the limit: an answer's CPU seconds are capped in the worker (RLIMIT_CPU, re-armed per job),
    # and an AST-checked answer cannot sleep or block, so only a starved machine makes the wall clock run long
    # (at a load of 12 on 2 cores, 1 CPU second took 6-12 s); then honest answers must not be charged for it.
    deadline = 30.0 + len(jobs) * (8 * limits.seconds_per_job + 1.0)
    crashed = ""
    try:
        stdout, _ = proc.communicate(payload, timeout=deadline)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, _ = proc.communicate()
        crashed = "killed: wall-clock deadline"
    finally:
        _kill_group(proc)
    done: list[Outcome] = []
    for line in stdout.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break
        done.append(Outcome(True, tuple(r["outputs"])) if r["ok"] else Outcome(False, error=r["error"]))
    if len(done) < len(jobs) and not crashed:
        code = proc.returncode
        crashed = f"worker died ({signal.Signals(-code).name})" if code and code < 0 else f"worker exit {code}"
    return done[: len(jobs)], crashed


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
