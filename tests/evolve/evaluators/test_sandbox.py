"""The sandbox against hostile answers: every one scores zero, honest answers around them still pass, and the
host is untouched (no file written, no connection made, no process left behind)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evolve.evaluators import sandbox
from evolve.evaluators.sandbox import Job, Limits

PWNED = Path("/tmp/cycleqd-sandbox-pwned")

HOSTILE = {
    "infinite loop": "def f(x):\n    while True:\n        pass",
    "cpu bomb (C-level bigint)": "lambda x: 10 ** 10 ** 8",
    "memory bomb (list)": "lambda x: [0] * 10 ** 10",
    "memory bomb (str)": "lambda x: 'a' * 10 ** 11",
    "output bomb": "lambda x: 'a' * 10 ** 6",
    "fork bomb": "def f(x):\n    import os\n    while True:\n        os.fork()",
    "fork via __import__": "__import__('os').fork()",
    "file write": f"lambda x: open('{PWNED}', 'w').write('x')",
    "file read": "lambda x: open('/etc/passwd').read()",
    "network": "__import__('socket').create_connection(('127.0.0.1', PORT))",
    "builtins dict": "__builtins__['__import__']('os').system('touch {PWNED}')",
    "subclass walk": "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]",
    "function globals": "(lambda: 0).__globals__",
    "getattr escape": "getattr(x, '__class__')",
    "format escape": "'{0.__class__.__base__}'.format(x)",
    "eval": "eval('1 + 1')",
    "exec": "exec('import os')",
    "globals": "globals()",
    "type mro": "type(x).mro()",
    "swallow timeout": "def f(x):\n    while True:\n        try:\n            pass\n        except BaseException:\n            pass",
    "generator frame": "def f(x):\n    g = (v for v in [1])\n    return g.gi_frame.f_globals",
    "class definition": "class A:\n    pass",
    "decorator": "def f(x):\n    return x\n@f\ndef g(x):\n    return x",
}


@pytest.fixture()
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    yield srv
    srv.close()


def _parent(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


def _ours_or_orphaned(pid: str) -> bool:
    """Whether ``pid`` descends from this test process or was orphaned (re-parented to init, as an escaped
    daemon would be); sandboxes that other processes on the machine run do not count."""
    me = str(os.getpid())
    ppid = _parent(pid)
    if ppid == "1":
        return True
    while ppid not in (None, "0", "1"):
        if ppid == me:
            return True
        ppid = _parent(ppid)
    return False


def _workers_alive() -> list[str]:
    alive = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if sandbox.WORKER.name.encode() in cmd and _ours_or_orphaned(pid):
                alive.append(pid)
    return alive


def test_hostile_answers_score_zero_and_leave_the_host_untouched(listener):
    PWNED.unlink(missing_ok=True)
    port = listener.getsockname()[1]
    honest = Job("lambda x: x + 1", ("x",), ((1,), (2,)))
    jobs = []
    for code in HOSTILE.values():
        jobs.append(Job(code.replace("PORT", str(port)).replace("{PWNED}", str(PWNED)), ("x",), ((1,),)))
        jobs.append(honest)  # each honest answer right after a hostile one must still pass
    outcomes = sandbox.run(jobs, Limits(seconds_per_job=1.0))
    assert len(outcomes) == len(jobs)
    for name, outcome in zip(HOSTILE, outcomes[::2], strict=True):
        assert not outcome.ok, f"{name} was not stopped: {outcome}"
    for outcome in outcomes[1::2]:
        assert outcome.ok and outcome.outputs == ("2", "3")
    assert not PWNED.exists()
    with pytest.raises(TimeoutError):
        listener.accept()
    assert _workers_alive() == []


def test_honest_answers_in_every_accepted_form():
    jobs = [
        Job("lambda x: x * 2", ("x",), ((3,),)),
        Job("x * 2", ("x",), ((3,),)),
        Job("def double(x):\n    y = x\n    return y * 2", ("x",), ((3,),)),
        Job("def f(xs):\n    out = []\n    for v in xs:\n        if v > 1:\n            out.append(v)\n    return out", ("xs",), (([1, 2, 3],),)),
    ]  # fmt: skip
    outcomes = sandbox.run(jobs)
    assert [o.outputs for o in outcomes] == [("6",), ("6",), ("6",), ("[2, 3]",)]


def test_a_worker_crash_costs_only_the_culprit():
    jobs = [Job("lambda x: x", ("x",), ((i,),)) for i in range(3)]
    jobs.insert(1, Job("lambda x: 10 ** 10 ** 9", ("x",), ((1,),)))
    outcomes = sandbox.run(jobs, Limits(seconds_per_job=0.5))
    assert [o.ok for o in outcomes] == [True, False, True, True]
    assert [o.outputs for o in outcomes if o.ok] == [("0",), ("1",), ("2",)]


LAYER_PROBE = textwrap.dedent(
    """
    import importlib.util, json, os, socket, sys
    spec = importlib.util.spec_from_file_location("w", sys.argv[1])
    w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)
    w.confine({"memory_bytes": 256 * 2**20})
    sys.addaudithook(w.audit)
    w.UNTRUSTED[0] = True
    results = {}
    for name, attempt in {
        "fork": lambda: os.fork(),
        "open": lambda: open(sys.argv[2], "w"),
        "socket": lambda: socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=0.2),
        "system": lambda: os.system("true"),
        "import": lambda: __import__("subprocess"),
    }.items():
        try:
            attempt()
            results[name] = "allowed"
        except BaseException as exc:
            results[name] = type(exc).__name__
    w.UNTRUSTED[0] = False
    print(json.dumps(results))
    """
)


def test_process_layers_hold_without_the_ast_check(tmp_path, listener):
    """With the AST check bypassed, the audit hook and rlimits still refuse fork, files, sockets, imports."""
    probe = tmp_path / "probe.py"
    probe.write_text(LAYER_PROBE)
    target = tmp_path / "written"
    os.chmod(tmp_path, 0o777)
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(probe), str(sandbox.WORKER), str(target), str(listener.getsockname()[1])],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results == dict.fromkeys(["fork", "open", "socket", "system", "import"], "PermissionError"), results
    assert not target.exists()
    with pytest.raises(TimeoutError):
        listener.accept()


# Runs normally, but freeing its default argument (a million nested enumerate objects) overflows the C stack.
CRASH_ON_FREE = (
    "def mk(n):\n    e = []\n    for i in range(n):\n        e = enumerate(e)\n    return e\n"
    "def f(x, d=mk(600000)):\n    return x"
)


def test_a_crash_while_freeing_an_answer_is_charged_to_that_answer():
    """Before, the crash came during the next answer (when its cycle was collected) and scored *it* zero."""
    honest = Job("lambda x: len([[v] for v in range(100000)]) + x", ("x",), ((1,),))
    outcomes = sandbox.run([Job(CRASH_ON_FREE, ("x",), ((1,),)), *[honest] * 5], Limits(seconds_per_job=2.0))
    # here "worker died (SIGSEGV)"; where a larger C stack survives the free, the answer simply passes
    assert "SIGSEGV" in outcomes[0].error or outcomes[0].outputs == ("1",), outcomes[0]
    assert [o.outputs for o in outcomes[1:]] == [("100001",)] * 5
