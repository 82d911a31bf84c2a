"""Grader worker: runs a ``jsonl`` skill's ``module:function`` grader in a process of its own, under limits.

Started by :mod:`evolve.evaluators.jsonl` as ``python -P <this file>`` with the evolution process's working directory,
environment and ``sys.path`` (the grader imports as it would there). Standard library only; it imports nothing from
the project itself (the grader's module may). Protocol: one JSON document on stdin
``{"grader": "module:function", "sys_path": [...], "limits": {...}, "jobs": [{"answer": str, "item": dict}...]}``;
on stdout one JSON line ``{"ready": true}`` once the grader is imported (or ``{"fatal": reason}``), then one line
per job, ``{"score": float}`` or ``{"error": reason}``, written as each job finishes so that the parent keeps
every result before a crash.

Limits, applied before the grader's module is imported: address space (``memory_bytes``), CPU seconds (the whole
batch's budget as the hard limit, the soft limit re-armed per job), a wall clock per job (an interval timer here;
the parent also kills the worker's process group when a job's line is late), file size, no core dumps, and no
network where the kernel allows it (a private network namespace, else an audit hook that vetoes sockets). What the
grader prints goes to stderr, never into the protocol.
"""

import importlib
import json
import math
import os
import resource
import signal
import sys
import traceback


class JobTimeout(BaseException):
    """Raised by the interval timer; a BaseException so that a grader's ``except Exception`` cannot swallow it."""


def on_alarm(signum, frame):
    raise JobTimeout()


NETWORK_EVENTS = {
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "socket.sendmsg",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
}


def no_network(event: str, args: tuple) -> None:
    if event in NETWORK_EVENTS:
        raise PermissionError(f"grader worker: no network ({event})")


def confine(limits: dict, n_jobs: int) -> str:
    """Apply the limits; returns how the network was cut off (``namespace`` or ``audit hook``)."""
    mem = int(limits["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    fsize = int(limits["file_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    hard_cpu = int(limits["import_seconds"] + n_jobs * (limits["seconds_per_job"] + 1)) + 5
    resource.setrlimit(resource.RLIMIT_CPU, (hard_cpu, hard_cpu))
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flags = 0x40000000  # CLONE_NEWNET: a namespace whose only interface is a loopback that is down
        if os.geteuid() != 0:
            flags |= 0x10000000  # CLONE_NEWUSER: what an unprivileged process needs for that
        if libc.unshare(flags) == 0:
            return "namespace"
    except Exception:  # noqa: S110 (no namespaces here: the audit hook below still refuses sockets)
        pass
    sys.addaudithook(no_network)
    return "audit hook"


def load(grader: str):
    module, _, attr = grader.partition(":")
    try:
        mod = importlib.import_module(module)
    except BaseException as exc:
        return None, f"cannot import module {module!r} ({type(exc).__name__}: {exc})"
    fn = getattr(mod, attr, None)
    if fn is None:
        return None, f"module {module!r} has no {attr!r}"
    if not callable(fn):
        return None, f"{grader} is not a function (a {type(fn).__name__})"
    return fn, ""


def score_of(value) -> float:
    score = float(value)
    if math.isnan(score):
        raise ValueError("the grader returned NaN")
    return min(1.0, max(0.0, score))


def main() -> None:
    # The protocol gets a private copy of stdout; fd 1 becomes stderr, so a grader's prints cannot corrupt it.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.read())
    limits = request["limits"]
    jobs = request["jobs"]
    sys.path[:] = request["sys_path"]
    confine(limits, len(jobs))
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(limits["import_seconds"]))
    try:
        fn, why = load(request["grader"])
    except JobTimeout:
        fn, why = None, f"importing {request['grader']} took over {limits['import_seconds']} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if fn is None:
        out.write(json.dumps({"fatal": why}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    seconds = float(limits["seconds_per_job"])
    hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)[1]
    for job in jobs:
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = int(used.ru_utime + used.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (min(cpu + int(seconds) + 1, hard_cpu), hard_cpu))
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            result = {"score": score_of(fn(job["answer"], job["item"]))}
        except JobTimeout:
            result = {"error": f"timeout ({seconds:g} s)"}
        except BaseException as exc:  # whatever the grader raises scores its answer 0
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
            result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}{where}"}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
