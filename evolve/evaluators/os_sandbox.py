"""The OS-level sandbox: full Python 3 and real bash/coreutils for model-written programs and shell episodes.

The embedded world's tiny answers use the fast AST sandbox (``sandbox.py``). Everything that needs a real
interpreter or a real shell (benchmark code such as HumanEval, AgentBench's OS episodes, ``unsafe_code`` lm-eval
tasks, user graders) runs here instead, confined by the kernel rather than by inspecting the code.

What one episode gets (bubblewrap 0.8 does the namespaces and the mounts):

* private mount, pid, network, ipc, uts (and, where the kernel has it, cgroup) namespaces; no network at all (a
  fresh network namespace holds only its own loopback), ``--die-with-parent`` and ``--new-session``;
* a throw-away writable root: a tmpfs of ``Limits.disk_bytes`` (memory, freed when the episode ends) with the
  host's ``/usr`` bound read-only on top, the merged-usr links (``/bin`` -> ``usr/bin`` ...), a fresh ``/proc`` of
  the episode's pid namespace whose ``/proc/sys`` is read-only (a root inside could otherwise set host-wide
  sysctls such as ``kernel.core_pattern``, which runs a program as host root), a minimal ``/dev`` (read-only but
  for its device nodes and a small ``/dev/shm``) and an ``/etc`` built per episode from an allowlist of the
  host's (see ``_ETC_COPY_BASE``): nothing else of the host is visible, so the project (``/work``), its ``.venv``,
  ``/root``, ``/home`` and ``/etc``'s secrets (``shadow``, ``ssh``, ``ssl/private``, ``pip.conf``...) are not there to
  be read. ``/etc/shadow`` and ``/etc/gshadow`` are generated from the account lists with every password locked;
* rlimits: address space, CPU seconds, file size, open files, no core dumps;
* a cap on processes (see "Process cap" below) and a wall-clock limit: when it expires, or when the episode ends
  for any reason, the whole tree is killed, background and ``setsid``/``nohup`` processes included, because they
  all live in the episode's pid namespace and killing its init makes the kernel kill every member.

Two modes:

* unprivileged (:func:`run`'s default; HumanEval, graders): a user namespace too, uid 1000 inside, no
  capabilities, and no nested user namespaces (``--disable-userns``);
* privileged (AgentBench OS episodes, :class:`Session`'s default): no user namespace, because inside one only a
  single uid and gid are mapped and ``useradd`` then fails writing ``/etc/shadow``. It is root inside, confined by
  the namespaces above with its capabilities cut to CHOWN, DAC_OVERRIDE, FOWNER, SETUID and SETGID (enough for
  ``useradd -m -G root,sudo bob`` and ``su - bob``; not enough to mount, load modules, trace, change the clock or
  reach past the namespaces). bubblewrap always sets ``no_new_privs``, so no exec can gain more. This needs the
  host process to be root (CI runs as root).

Process cap. ``RLIMIT_NPROC`` is never enforced for real uid 0, and both modes start as root here, so the cap is a
cgroup: a ``pids`` cgroup per episode (cgroup v2 where its ``pids`` controller can be enabled under a child of
the hierarchy's root, else a v1 ``pids`` hierarchy, which this machine has), created under
``<hierarchy>/cycleqd-sandbox/`` with ``pids.max = Limits.processes``, removed at teardown; leaves of crashed
processes are swept at the first use and every 256 episodes. Where no pids cgroup can be written, unprivileged
episodes fall back to ``RLIMIT_NPROC``: a non-root host sets it on the episode's first process after its user
namespace exists, so it counts only that namespace's processes; a root host starts bubblewrap under a uid of the
episode's own (from a range no account uses, since the kernel exempts uid 0), with the limits set by
``prlimit`` before bwrap (root here lacks CAP_SYS_RESOURCE, so it cannot set another uid's limits). Privileged
episodes have no such fallback (their processes are uid 0), so without a writable pids cgroup they are
unavailable, with the reason. Set ``CYCLEQD_SANDBOX_NO_CGROUP=1`` to force the fallback (the tests do).

Moving a process into a cgroup waits for an RCU grace period when none is in flight (kernel: the cgroup
threadgroup lock), so it costs 0 to 15 ms depending on load and on how recently the last move was; it is most of
an episode's start-up on a busy machine. Hosts that start many episodes can mount the hierarchy with
``favordynmods`` (kernel 6.0+) to make it cheap; this module does not change host mounts.

Race-free confinement without ``preexec_fn``: bubblewrap is started with ``--info-fd`` and ``--block-fd``; the
first process of the sandbox waits on the block fd, fully set up but before it forks anything, while this
process moves it into the episode's cgroup and sets its rlimits (``prlimit``), then lets it go. No Python runs
between fork and exec, so ``subprocess`` keeps its fast ``vfork`` path even in a large, threaded parent (an evolve
worker holding a model), and nothing the sandbox starts escapes the limits. The sandbox's pid 1 is a small
bash (``--as-pid-1``) that runs the program as its child and exits with its status: the program keeps ordinary
signal semantics (a namespace's init ignores signals it has no handler for), and the bwrap monitor reaps pid 1
itself, so no init is orphaned to the host's pid 1 (whose reaping may be lazy and would hold the cgroup).

A :class:`Session` is one AgentBench OS episode: a sandbox that lives until :meth:`Session.close` and in which
one interactive bash runs the agent's commands one after another (``cd``, variables and background jobs
persist, as in AgentBench's docker shell), while the task's init/start/check scripts run as separate processes
in the same filesystem and pid namespace. The sandbox's pid 1 is a small bash "keeper": it starts the first
interactive shell, reaps orphans, and, as a pid namespace's init, cannot be killed from inside, so even
``kill -9 -1`` leaves the episode alive. Commands are sent to the shell one line each, quoted as ``$'...'`` and
run with ``eval`` (so no command can swallow the next line, or the markers that end its output). Scripts, and
shells replacing one that exited or hung, join the running sandbox with ``nsenter`` (all of its namespaces, its
root and cwd) and ``setpriv`` (the same capabilities and ``no_new_privs``), behind ``prlimit`` and a shell that
first writes itself into the episode's cgroup, so they are confined exactly like the first. A command that
overruns its timeout gets SIGINT (as Ctrl-C on a terminal), then SIGKILL for its processes, then, if the shell
itself does not come back, a new shell; processes are signalled through pidfds after checking they are in the
episode's pid namespace, so a recycled pid is never hit.

What this does not do: there is no seccomp filter (a root inside can still use syscalls that need no capability,
such as ``keyctl`` on uid 0's keyring, or create user namespaces of its own in privileged mode) and no memory
cgroup, so memory is bounded per process (``RLIMIT_AS``) and in total only by ``processes * memory_bytes`` plus
the tmpfs sizes. Grading integrity against the episode itself is not a goal: a check script runs in the same
sandbox as the agent's commands, as in AgentBench's container, so root inside can tamper with what it checks.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import posixpath
import re
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from evolve.evaluators.base import EvaluatorError

__all__ = [
    "Limits",
    "Result",
    "SandboxError",
    "SandboxUnavailable",
    "Session",
    "available",
    "check_available",
    "run",
]


class SandboxError(EvaluatorError):
    """The sandbox itself failed (not the program in it): bubblewrap refused its arguments, a cgroup vanished."""


class SandboxUnavailable(SandboxError):
    """This machine cannot run the OS sandbox; the message says what is missing and how to install it."""


@dataclass(frozen=True)
class Limits:
    """What one episode may use. ``processes`` counts every process and thread of the episode, its init
    included; ``output_bytes`` is kept per stream (the rest is read and dropped, and ``Result.truncated`` says
    so); ``disk_bytes`` is the size of the writable root, a tmpfs, so it is memory."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 64 << 20
    open_files: int = 256
    processes: int = 64
    output_bytes: int = 64 << 10
    disk_bytes: int = 256 << 20


@dataclass(frozen=True)
class Result:
    """How one program or command ended. ``returncode`` is None when the wall clock killed it; a program
    killed by a signal has ``128 + signal`` (as a shell reports it)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# --------------------------------------------------------------------------------------------------------------
# Constants of the layout inside.

#: PATH inside: the system's, never the host's (which may hold pyenv shims or the project's venv).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The unprivileged sandbox's user inside its user namespace.
SANDBOX_UID = 1000
SANDBOX_USER = "sandbox"
HOSTNAME = "sandbox"
#: Capabilities a privileged (AgentBench OS) episode keeps: what useradd, chown, su and friends need.
PRIVILEGED_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID")

INSTALL_HINT = (
    "install it with `apt-get install bubblewrap` (or `make bubblewrap`, which does so where it runs as root)"
)
UTIL_LINUX_HINT = "install util-linux (`apt-get install util-linux`)"

#: Host /etc entries copied into every episode's writable /etc (files and directories, recursively; what does
#: not exist is skipped). An allowlist on purpose: /etc holds secrets (shadow, ssh host keys, ssl/private,
#: credentials of package managers) that a denylist would miss. passwd and group are handled apart.
_ETC_COPY_BASE = (
    "bash.bashrc",
    "debian_version",
    "environment",
    "gai.conf",
    "host.conf",
    "inputrc",
    "issue",
    "ld.so.cache",
    "ld.so.conf",
    "locale.alias",
    "networks",
    "nsswitch.conf",
    "profile",
    "protocols",
    "services",
    "shells",
    "timezone",
    "ssl/openssl.cnf",
)
#: Added for privileged episodes: what useradd, usermod, passwd, su and login shells read.
_ETC_COPY_ACCOUNTS = (
    "adduser.conf",
    "deluser.conf",
    "login.defs",
    "pam.conf",
    "pam.d",
    "security",
    "skel",
    "default/useradd",
    "default/locale",
    "default/nss",
    "subuid",
    "subgid",
)
#: Never copied even when under an allowlisted directory (old password hashes).
_ETC_NEVER = frozenset({"security/opasswd"})
#: Host /etc directories bound read-only (many symlinks or large and never edited by an episode):
#: ``alternatives`` is where /usr/bin/awk, editor, pager... point.
_ETC_RO_BIND = ("alternatives", "ld.so.conf.d", "profile.d", "terminfo", "python3", "python3.11", "python3.12")
#: /proc files a root inside should neither read nor write (as docker masks them).
_PROC_MASK = ("sysrq-trigger", "kcore", "keys", "timer_list", "sched_debug", "latency_stats")
#: The first-level directories of the writable root (more can be made by the episode, as in a container).
_ROOT_DIRS = (
    ("tmp", 0o1777),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/log", 0o755),
    ("var/mail", 0o2775),
    ("var/spool", 0o755),
    ("run", 0o755),
    ("home", 0o755),
    ("root", 0o700),
    ("opt", 0o755),
    ("srv", 0o755),
    ("mnt", 0o755),
)
#: Paths a caller's ``cwd`` may not be under (they are the host's, read-only, or special).
_RESERVED = ("/usr", "/proc", "/dev", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")


# --------------------------------------------------------------------------------------------------------------
# Discovery.


def _find_tool(name: str) -> str | None:
    """A host tool by name: on PATH first, then in the system directories (root's PATH may lack /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class _Cgroups:
    """Where episode cgroups are made: ``parent`` holds one leaf per episode, each with its own ``pids.max``."""

    parent: str
    v2: bool
    counter: Iterator[int] = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def leaf(self, max_pids: int) -> _CgroupLeaf:
        with self.lock:
            n = next(self.counter)
        if n % 256 == 255:  # a long-lived process also clears what crashed processes left meanwhile
            _sweep_stale(self.parent)
        path = os.path.join(self.parent, f"{os.getpid()}-{n}-{secrets.token_hex(3)}")
        os.mkdir(path)
        try:
            Path(path, "pids.max").write_text(str(max_pids))
        except OSError:
            _rmdir_retry(path, 0.0)
            raise
        return _CgroupLeaf(path)


@dataclass
class _CgroupLeaf:
    """One episode's pids cgroup."""

    path: str

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def add(self, pid: int) -> None:
        with open(self.procs, "w") as f:
            f.write(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in Path(self.procs).read_text().split()]
        except OSError:
            return []

    def destroy(self, timeout: float = 3.0) -> None:
        """Kill whatever is still in the cgroup (belt and braces: killing the episode's init normally took
        everything already), then remove it. A pid is only signalled through a pidfd opened while it was
        verified to be in this cgroup, so a recycled pid of an unrelated process is never hit."""
        deadline = time.monotonic() + timeout
        kill_file = os.path.join(self.path, "cgroup.kill")
        if os.path.exists(kill_file):
            with contextlib.suppress(OSError):
                Path(kill_file).write_text("1")
        name = os.path.basename(self.path)
        while True:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                _kill_verified(pid, lambda p: name in _read(f"/proc/{p}/cgroup"))
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        _rmdir_retry(self.path, max(0.0, deadline - time.monotonic()))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _rmdir_retry(path: str, timeout: float) -> None:
    """rmdir a cgroup: EBUSY while its last processes are being reaped, so retry a little."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.005)


def _kill_verified(pid: int, still_ours: Callable[[int], bool], sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` only if, once pinned by a pidfd, it is still the process we mean (pids are recycled)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if still_ours(pid):
            signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _mountinfo() -> list[tuple[str, str, list[str]]]:
    """(mount point, fstype, super options) of every mount of this process."""
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 3:
            out.append((fields[4].replace("\\040", " "), rfields[0], rfields[2].split(",")))
    return out


def _own_cgroup_path(controller: str | None) -> str:
    """This process's path in the v1 hierarchy holding ``controller`` (None: the v2 one)."""
    for line in _read("/proc/self/cgroup").splitlines():
        hid, controllers, path = line.split(":", 2)
        if controller is None and hid == "0" and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return "/"


def _sweep_stale(parent: str) -> None:
    """Remove leaves left by crashed processes: empty, named after a pid that is gone."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            owner = name.split("-", 1)[0]
            if not owner.isdigit() or not os.path.isdir(path):
                continue
            try:
                os.kill(int(owner), 0)
                continue  # its owner still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            if not _read(os.path.join(path, "cgroup.procs")).split():
                with contextlib.suppress(OSError):
                    os.rmdir(path)


def _try_cgroup_parent(parent: str, v2: bool) -> str | None:
    """Make ``parent`` usable for leaves and prove it with a probe leaf; None when it works, else why not."""
    try:
        os.makedirs(parent, exist_ok=True)
        if v2:
            controllers = _read(os.path.join(parent, "cgroup.subtree_control")).split()
            if "pids" not in controllers:
                Path(parent, "cgroup.subtree_control").write_text("+pids")
        _sweep_stale(parent)
        probe = os.path.join(parent, f"probe-{os.getpid()}-{secrets.token_hex(3)}")
        os.mkdir(probe)
        try:
            Path(probe, "pids.max").write_text("8")
        finally:
            os.rmdir(probe)
    except OSError as e:
        return f"{parent}: {e.strerror or e}"
    return None


@functools.cache
def _cgroups() -> tuple[_Cgroups | None, str]:
    """The pids cgroup episodes are capped by, or None and why there is none. Cached: probed once."""
    if os.environ.get("CYCLEQD_SANDBOX_NO_CGROUP"):
        return None, "pids cgroups disabled by CYCLEQD_SANDBOX_NO_CGROUP"
    if not _is_root():
        return None, "pids cgroups need root here (no delegated cgroup is used)"
    reasons = []
    mounts = _mountinfo()
    for mount_point, fstype, _opts in mounts:
        if fstype != "cgroup2":
            continue
        if "pids" not in _read(os.path.join(mount_point, "cgroup.controllers")).split():
            reasons.append(f"{mount_point}: cgroup v2 without the pids controller")
            continue
        # v2 forbids controllers in a cgroup that holds processes, save the root: enable pids at the root
        # (normally already on) and make the episodes' parent a child of it.
        root_ctl = os.path.join(mount_point, "cgroup.subtree_control")
        if "pids" not in _read(root_ctl).split():
            try:
                Path(root_ctl).write_text("+pids")
            except OSError as e:
                reasons.append(f"{mount_point}: cannot enable pids ({e.strerror})")
                continue
        parent = os.path.join(mount_point, "cycleqd-sandbox")
        why = _try_cgroup_parent(parent, v2=True)
        if why is None:
            return _Cgroups(parent, v2=True), ""
        reasons.append(why)
    for mount_point, fstype, opts in mounts:
        if fstype == "cgroup" and "pids" in opts:
            own = _own_cgroup_path("pids").lstrip("/")
            parent = os.path.join(mount_point, own, "cycleqd-sandbox")
            why = _try_cgroup_parent(parent, v2=False)
            if why is None:
                return _Cgroups(parent, v2=False), ""
            reasons.append(why)
    return None, "no writable pids cgroup (" + ("; ".join(reasons) or "no cgroup hierarchy with pids mounted") + ")"


_BASE_UID = 1_000_000_000
_uid_counter = itertools.count()


def _episode_uid() -> int:
    """A uid of the episode's own, for the RLIMIT_NPROC fallback under a root host: from a range no account
    uses, distinct between concurrent episodes (the process id and a counter pick it)."""
    return _BASE_UID + (os.getpid() % 10_000) * 100_000 + next(_uid_counter) % 100_000  # < 2**31: bwrap's limit


@functools.cache
def _probe(privileged: bool) -> str | None:
    """Why the sandbox cannot run in this mode, or None. Cheap checks first, then one real bwrap start."""
    if _find_tool("bwrap") is None:
        return f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}"
    if not os.path.exists("/bin/bash"):
        return "no system bash (/bin/bash) to run inside the sandbox: `apt-get install bash`"
    if privileged and not _is_root():
        return "the privileged sandbox (root inside, no user namespace; AgentBench OS episodes) needs to run as root"
    cgroups, why = _cgroups()
    if cgroups is None and privileged:
        return f"the privileged sandbox needs a pids cgroup to cap processes (RLIMIT_NPROC does not bind root): {why}"
    try:
        result = run(["/usr/bin/true"], privileged=privileged, limits=Limits(wall_seconds=20), _probing=True)
        if result.returncode == 0:
            return None
        detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    except (SandboxError, OSError) as e:
        detail = str(e)
    hint = ""
    if any(s in detail for s in ("uid map", "user namespace", "Operation not permitted", "No permissions")):
        hint = (
            " (user namespaces may be disabled: `sysctl kernel.unprivileged_userns_clone=1` or "
            "`sysctl user.max_user_namespaces=15000`, or an AppArmor profile for bwrap is needed)"
        )
    return f"bubblewrap cannot create the sandbox here: {detail}{hint}"


def available(*, privileged: bool = False) -> str | None:
    """None when the sandbox can run in this mode, else the reason (what a test skips with)."""
    return _probe(privileged)


def check_available(*, privileged: bool = False) -> None:
    """Raise :class:`SandboxUnavailable` with the reason and the fix when the sandbox cannot run here. Cheap
    after the first call (cached), so skills call it when they start."""
    why = _probe(privileged)
    if why is not None:
        raise SandboxUnavailable(why)


# --------------------------------------------------------------------------------------------------------------
# The root filesystem of an episode.


@dataclass(frozen=True)
class _EtcEntry:
    """One entry of an episode's /etc: a host file to copy (``source``), generated ``data``, a symlink
    (``target``), a directory, or a read-only bind of a host directory (``bind``)."""

    path: str
    kind: str  # "file", "data", "symlink", "dir", "bind"
    mode: int = 0o644
    source: str = ""
    data: bytes = b""
    target: str = ""


def _walk_etc(rel: str) -> Iterator[_EtcEntry]:
    host = os.path.join("/etc", rel)
    if rel in _ETC_NEVER:
        return
    try:
        st = os.lstat(host)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        yield _EtcEntry(rel, "symlink", target=os.readlink(host))
    elif stat.S_ISDIR(st.st_mode):
        yield _EtcEntry(rel, "dir", mode=stat.S_IMODE(st.st_mode))
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(host)):
                yield from _walk_etc(os.path.join(rel, name))
    elif stat.S_ISREG(st.st_mode) and os.access(host, os.R_OK) and st.st_size <= 1 << 20:
        yield _EtcEntry(rel, "file", mode=stat.S_IMODE(st.st_mode), source=host)


def _locked_shadow(accounts: str, *, group: bool) -> bytes:
    """/etc/shadow (or gshadow) for the given passwd (or group) text, every password locked: useradd and
    passwd need the file, and the host's hashes must not be readable inside."""
    lines = []
    for line in accounts.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not fields[0]:
            continue
        if group:
            lines.append(f"{fields[0]}:*::{fields[3]}")
        else:
            lines.append(f"{fields[0]}:*:19000:0:99999:7:::")
    return ("\n".join(lines) + "\n").encode()


@functools.cache
def _etc_plan(privileged: bool) -> tuple[_EtcEntry, ...]:
    """The /etc of every episode in this mode, computed once per process (the host's /etc rarely changes, and
    each episode then only opens the files to copy)."""
    entries: list[_EtcEntry] = []
    names = _ETC_COPY_BASE + (_ETC_COPY_ACCOUNTS if privileged else ())
    made_dirs: set[str] = set()
    for rel in names:
        parent = posixpath.dirname(rel)
        if parent and parent not in made_dirs and os.path.isdir(os.path.join("/etc", parent)):
            entries.append(_EtcEntry(parent, "dir", mode=0o755))
            made_dirs.add(parent)
        for entry in _walk_etc(rel):
            if entry.kind == "dir":
                made_dirs.add(entry.path)
            entries.append(entry)
    for rel in ("localtime", "os-release", "mtab"):
        host = os.path.join("/etc", rel)
        if os.path.islink(host):
            entries.append(_EtcEntry(rel, "symlink", target=os.readlink(host)))
    if privileged:
        passwd = _read("/etc/passwd")
        group = _read("/etc/group")
    else:
        passwd = (
            "root:x:0:0:root:/root:/bin/bash\n"
            f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}::/home/{SANDBOX_USER}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        group = f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"
    entries += [
        _EtcEntry("passwd", "data", data=passwd.encode()),
        _EtcEntry("group", "data", data=group.encode()),
        _EtcEntry("hostname", "data", data=f"{HOSTNAME}\n".encode()),
        _EtcEntry("hosts", "data", data=f"127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost\n".encode()),
        # No nameserver: there is no network, so name lookups fail at once instead of timing out.
        _EtcEntry("resolv.conf", "data", data=b""),
    ]
    if privileged:
        entries += [
            _EtcEntry("shadow", "data", mode=0o640, data=_locked_shadow(passwd, group=False)),
            _EtcEntry("gshadow", "data", mode=0o640, data=_locked_shadow(group, group=True)),
        ]
    for rel in _ETC_RO_BIND:
        if os.path.isdir(os.path.join("/etc", rel)):
            entries.append(_EtcEntry(rel, "bind", source=os.path.join("/etc", rel)))
    return tuple(entries)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("sandbox-file", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _check_cwd(cwd: str) -> str:
    norm = posixpath.normpath(cwd)
    if not norm.startswith("/") or norm == "/":
        raise ValueError(f"cwd must be an absolute directory other than /: {cwd!r}")
    if any(norm == r or norm.startswith(r + "/") for r in _RESERVED):
        raise ValueError(f"cwd may not be under {', '.join(_RESERVED)}: {cwd!r}")
    return norm


def _file_dest(cwd: str, rel: str) -> str:
    if not rel or rel.startswith("/") or "\0" in rel:
        raise ValueError(f"files must be relative paths: {rel!r}")
    dest = posixpath.normpath(posixpath.join(cwd, rel))
    if not dest.startswith(cwd + "/"):
        raise ValueError(f"file path leaves the working directory: {rel!r}")
    return dest


class _Args:
    """bwrap's argument list and the fds it must inherit (closed here once bwrap has started)."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.fds: list[int] = []

    def add(self, *args: str) -> None:
        self.argv.extend(args)

    def fd(self, fd: int) -> str:
        self.fds.append(fd)
        return str(fd)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def _home(privileged: bool) -> str:
    return "/root" if privileged else f"/home/{SANDBOX_USER}"


def _environment(privileged: bool) -> dict[str, str]:
    """The environment inside: the system's, nothing of the host's (no proxies, tokens or venv)."""
    user = "root" if privileged else SANDBOX_USER
    return {
        "PATH": SYSTEM_PATH,
        "HOME": _home(privileged),
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }


#: The skeleton of ``/usr/local`` in a privileged episode: empty and writable, as on a fresh distribution image.
_USR_LOCAL = ("bin", "etc", "games", "include", "lib", "man", "sbin", "share", "src")


def _usr(a: Callable[..., None], privileged: bool) -> None:
    """The host's ``/usr``, read-only. Unprivileged programs get it as one read-only mount. A privileged episode
    (AgentBench's shell tasks write ``/usr/stock.log``, ``/usr/OSbench``, ``/usr/local/bin/calc`` ...) gets a
    writable ``/usr`` on its throw-away root with every host entry bound read-only into it and an empty writable
    ``/usr/local``: new files land in the episode's tmpfs, the host's files stay read-only and unchanged (bwrap
    0.8 has no overlay mount to do this in one step)."""
    if not privileged:
        a("--ro-bind", "/usr", "/usr")
        return
    a("--perms", "755", "--dir", "/usr")
    for entry in sorted(os.listdir("/usr")):
        host = f"/usr/{entry}"
        if entry == "local":
            continue
        if os.path.islink(host):
            a("--symlink", os.readlink(host), host)
        else:
            a("--ro-bind", host, host)
    for sub in _USR_LOCAL:
        a("--perms", "755", "--dir", f"/usr/local/{sub}")


def _bwrap_args(
    *,
    privileged: bool,
    limits: Limits,
    cwd: str,
    files: Mapping[str, str | bytes] | None,
    as_pid_1: bool,
) -> _Args:
    args = _Args()
    a = args.add
    try:
        # The writable root first: everything else is mounted on top of it.
        a("--size", str(limits.disk_bytes), "--tmpfs", "/")
        _usr(a, privileged)
        for top in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
            host = "/" + top
            if os.path.islink(host):
                a("--symlink", os.readlink(host), host)
            elif os.path.isdir(host):
                a("--ro-bind", host, host)
        a("--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys")
        for name in _PROC_MASK:
            if os.path.exists(f"/proc/{name}"):
                a("--ro-bind", "/dev/null", f"/proc/{name}")
        a(
            "--dev",
            "/dev",
            "--size",
            str(min(64 << 20, limits.disk_bytes)),
            "--tmpfs",
            "/dev/shm",  # noqa: S108 - the sandbox's own /dev/shm, not the host's
            "--remount-ro",
            "/dev",
        )
        for path, mode in _ROOT_DIRS:
            a("--perms", f"{mode:o}", "--dir", "/" + path)
        if not privileged:
            a("--dir", _home(privileged))
        a("--perms", "755", "--dir", "/etc")
        for entry in _etc_plan(privileged):
            dest = "/etc/" + entry.path
            if entry.kind == "dir":
                a("--perms", f"{entry.mode:o}", "--dir", dest)
            elif entry.kind == "symlink":
                a("--symlink", entry.target, dest)
            elif entry.kind == "bind":
                a("--ro-bind", entry.source, dest)
            elif entry.kind == "file":
                try:
                    fd = os.open(entry.source, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                a("--perms", f"{entry.mode:o}", "--file", args.fd(fd), dest)
            else:
                a("--perms", f"{entry.mode:o}", "--file", args.fd(_memfd(entry.data)), dest)
        # The working directory and the caller's files in it.
        made: set[str] = set()
        for part in itertools.accumulate(cwd.strip("/").split("/"), lambda x, y: f"{x}/{y}"):
            a("--dir", "/" + part)
            made.add("/" + part)
        for rel, content in (files or {}).items():
            dest = _file_dest(cwd, rel)
            data = content.encode() if isinstance(content, str) else bytes(content)
            if len(data) > limits.file_bytes:
                raise ValueError(f"file {rel!r} is larger than Limits.file_bytes")
            parent = posixpath.dirname(dest)
            missing = []
            while parent not in made and parent != "/":
                missing.append(parent)
                parent = posixpath.dirname(parent)
            for d in reversed(missing):
                a("--dir", d)
                made.add(d)
            mode = "755" if data.startswith(b"#!") else "644"
            a("--perms", mode, "--file", args.fd(_memfd(data)), dest)
        a("--chdir", cwd)
        # Namespaces and identity.
        a("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try")
        a("--hostname", HOSTNAME, "--die-with-parent", "--new-session", "--cap-drop", "ALL")
        if privileged:
            for cap in PRIVILEGED_CAPS:
                a("--cap-add", cap)
        else:
            a("--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns")
        if as_pid_1:
            a("--as-pid-1")
    except BaseException:
        args.close()
        raise
    return args


# --------------------------------------------------------------------------------------------------------------
# One bwrap instance.


def _set_rlimits(pid: int, limits: Limits, *, nproc: bool) -> None:
    cpu = max(1, int(limits.cpu_seconds))
    pairs = [
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.file_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ]
    for res, value in pairs:
        resource.prlimit(pid, res, (value, value))
    # SIGXCPU at the soft limit (a program may report it), SIGKILL a second later.
    resource.prlimit(pid, resource.RLIMIT_CPU, (cpu, cpu + 1))
    if nproc:
        resource.prlimit(pid, resource.RLIMIT_NPROC, (limits.processes, limits.processes))


def _prlimit_argv(limits: Limits, *, nproc: bool) -> list[str]:
    """The same limits for a process that joins a running sandbox (``prlimit`` execs the rest)."""
    cpu = max(1, int(limits.cpu_seconds))
    argv = [
        _find_tool("prlimit") or "prlimit",
        f"--as={limits.memory_bytes}",
        f"--fsize={limits.file_bytes}",
        f"--nofile={limits.open_files}",
        "--core=0",
        f"--cpu={cpu}:{cpu + 1}",
    ]
    if nproc:
        argv.append(f"--nproc={limits.processes}")
    return [*argv, "--"]


def _read_info(fd: int, timeout: float) -> bytes:
    """bwrap's --info-fd JSON (written by its monitor right after the clone; EOF without it means bwrap failed)."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk
    return data


class _Box:
    """One running bubblewrap: the monitor process (``proc``), the sandbox's first process (``init_pid``, pinned by
    a pidfd), its cgroup leaf, and how to tear it all down."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        privileged: bool,
        limits: Limits,
        cwd: str,
        files: Mapping[str, str | bytes] | None,
        as_pid_1: bool = False,
        stdin: int | None = subprocess.PIPE,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
        extra_fds: Sequence[int] = (),
    ) -> None:
        self.privileged = privileged
        self.limits = limits
        self.leaf: _CgroupLeaf | None = None
        self._pidfd: int | None = None
        self.init_pid = 0
        self.uid: int | None = None
        self.closed = False
        cgroups, _why = _cgroups()
        self.nproc_fallback = cgroups is None
        if cgroups is None and privileged:
            raise SandboxUnavailable(f"the privileged sandbox needs a pids cgroup: {_why}")
        args = _bwrap_args(privileged=privileged, limits=limits, cwd=cwd, files=files, as_pid_1=as_pid_1)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        extra: dict[str, Any] = {}
        prefix: list[str] = []
        if self.nproc_fallback and _is_root():
            # A uid of the episode's own, so RLIMIT_NPROC binds and counts only this episode. Root may lack
            # CAP_SYS_RESOURCE (this machine does), so it cannot prlimit another uid's process: ``prlimit`` sets
            # the limits on itself, as that uid, before it execs bwrap (the count is the uid's, so setting
            # RLIMIT_NPROC before the user namespace exists caps the same processes).
            self.uid = _episode_uid()
            extra = {"user": self.uid, "group": self.uid, "extra_groups": []}
            prefix = _prlimit_argv(limits, nproc=True)
        try:
            if cgroups is not None:
                self.leaf = cgroups.leaf(limits.processes)
            cmd = [
                *prefix,
                _find_tool("bwrap") or "bwrap",
                *args.argv,
                "--info-fd",
                str(info_w),
                "--block-fd",
                str(block_r),
                "--",
                *argv,
            ]
            self.proc = subprocess.Popen(
                cmd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=_environment(privileged),
                pass_fds=(info_w, block_r, *args.fds, *extra_fds),
                start_new_session=True,
                cwd="/",
                **extra,
            )
        except BaseException:
            for fd in (info_r, info_w, block_r, block_w):
                os.close(fd)
            args.close()
            if self.leaf is not None:
                self.leaf.destroy()
            raise
        os.close(info_w)
        os.close(block_r)
        args.close()
        try:
            info = _read_info(info_r, timeout=30.0)
            if not info:
                self.proc.wait(timeout=30)
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise SandboxError(f"bwrap failed (exit {self.proc.returncode}): {err.strip()}")
            self.init_pid = int(json.loads(info)["child-pid"])
            self._pidfd = os.pidfd_open(self.init_pid)
            if self.leaf is not None:
                self.leaf.add(self.init_pid)
            if not prefix:
                _set_rlimits(self.init_pid, limits, nproc=self.nproc_fallback)
            os.write(block_w, b"x")
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(info_r)
            os.close(block_w)

    def kill(self) -> None:
        """Kill the whole sandbox: its init (the kernel then kills every process of the pid namespace), then
        anything left in the cgroup; remove the cgroup. Idempotent.

        Only the init is killed, and the monitor left to reap it and exit: killed together, the monitor could die
        first, and the init would become a zombie of the host's pid 1, which keeps the cgroup populated until
        that init gets round to reaping it (this machine's does so lazily)."""
        if self.closed:
            return
        self.closed = True
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.leaf is not None:
            self.leaf.destroy()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --------------------------------------------------------------------------------------------------------------
# Reading streams.


class _Capture:
    """The bytes of one stream, kept up to ``limit``; the rest is read and dropped (so the writer never blocks)
    and ``truncated`` says so."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(0, room)]
        self.data += chunk

    def text(self) -> str:
        return self.data.decode(errors="replace")


def _returncode(status: int | None) -> int | None:
    """A signal death as a shell reports it (128 + signal), for every path alike."""
    if status is not None and status < 0:
        return 128 - status
    return status


def _pump(
    *,
    readers: dict[int, Callable[[bytes], None]],
    deadline: float,
    done: Callable[[], bool] = lambda: False,
    stdin_fd: int | None = None,
    stdin_data: bytes = b"",
    stdin_done: Callable[[], None] = lambda: None,
) -> bool:
    """Write ``stdin_data`` (then call ``stdin_done``, which closes it), read every fd in ``readers`` into its
    callback (b"" at EOF), until ``done()`` or every reader is at EOF (True), or the deadline (False).
    Non-blocking throughout, so neither side can wedge the other."""
    view = memoryview(stdin_data)
    with selectors.DefaultSelector() as sel:
        for fd in readers:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if stdin_fd is not None:
            os.set_blocking(stdin_fd, False)
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        open_readers = set(readers)
        while not done():
            if not open_readers:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in sel.select(remaining):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        view = view[os.write(fd, view[:65536]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed its stdin or exited
                        view = view[len(view) :]
                    if not view:
                        sel.unregister(fd)
                        stdin_done()
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                readers[fd](chunk)
                if not chunk:
                    sel.unregister(fd)
                    open_readers.discard(fd)
    return True


# --------------------------------------------------------------------------------------------------------------
# run(): one program in a fresh sandbox.


#: pid 1 of a run(): a bash that runs the program as its child, waits, and exits with its status (a signal
#: death as 128 + signal). The program so keeps ordinary signal semantics (a pid namespace's init ignores the
#: signals it has no handler for, SIGXCPU included), and, with ``--as-pid-1``, the bwrap monitor itself reaps
#: pid 1: no init is orphaned to the host's, whose lazy reaping would hold the episode's cgroup.
_RUNNER = ("/bin/bash", "--norc", "--noprofile", "-c", '"$@"; exit $?', "sandbox")


def run(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    files: Mapping[str, str | bytes] | None = None,
    limits: Limits = Limits(),  # frozen, so one shared default is safe
    privileged: bool = False,
    cwd: str = "/workspace",
    _probing: bool = False,
) -> Result:
    """Run one program in a fresh sandbox and tear it down: ``files`` (paths relative to ``cwd``) are written into
    the throw-away root before ``argv`` runs in ``cwd``; when it exits, or when ``limits.wall_seconds`` pass, the
    whole process tree is killed and the root discarded. What the program does never raises; a sandbox that
    cannot run here raises :class:`SandboxUnavailable`."""
    if not argv:
        raise ValueError("argv is empty")
    if not _probing:
        check_available(privileged=privileged)
    cwd = _check_cwd(cwd)
    deadline = time.monotonic() + limits.wall_seconds
    box = _Box([*_RUNNER, *argv], privileged=privileged, limits=limits, cwd=cwd, files=files, as_pid_1=True)
    try:
        out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
        assert box.proc.stdout is not None and box.proc.stderr is not None and box.proc.stdin is not None
        data = (stdin or "").encode()
        if not data:
            box.proc.stdin.close()
        finished = _pump(
            readers={box.proc.stdout.fileno(): out.add, box.proc.stderr.fileno(): err.add},
            deadline=deadline,
            stdin_fd=box.proc.stdin.fileno() if data else None,
            stdin_data=data,
            stdin_done=box.proc.stdin.close,
        )
        status: int | None = None
        if finished:
            try:
                status = box.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                finished = False
    finally:
        box.kill()
    return Result(
        returncode=_returncode(status) if finished else None,
        stdout=out.text(),
        stderr=err.text(),
        timed_out=not finished,
        truncated=out.truncated or err.truncated,
    )


# --------------------------------------------------------------------------------------------------------------
# Session: one AgentBench OS episode.


#: The interactive shell of a session (``--noediting``: no readline, which would echo input on a dumb terminal).
_SHELL_ARGV = ("/bin/bash", "--norc", "--noprofile", "--noediting", "-i")
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-./,:=+@%")
#: What bash -i says on a pipe whenever a foreground job dies of a signal; noise, not the command's output.
_TCSETATTR_NOISE = re.compile(rb"bash: \[\d+: \d+ \(\d+\)\] tcsetattr: Inappropriate ioctl for device\n")


@functools.cache
def _signal_reset() -> str:
    """``env --default-signal=INT,QUIT`` where coreutils has it (8.31+): bash gives the commands it starts in the
    background SIGINT ignored, so the keeper's shell must get it back to be interruptible like a terminal's."""
    env = "/usr/bin/env"
    try:
        ok = subprocess.run([env, "--default-signal=INT,QUIT", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return f"{env} --default-signal=INT,QUIT " if ok else ""


def _keeper(hold_fd: int, status_fd: int) -> str:
    """The script of a session sandbox's pid 1 (a bash). It starts the first interactive shell on the sandbox's
    stdio (sparing a session start the nsenter chain), lets go of that stdio, reports the shell's exit status on
    ``status_fd``, then blocks for good reading ``hold_fd``, a pipe this process never writes. As a pid
    namespace's init it cannot be killed from inside (``kill -9 -1`` included), and bash reaps the orphans that
    are reparented to it."""
    shell = " ".join(_SHELL_ARGV)
    return (
        # "<&0": bash would give a background command /dev/null as its stdin otherwise.
        f"{_signal_reset()}{shell} <&0 {hold_fd}<&- {status_fd}>&- & "
        f"exec </dev/null >/dev/null 2>&1; wait $!; echo $? >&{status_fd}; exec {status_fd}>&-; "
        f"while :; do read -r _ <&{hold_fd} || sleep 1; done"
    )


def _bash_quote(text: str) -> str:
    """``text`` as one bash ``$'...'`` word on one line: every unsafe byte as ``\\xHH``, so a command with newlines,
    quotes or unbalanced syntax can never run into the marker commands that follow it."""
    raw = text.replace("\0", "").encode()
    return "$'" + "".join(chr(b) if b in _SAFE else f"\\x{b:02x}" for b in raw) + "'"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (host pids)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    have_file = False
    for tid in tids:
        path = f"/proc/{pid}/task/{tid}/children"
        text = _read(path)
        have_file = have_file or bool(text) or os.path.exists(path)
        kids += [int(x) for x in text.split()]
    if have_file:
        return kids
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == pid]  # no CONFIG_PROC_CHILDREN


def _ppid(pid: int) -> int:
    stat_line = _read(f"/proc/{pid}/stat")
    try:
        return int(stat_line.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return -1


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for kid in _children(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


class _ShellStream:
    """One of the session shell's output pipes, cut into per-command captures at marker lines.

    A marker is ``\\x1e<nonce>\\x1f<value>\\n``. Bytes that arrive after the command's marker (a background job
    writing later) stay pending and open the next command's output, as they would on a terminal."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = bytearray()
        self.eof = False
        self.capture = _Capture(0)
        self.found: dict[bytes, bytes] = {}
        self.markers: list[bytes] = []
        self.final = b""
        self.keep = 0

    def begin(self, limit: int) -> None:
        self.capture = _Capture(limit)
        self.found = {}
        self.markers = []
        self.final = b""

    def expect(self, marker: bytes) -> None:
        """Wait for ``marker`` from now on; earlier markers (of an interrupted line) are still cut out when they
        arrive late, but no longer end the command."""
        self.markers.append(marker)
        self.final = marker
        self.keep = max(self.keep, len(marker) + 24)
        self._scan()

    def done(self) -> bool:
        return self.eof or self.final in self.found

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            self.eof = True
        self.pending += chunk
        self._scan()

    def drain(self) -> None:
        """Read what is already in the pipe (the shell died: its last words), without waiting."""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.fd, 1 << 16):
                self.pending += chunk
        self.eof = True
        self._scan()

    def _scan(self) -> None:
        while self.markers and self.final not in self.found:
            hits = [(i, m) for m in self.markers if (i := self.pending.find(m)) >= 0]
            if not hits:
                break
            idx, marker = min(hits)
            end = self.pending.find(b"\n", idx + len(marker))
            self._commit(idx)
            if end < 0:
                return
            self.found[marker] = bytes(self.pending[len(marker) : end - idx])
            del self.pending[: end - idx + 1]
        if self.final in self.found:
            return
        # No marker yet: commit all but a tail that could be the start of one (all of it at EOF).
        self._commit(len(self.pending) if self.eof else max(0, len(self.pending) - self.keep))

    def _commit(self, n: int) -> None:
        if n:
            self.capture.add(_TCSETATTR_NOISE.sub(b"", self.pending[:n]))
            del self.pending[:n]


@dataclass
class _Shell:
    """The session's interactive bash: its pipes, its host pid (pinned by a pidfd once known) and where its exit
    status comes from (the keeper's report for the first shell, ``nsenter``'s for a replacement)."""

    stdin: BinaryIO
    out: _ShellStream
    err: _ShellStream
    popen: subprocess.Popen | None = None
    status_fd: int | None = None
    pid: int = 0
    pidfd: int = -1
    dead: bool = False
    reported: int | None = None
    files: list[BinaryIO] = field(default_factory=list)

    def exit_status(self) -> int | None:
        if self.reported is not None:
            return self.reported
        if self.popen is not None:
            try:
                return _returncode(self.popen.wait(timeout=2))
            except subprocess.TimeoutExpired:
                return None
        if self.status_fd is not None:
            with selectors.DefaultSelector() as sel:
                sel.register(self.status_fd, selectors.EVENT_READ)
                if sel.select(1.0):
                    text = os.read(self.status_fd, 64).strip()
                    return int(text) if text.isdigit() else None
        return None

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        for f in self.files:
            with contextlib.suppress(OSError):
                f.close()
        self.files.clear()


class _Resources:
    """What a session must release even if it is never closed (a weakref finalizer holds this, not the session)."""

    def __init__(self, box: _Box, fds: list[int]) -> None:
        self.box = box
        self.fds = fds
        self.spawned: list[subprocess.Popen] = []
        self.shells: list[_Shell] = []

    def release(self) -> None:
        """The sandbox first (which kills every process in it), then reap what entered it from outside (they end
        with their child), close every pipe."""
        self.box.kill()
        for proc in self.spawned:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.spawned.clear()
        for shell in self.shells:
            shell.close()
        self.shells.clear()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class Session:
    """One AgentBench OS episode: a sandbox that persists until :meth:`close`, with one interactive bash in it
    for the agent's commands (:meth:`execute`) and separate processes for the task's scripts
    (:meth:`run_script`, :meth:`start_background`). A lock serialises calls from several threads. The session is
    tied to the thread that opened it (``--die-with-parent`` follows the parent *thread*), so open it in a thread
    that outlives it."""

    #: How long an interrupted command gets to give the shell back before the next escalation.
    GRACE_SECONDS = 0.5

    def __init__(
        self,
        *,
        privileged: bool = True,
        limits: Limits = Limits(),  # frozen, so one shared default is safe
        files: Mapping[str, str | bytes] | None = None,
    ) -> None:
        check_available(privileged=privileged)
        missing = [tool for tool in ("nsenter", "setpriv", "prlimit") if _find_tool(tool) is None]
        if missing:
            raise SandboxUnavailable(f"a sandbox session needs {', '.join(missing)}: {UTIL_LINUX_HINT}")
        self.privileged = privileged
        self.limits = limits
        self.cwd = "/workspace"
        self._lock = threading.Lock()
        self._nonce = secrets.token_hex(8)
        self._counter = itertools.count()
        self._closed = False
        self._shell: _Shell | None = None
        hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            box = _Box(
                ["/bin/bash", "--norc", "--noprofile", "-c", _keeper(hold_r, status_w)],
                privileged=privileged,
                limits=limits,
                cwd=self.cwd,
                files=files,
                as_pid_1=True,
                extra_fds=(hold_r, status_w),
            )
        except BaseException:
            for fd in (hold_r, hold_w, status_r, status_w):
                os.close(fd)
            raise
        os.close(hold_r)
        os.close(status_w)
        self._box = box
        self._res = _Resources(box, [hold_w, status_r])
        self._finalizer = weakref.finalize(self, self._res.release)
        try:
            self._pidns = os.readlink(f"/proc/{box.init_pid}/ns/pid")
            assert box.proc.stdin is not None and box.proc.stdout is not None and box.proc.stderr is not None
            first = _Shell(
                stdin=box.proc.stdin,
                out=_ShellStream(box.proc.stdout.fileno()),
                err=_ShellStream(box.proc.stderr.fileno()),
                status_fd=status_r,
            )
            self._adopt(first, parent=box.init_pid)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the whole tree, background processes included, and discard the root. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the session is closed")

    def _in_box(self, pid: int) -> bool:
        """Whether ``pid`` is a process of this session's sandbox (its pid namespace): checked, through a pidfd,
        before any signal, so a recycled pid is never hit."""
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") == self._pidns
        except OSError:
            return False

    # -- entering the sandbox ------------------------------------------------------------------------------

    def _enter_argv(self, argv: Sequence[str]) -> list[str]:
        """argv that runs ``argv`` inside the running sandbox, confined like its first process: in its cgroup
        (a shell writes itself there before exec), under its rlimits, in all its namespaces, root and cwd, with
        the same capabilities and ``no_new_privs``."""
        prefix: list[str] = []
        if self._box.leaf is not None:
            prefix = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', self._box.leaf.procs]
        enter = [_find_tool("nsenter") or "nsenter", "-a", "-t", str(self._box.init_pid), "-r", "-w"]
        if self.privileged:
            caps = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in PRIVILEGED_CAPS)
            drop = ["--inh-caps", caps, "--ambient-caps", caps, "--bounding-set", caps]
        else:
            enter += ["-S", str(SANDBOX_UID), "-G", str(SANDBOX_UID)]
            drop = ["--inh-caps", "-all", "--ambient-caps", "-all"]
        setpriv = [_find_tool("setpriv") or "setpriv", *drop, "--no-new-privs", "--"]
        return [*prefix, *_prlimit_argv(self.limits, nproc=self._box.nproc_fallback), *enter, "--", *setpriv, *argv]

    def _spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(
            self._enter_argv(argv), env=_environment(self.privileged), start_new_session=True, cwd="/", **kwargs
        )
        self._res.spawned[:] = [p for p in self._res.spawned if p.poll() is None]
        self._res.spawned.append(proc)
        return proc

    # -- the interactive shell -----------------------------------------------------------------------------

    def _marker(self) -> bytes:
        return f"\x1e{self._nonce}{next(self._counter)}\x1f".encode()

    def _adopt(self, shell: _Shell, *, parent: int) -> None:
        """Set a fresh shell up (no prompts, no history expansion, the episode's cwd), then pin its pid."""
        self._res.shells.append(shell)
        self._shell = shell
        init = "set +H +o history; PS1=''; PS2=''; PS0=''; unset PROMPT_COMMAND HISTFILE; cd " + _bash_quote(self.cwd)
        finished, _, died = self._converse(init, timeout=30.0, limit=1 << 16)
        if not finished or died:
            raise SandboxError("the session's shell did not start: " + shell.err.capture.text().strip())
        kids = _children(parent)
        if len(kids) != 1:
            raise SandboxError(f"cannot find the session's shell (children of {parent}: {kids})")
        shell.pid = kids[0]
        shell.pidfd = os.pidfd_open(shell.pid)

    def _new_shell(self) -> None:
        proc = self._spawn(_SHELL_ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        shell = _Shell(
            stdin=proc.stdin,
            out=_ShellStream(proc.stdout.fileno()),
            err=_ShellStream(proc.stderr.fileno()),
            popen=proc,
            files=[proc.stdin, proc.stdout, proc.stderr],
        )
        self._adopt(shell, parent=proc.pid)

    def _drop_shell(self) -> None:
        """Kill the current shell (not the background jobs it started: they live on, as after a terminal's
        ``exit``) and let go of its pipes."""
        shell, self._shell = self._shell, None
        if shell is None:
            return
        if shell.pidfd >= 0 and self._in_box(shell.pid):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(shell.pidfd, signal.SIGKILL)
        elif shell.popen is not None and shell.popen.poll() is None:  # it never got going: its whole group
            with contextlib.suppress(OSError):
                os.killpg(shell.popen.pid, signal.SIGKILL)
        if shell.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                shell.popen.wait(timeout=5)
        shell.close()

    def _send(self, line: str, out_marker: bytes, err_marker: bytes) -> bool:
        """Write one command line, then one that prints the two markers; False when the shell is gone."""
        shell = self._shell
        assert shell is not None
        shell.out.expect(out_marker)
        shell.err.expect(err_marker)
        o = "".join(f"\\{b:03o}" for b in out_marker)
        e = "".join(f"\\{b:03o}" for b in err_marker)
        text = f"{line}\nprintf '{o}%d\\n' \"$?\"; printf '{e}\\n' >&2\n".encode()
        try:
            shell.stdin.write(text)
            shell.stdin.flush()
        except (OSError, ValueError):
            return False
        return True

    def _wait_markers(self, deadline: float) -> bool:
        """Read the shell's output until both markers came or the shell died (True), or the deadline (False)."""
        shell = self._shell
        assert shell is not None

        def died(report: bytes) -> None:
            if report.strip().isdigit():
                shell.reported = int(report.strip())
            shell.dead = True
            shell.out.drain()
            shell.err.drain()

        readers = {shell.out.fd: shell.out.feed, shell.err.fd: shell.err.feed}
        # Death shows on the pidfd (readable once the process exits) or, for the first shell, whose pipes the
        # bwrap monitor also holds (so they never reach EOF), on the keeper's status report.
        if shell.pidfd >= 0:
            readers[shell.pidfd] = died
        if shell.status_fd is not None and shell.reported is None:
            readers[shell.status_fd] = died
        return _pump(
            readers=readers,
            deadline=deadline,
            done=lambda: shell.dead or (shell.out.done() and shell.err.done()),
        )

    def _converse(self, command: str, *, timeout: float, limit: int) -> tuple[bool, int | None, bool]:
        """Run one line in the shell: (finished, its status, the shell died)."""
        shell = self._shell
        assert shell is not None
        shell.out.begin(limit)
        shell.err.begin(limit)
        out_marker, err_marker = self._marker(), self._marker()
        if not self._send(command, out_marker, err_marker):
            return True, None, True
        finished = self._wait_markers(time.monotonic() + timeout)
        if shell.dead or shell.out.eof or shell.err.eof:
            return True, shell.exit_status(), True
        if not finished:
            return False, None, False
        value = shell.out.found.get(out_marker, b"")
        return True, int(value) if value.isdigit() else None, False

    def _interrupt(self, before: set[int]) -> bool:
        """Give the shell back after a command overran: SIGINT to the shell and the command's processes (as
        Ctrl-C would: bash drops the rest of the line), then SIGKILL for the command's processes. A resync line
        after each step says when the shell listens again. True when the shell, and so its state, survived."""
        shell = self._shell
        assert shell is not None
        new = [p for p in _children(shell.pid) if p not in before]
        targets = [p for kid in new for p in (kid, *_descendants(kid))]
        for sig, pids in ((signal.SIGINT, [shell.pid, *targets]), (signal.SIGKILL, targets)):
            for pid in pids:
                _kill_verified(pid, self._in_box, sig)
            time.sleep(0.02)
            if not self._send(":", self._marker(), self._marker()):
                return False
            self._wait_markers(time.monotonic() + self.GRACE_SECONDS)
            if shell.dead or shell.out.eof or shell.err.eof:
                return False
            if shell.out.done() and shell.err.done():
                return True
        return False

    def execute(self, command: str, *, timeout: float | None = None) -> Result:
        """Run ``command`` in the session's interactive bash (``cd``, variables, functions and background jobs
        persist between calls) with stdin from /dev/null; return that command's output only. A command that runs
        past ``timeout`` (default ``limits.wall_seconds``) is interrupted and the session stays usable. If the
        shell itself had to go (it exited, or ignored the interrupt), stderr says so and the next command runs in
        a new shell (same sandbox and files; initial working directory and environment)."""
        with self._lock:
            self._check_open()
            timeout = self.limits.wall_seconds if timeout is None else timeout
            if self._shell is None:
                try:
                    self._new_shell()
                except (SandboxError, OSError) as e:  # e.g. the episode's process cap is full: the agent's doing
                    self._drop_shell()
                    return Result(None, "", f"[sandbox: no shell could be started: {e}]\n", False, False)
            shell = self._shell
            assert shell is not None
            before = set(_children(shell.pid))
            line = f"eval {_bash_quote(command)} </dev/null"
            finished, status, died = self._converse(line, timeout=timeout, limit=self.limits.output_bytes)
            timed_out = not finished
            note = ""
            if timed_out and not self._interrupt(before):
                died = True
                note = "[sandbox: the shell did not give control back; the next command runs in a new shell]"
            elif died:
                note = "[sandbox: the shell exited; the next command runs in a new shell]"
            out, err = shell.out.capture, shell.err.capture
            if died:
                self._drop_shell()
            stderr = err.text()
            if note:
                stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + note + "\n"
            return Result(
                returncode=None if timed_out else status,
                stdout=out.text(),
                stderr=stderr,
                timed_out=timed_out,
                truncated=out.truncated or err.truncated,
            )

    # -- scripts -------------------------------------------------------------------------------------------

    def run_script(self, script: str, *, language: str = "bash", timeout: float | None = None) -> Result:
        """Run ``script`` as a separate process (``bash -c`` or ``python3 -c``) in the same sandbox: same
        filesystem, same pid namespace, the episode's initial working directory and a fresh environment; not the
        interactive shell's state. For AgentBench's init and check scripts."""
        with self._lock:
            self._check_open()
            argv = _interpreter(language, script)
            timeout = self.limits.wall_seconds if timeout is None else timeout
            deadline = time.monotonic() + timeout
            proc = self._spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None and proc.stderr is not None
            out, err = _Capture(self.limits.output_bytes), _Capture(self.limits.output_bytes)
            status: int | None = None
            try:
                readers = {proc.stdout.fileno(): out.add, proc.stderr.fileno(): err.add}
                finished = _pump(readers=readers, deadline=deadline)
                if finished:
                    try:
                        status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        finished = False
            finally:
                if proc.poll() is None:
                    # Its process group: the script and what it started, not what it detached with setsid (that
                    # lives until close(), as in a container).
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                proc.stdout.close()
                proc.stderr.close()
            return Result(
                returncode=_returncode(status) if finished else None,
                stdout=out.text(),
                stderr=err.text(),
                timed_out=not finished,
                truncated=out.truncated or err.truncated,
            )

    def start_background(self, script: str, *, language: str = "bash") -> None:
        """Start ``script`` in the same sandbox and return at once (AgentBench's ``start`` script); its output is
        discarded and it is killed at :meth:`close` at the latest."""
        with self._lock:
            self._check_open()
            argv = _interpreter(language, script)
            self._spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _interpreter(language: str, script: str) -> list[str]:
    if language in ("bash", "sh", "shell"):
        return ["/bin/bash", "-c", script]
    if language in ("python", "python3"):
        return ["/usr/bin/python3", "-c", script]
    raise ValueError(f"unknown script language {language!r} (bash or python3)")
