"""The OS sandbox against a hostile corpus: every attack is contained, the host is untouched (no file read or
written, no connection made, no process left behind), and the next episode is unaffected; plus what honest
programs and AgentBench-style sessions need (full Python, bash, a persistent shell, useradd and su as root).

Skipped, with the reason, where bubblewrap or the namespaces are unavailable (CI runs as root, so there they
run). Wall limits are hang guards, generous; what is asserted is that a limit fired, not how fast."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from evolve.evaluators import os_sandbox
from evolve.evaluators.base import EvaluatorError
from evolve.evaluators.os_sandbox import Limits, Result, SandboxUnavailable, Session

QUICK = Limits(wall_seconds=20, cpu_seconds=10, processes=48, output_bytes=4096)
PROJECT = Path(__file__).resolve().parents[3]


def need(privileged: bool) -> None:
    why = os_sandbox.available(privileged=privileged)
    if why:
        pytest.skip(why)


@pytest.fixture
def unpriv() -> None:
    need(False)


@pytest.fixture
def priv() -> None:
    need(True)


def token() -> str:
    """A unique sleep duration: a process of ours is found on the host by its command line, and nobody else's."""
    return f"1000.{secrets.randbelow(10**9)}"


def host_procs(tok: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if tok.encode() in cmdline and b"pytest" not in cmdline:
                found.append(int(entry))
    return found


def assert_gone(tok: str, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while host_procs(tok):
        assert time.monotonic() < deadline, f"processes outlived the episode: {host_procs(tok)}"
        time.sleep(0.05)


def sh(script: str, **kw) -> Result:
    return os_sandbox.run(["/bin/bash", "-c", script], limits=kw.pop("limits", QUICK), **kw)


def py(code: str, **kw) -> Result:
    return os_sandbox.run(["/usr/bin/python3", "-c", textwrap.dedent(code)], limits=kw.pop("limits", QUICK), **kw)


def etc_digest() -> str:
    h = hashlib.sha256()
    for name in ("passwd", "group", "shadow", "gshadow"):
        path = Path("/etc", name)
        h.update(path.read_bytes() if path.exists() else b"-")
    return h.hexdigest()


# -- availability -------------------------------------------------------------------------------------------------


def test_unavailable_says_what_is_missing_and_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os_sandbox, "_find_tool", lambda name: None)
    os_sandbox._probe.cache_clear()
    try:
        why = os_sandbox.available()
        assert why is not None and "bwrap" in why and "apt-get install bubblewrap" in why
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as err:
            os_sandbox.check_available()
        assert isinstance(err.value, EvaluatorError)
        with pytest.raises(SandboxUnavailable):
            os_sandbox.run(["/usr/bin/true"])
    finally:
        monkeypatch.undo()
        os_sandbox._probe.cache_clear()


# -- positives ----------------------------------------------------------------------------------------------------


def test_python3_runs_a_program_with_the_standard_library(unpriv: None) -> None:
    r = py(
        """
        import collections, json, math, re, sqlite3, subprocess, sys, tempfile, threading
        db = sqlite3.connect(":memory:"); db.execute("create table t(x)"); db.execute("insert into t values (41)")
        with tempfile.TemporaryDirectory() as d:
            pass
        print(json.dumps({"x": db.execute("select x + 1 from t").fetchone()[0], "prefix": sys.prefix,
                          "exe": sys.executable, "sqrt": math.isqrt(81)}))
        print(subprocess.run(["echo", "child"], capture_output=True, text=True).stdout.strip())
        """
    )
    assert r.ok, r
    assert '"x": 42' in r.stdout and '"prefix": "/usr"' in r.stdout and '"sqrt": 9' in r.stdout
    assert ".venv" not in r.stdout and ".pyenv" not in r.stdout
    assert r.stdout.endswith("child\n")


def test_bash_pipelines_files_stdin_and_cwd(unpriv: None) -> None:
    r = os_sandbox.run(
        ["/bin/bash", "-c", "pwd; cat data/in.txt | tr a-z A-Z | sort | uniq -c | awk '{print $2 $1}'; ./run.sh; cat"],
        files={"data/in.txt": "b\na\nb\n", "run.sh": "#!/bin/sh\necho script-ran\n"},
        stdin="from stdin\n",
        limits=QUICK,
    )
    assert r.ok, r
    assert r.stdout == "/workspace\nA1\nB2\nscript-ran\nfrom stdin\n"
    assert not r.truncated and not r.timed_out


def test_unprivileged_has_no_capabilities_and_its_own_user(unpriv: None) -> None:
    r = sh("id -u; grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; hostname; echo $HOME; touch ~/x /tmp/y && echo w")
    assert r.ok, r
    lines = r.stdout.split()
    assert lines[0] == "1000"
    assert "0000000000000000" in r.stdout and "CapEff:\t0000000000000000" in r.stdout
    assert "sandbox" in lines and "/home/sandbox" in lines and lines[-1] == "w"


def test_files_must_stay_in_the_working_directory(unpriv: None) -> None:
    for bad in ("../escape", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError):
            os_sandbox.run(["/usr/bin/true"], files={bad: "x"})
    with pytest.raises(ValueError):
        os_sandbox.run(["/usr/bin/true"], cwd="/usr/lib")


# -- reading the host ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_host_files_are_not_there_to_be_read(privileged: bool) -> None:
    need(privileged)
    venv_python = PROJECT / ".venv" / "bin" / "python"
    r = sh(
        f"""
        for p in /work {PROJECT} {PROJECT}/pyproject.toml {venv_python} /root/.pyenv /root/.ssh /etc/ssh \
                 /etc/ssl/private /etc/pip.conf /etc/npmrc /var/lib /run/docker.sock /sys /tmp/*; do
            [ -e "$p" ] && echo "VISIBLE $p"
        done
        ls -A /root /home | grep -v -e '^/' -e '^$' -e '^sandbox$' | sed 's/^/LISTED /'
        cat /etc/shadow 2>/dev/null
        true
        """,
        privileged=privileged,
    )
    assert r.ok, r
    assert "VISIBLE" not in r.stdout and "LISTED" not in r.stdout, r.stdout
    host_shadow = Path("/etc/shadow")
    if host_shadow.exists() and os.access(host_shadow, os.R_OK):
        hashes = [f.split(":")[1] for f in host_shadow.read_text().splitlines() if f.count(":") > 2]
        for secret in (h for h in hashes if len(h) > 2):
            assert secret not in r.stdout
    if privileged:  # a shadow file is there (useradd needs it), every password locked
        entries = [line.split(":") for line in r.stdout.splitlines() if line.count(":") >= 8]
        assert entries and all(e[1] == "*" for e in entries)


def test_project_and_venv_are_not_readable_even_by_root_inside(priv: None) -> None:
    r = py(
        f"""
        import os
        for p in ["{PROJECT}", "{PROJECT}/.venv", "/proc/1/root{PROJECT}"]:
            print(p, os.path.exists(p))
        """,
        privileged=True,
    )
    assert r.ok, r
    assert "True" not in r.stdout


# -- network ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_no_network_at_all(privileged: bool) -> None:
    need(privileged)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        r = py(
            f"""
            import socket
            for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
                try:
                    socket.create_connection(addr, timeout=3)
                    print("CONNECTED", addr)
                except OSError as e:
                    print("refused", addr, e.errno)
            try:
                socket.getaddrinfo("example.com", 80)
                print("RESOLVED")
            except OSError:
                print("no dns")
            print(sorted(n for _, n in socket.if_nameindex()))
            """,
            privileged=privileged,
        )
        assert r.ok, r
        assert "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout, r.stdout
        assert "no dns" in r.stdout and "['lo']" in r.stdout
        with pytest.raises(OSError):  # nothing reached the host's listener
            listener.accept()
    finally:
        listener.close()


# -- writing outside the episode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_writes_stay_in_the_episode(privileged: bool) -> None:
    need(privileged)
    mark = f"cycleqd-os-sandbox-{secrets.token_hex(4)}"
    r = sh(
        f"""
        echo x > /tmp/{mark} && echo tmp-ok
        echo x > /usr/{mark} 2>/dev/null || echo usr-ro
        echo x > /usr/bin/{mark} 2>/dev/null || echo usrbin-ro
        echo x > /dev/{mark} 2>/dev/null || echo dev-ro
        echo x > /proc/sys/kernel/{mark} 2>/dev/null || echo procsys-ro
        python3 -c 'import os; os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY)' 2>/dev/null || echo core-ro
        """,
        privileged=privileged,
    )
    assert r.ok, r
    # A privileged episode has a writable /usr of its own (the host's entries bound read-only into it, for
    # AgentBench's tasks that write /usr/stock.log); the host's /usr/bin stays read-only either way.
    usr = [] if privileged else ["usr-ro"]
    assert r.stdout.split() == ["tmp-ok", *usr, "usrbin-ro", "dev-ro", "procsys-ro", "core-ro"]
    for path in (f"/tmp/{mark}", f"/usr/{mark}", f"/usr/bin/{mark}", f"/dev/{mark}"):
        assert not os.path.exists(path)
    # and the next episode starts from a clean root
    leaked = f"test -e /tmp/{mark} && echo LEAKED; test -e /usr/{mark} && echo LEAKED; true"
    assert sh(leaked, privileged=privileged).stdout == ""


def test_disk_is_bounded(unpriv: None) -> None:
    small = Limits(wall_seconds=20, file_bytes=8 << 20, disk_bytes=16 << 20)
    r = sh("head -c 20000000 /dev/zero > one; ls -l one | awk '{print $5}'", limits=small)
    assert r.stdout.strip() == str(8 << 20) and "File size limit exceeded" in r.stderr
    r = sh("for i in 1 2 3 4; do head -c 6000000 /dev/zero > f$i || echo full; done", limits=small)
    assert "full" in r.stdout and "No space left" in r.stderr


# -- resource bombs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_fork_bomb_hits_the_process_cap_and_nothing_is_left(privileged: bool) -> None:
    need(privileged)
    tok = token()
    limits = Limits(wall_seconds=3, processes=24)
    t0 = time.monotonic()
    r = sh(f"sleep {tok} & :(){{ :|:& }};: ; sleep {tok}", limits=limits, privileged=privileged)
    assert time.monotonic() - t0 < limits.wall_seconds + 5
    assert r.timed_out and r.returncode is None
    assert "Resource temporarily unavailable" in r.stderr
    assert_gone(tok)
    r = py(
        """
        import os, time
        n = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print(n)
        """,
        limits=limits,
        privileged=privileged,
    )
    assert r.ok, r
    assert 0 < int(r.stdout) < limits.processes


def test_fork_cap_without_cgroups_falls_back_to_rlimit_nproc(monkeypatch: pytest.MonkeyPatch, unpriv: None) -> None:
    """Where no pids cgroup can be written: RLIMIT_NPROC under a uid of the episode's own."""
    monkeypatch.setenv("CYCLEQD_SANDBOX_NO_CGROUP", "1")
    os_sandbox._cgroups.cache_clear()
    os_sandbox._probe.cache_clear()
    try:
        assert os_sandbox.available(privileged=True) is not None  # root inside cannot be capped that way
        why = os_sandbox.available()
        if why:
            pytest.skip(why)
        tok = token()
        limits = Limits(wall_seconds=3, processes=16)
        r = sh(f"sleep {tok} & :(){{ :|:& }};: ; sleep {tok}", limits=limits)
        assert r.timed_out and "Resource temporarily unavailable" in r.stderr
        assert_gone(tok)
    finally:
        monkeypatch.undo()
        os_sandbox._cgroups.cache_clear()
        os_sandbox._probe.cache_clear()


def test_memory_bomb(unpriv: None) -> None:
    r = py("x = bytearray(3 << 30)", limits=Limits(wall_seconds=20, memory_bytes=512 << 20))
    assert r.returncode == 1 and "MemoryError" in r.stderr
    assert sh("echo fine").ok


def test_cpu_loop_is_stopped_by_the_cpu_limit_and_sleep_by_the_wall_clock(unpriv: None) -> None:
    t0 = time.monotonic()
    r = py("while True: pass", limits=Limits(wall_seconds=20, cpu_seconds=1))
    assert r.returncode == 128 + signal.SIGXCPU and not r.timed_out
    assert time.monotonic() - t0 < 15
    t0 = time.monotonic()
    r = sh("sleep 60", limits=Limits(wall_seconds=1))
    assert r.timed_out and r.returncode is None and not r.ok
    assert time.monotonic() - t0 < 5


def test_output_flood_is_truncated_and_flagged(unpriv: None) -> None:
    r = sh("yes | head -c 50000000; yes err | head -c 5000000 >&2; echo done >&2", limits=Limits(output_bytes=1000))
    assert r.ok and r.truncated
    assert len(r.stdout) == 1000 and len(r.stderr) == 1000
    assert not sh("echo small").truncated


# -- processes that try to outlive the episode, signals to the host -----------------------------------------------


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_background_processes_do_not_outlive_run(privileged: bool) -> None:
    need(privileged)
    tok = token()
    r = sh(
        f"sleep {tok} & nohup sleep {tok} >/dev/null 2>&1 & setsid sleep {tok} & "
        f"(setsid bash -c 'trap \"\" HUP TERM; exec sleep {tok}' &) ; echo started",
        privileged=privileged,
    )
    assert r.ok and r.stdout == "started\n", r
    assert_gone(tok)


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_signals_to_the_parent_do_not_reach_the_host(privileged: bool) -> None:
    need(privileged)
    r = sh("kill -9 $PPID; kill -9 -1; kill -9 0; kill -9 1; echo alive", privileged=privileged)
    assert r.stdout in ("alive\n", ""), r  # kill 0 may take the program itself; the host is what matters
    assert os.getppid() > 0
    assert sh("echo next", privileged=privileged).stdout == "next\n"


def test_teardown_leaves_no_cgroup_behind(unpriv: None) -> None:
    cgroups, _ = os_sandbox._cgroups()
    if cgroups is None:
        pytest.skip("no pids cgroup on this machine")
    sh("true")
    mine = [n for n in os.listdir(cgroups.parent) if n.startswith(f"{os.getpid()}-")]
    assert mine == []


# -- sessions (AgentBench OS episodes) ----------------------------------------------------------------------------


def test_session_keeps_cwd_variables_functions_and_jobs(priv: None) -> None:
    with Session(limits=QUICK, files={"notes/a.txt": "alpha\n"}) as s:
        assert s.execute("pwd").stdout == "/workspace\n"
        assert s.execute("cd notes && export X=5 && f() { echo f$1; }").ok
        r = s.execute("pwd; echo $X; f 1; cat a.txt")
        assert r.stdout == "/workspace/notes\n5\nf1\nalpha\n", r
        r = s.execute("echo out; echo err >&2; exit_code() { return 3; }; exit_code")
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert s.execute("sleep 30 &").ok
        assert "sleep 30" in s.execute("jobs").stdout
        r = s.execute("cat <<'EOF'\nmulti 'line' \"quotes\" $X\nEOF\necho 'unbalanced")
        assert r.stdout == "multi 'line' \"quotes\" $X\n" and r.returncode != 0
        assert s.execute("cat").stdout == ""  # stdin is /dev/null: a command never hangs on it
        assert s.execute("echo $X").stdout == "5\n"


def test_session_scripts_share_the_filesystem_and_pid_namespace(priv: None) -> None:
    with Session(limits=QUICK, files={"task.txt": "42\n"}) as s:
        assert s.execute("cd /tmp && Y=1 && echo made > /workspace/made.txt").ok
        r = s.run_script("pwd; cat task.txt made.txt; echo ${Y:-unset}")
        assert r.stdout == "/workspace\n42\nmade\nunset\n", r
        r = s.run_script("import os; print(sorted(os.listdir('.')))", language="python3")
        assert r.stdout == "['made.txt', 'task.txt']\n", r
        tok = token()
        s.start_background(f"exec sleep {tok}")
        deadline = time.monotonic() + 5
        while "sleep" not in s.run_script(f"ps -eo args | grep '[s]leep {tok}'").stdout:
            assert time.monotonic() < deadline
        assert s.run_script("exit 7").returncode == 7
        r = s.run_script("sleep 30", timeout=1)
        assert r.timed_out and r.returncode is None
        assert host_procs(tok)
    assert_gone(tok)


def test_session_hung_commands_are_interrupted_and_the_session_stays_usable(priv: None) -> None:
    with Session(limits=QUICK) as s:
        s.execute("cd /tmp; X=kept")
        t0 = time.monotonic()
        r = s.execute("sleep 60", timeout=1)
        assert r.timed_out and r.returncode is None and time.monotonic() - t0 < 10
        assert s.execute("pwd; echo $X").stdout == "/tmp\nkept\n"
        # a program that ignores SIGINT is killed; the shell and its state survive
        r = s.execute("python3 -c 'import signal, time; signal.signal(2, signal.SIG_IGN); time.sleep(60)'", timeout=1)
        assert r.timed_out
        assert s.execute("pwd; echo $X").stdout == "/tmp\nkept\n"
        # a shell that ignores SIGINT itself is replaced by a fresh one (its state is lost, the files are not)
        s.execute("echo keep > /workspace/f")
        r = s.execute("trap '' INT; while :; do :; done", timeout=1)
        assert r.timed_out and "new shell" in r.stderr
        assert s.execute("pwd; echo ${X:-gone}; cat /workspace/f").stdout == "/workspace\ngone\nkeep\n"
        r = s.execute("exit 4")
        assert r.returncode == 4 and "new shell" in r.stderr
        assert s.execute("echo back").stdout == "back\n"


def test_session_background_processes_die_at_close(priv: None) -> None:
    tok = token()
    s = Session(limits=QUICK)
    try:
        assert s.execute(f"sleep {tok} & nohup sleep {tok} >/dev/null 2>&1 & (setsid sleep {tok} &); echo ok").ok
        s.start_background(f"setsid sleep {tok}")
        r = s.execute("kill -9 -1; echo survived")  # kills everything but the shell and pid 1
        assert r.stdout == "survived\n", r
        assert s.execute(f"sleep {tok} & disown; echo again").ok
        assert s.execute("echo usable").stdout == "usable\n"
        assert host_procs(tok)
    finally:
        s.close()
        s.close()  # idempotent
    assert s.closed
    assert_gone(tok)
    with pytest.raises(EvaluatorError):
        s.execute("echo closed")


def test_session_dies_with_the_process_that_opened_it(priv: None) -> None:
    tok = token()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from evolve.evaluators.os_sandbox import Session\n"
            "s = Session()\n"
            f"s.execute('sleep {tok} &')\n"
            f"s.start_background('setsid sleep {tok}')\n"
            "print('ready', flush=True)\n"
            "import time; time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        cwd=PROJECT,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert host_procs(tok)
    finally:
        child.kill()
        child.wait()
    assert_gone(tok)


def test_useradd_and_su_as_root_leave_the_host_etc_untouched(priv: None) -> None:
    for tool in ("useradd", "su"):
        if os_sandbox._find_tool(tool) is None:
            pytest.skip(f"{tool} is not installed on this machine")
    before = etc_digest()
    with Session(limits=QUICK) as s:
        r = s.execute("grep -E '^Cap(Eff|Prm)' /proc/self/status; id -u")
        assert r.stdout == "CapPrm:\t00000000000000cb\nCapEff:\t00000000000000cb\n0\n", r
        r = s.execute("useradd -m -G root,sudo bob && su - bob -c whoami && id -nG bob && ls -A /home/bob")
        assert r.ok, r
        assert r.stdout.splitlines()[:2] == ["bob", "bob root sudo"]
        assert ".bashrc" in r.stdout
        assert s.execute("echo 'bob:secret' | chpasswd && grep -c '^bob:\\$' /etc/shadow").stdout == "1\n"
        assert s.run_script("id bob >/dev/null && echo bob-exists").stdout == "bob-exists\n"
        r = s.execute("mount -t tmpfs none /mnt 2>&1; date -s 2000-01-01 2>&1 >/dev/null; echo $?")
        assert "permission denied" in r.stdout.lower() or "not permitted" in r.stdout.lower(), r
    assert etc_digest() == before
    assert b"\nbob:" not in Path("/etc/passwd").read_bytes()


def test_session_with_its_process_cap_full_answers_instead_of_raising(priv: None) -> None:
    fill = (
        "import os, time\ntime.sleep(1)\nwhile True:\n    try:\n        if os.fork() == 0:\n"
        "            time.sleep(60)\n            os._exit(0)\n    except OSError:\n        break\ntime.sleep(60)"
    )
    with Session(limits=Limits(wall_seconds=20, processes=16)) as s:
        s.start_background(fill, language="python3")  # fills the cap once the shell below is gone
        assert "new shell" in s.execute("exit").stderr
        time.sleep(2.5)
        r = s.execute("echo hi")  # no room for a new shell: a failed result, not an exception
        assert isinstance(r, Result) and not r.ok and "sandbox" in r.stderr, r
        assert not s.run_script("echo x").ok
        assert not s.execute("echo again").ok
