"""``cycleqd.atomic`` under SIGKILL at every step: a writer of a file, of versioned JSON and of a directory runs in a
child process that kills itself (SIGKILL, not an exception) at its k-th file-system call, for every k until it
completes. After each kill a reader finds the old state or the new one, complete, never a mix; after the helper's
own recovery (what the next write does first) nothing is left beside the target, no temporary and no ``.NAME.old``;
and the next write succeeds. A recovery killed at every step of its own is checked the same way.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cycleqd.atomic import (
    atomic_directory,
    atomic_file,
    read_versioned_json,
    recover,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parents[2]

#: Every file-system call the helper makes is a step; the child SIGKILLs itself at step ``K``.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from cycleqd import atomic

    scenario, target, K = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    count = 0

    def step():
        global count
        count += 1
        if count == K:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(mod, name):
        real = getattr(mod, name)

        def hooked(*args, **kwargs):
            step()
            return real(*args, **kwargs)

        setattr(mod, name, hooked)

    for name in ("open", "close", "write", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir", "chmod",
                 "fchmod", "scandir", "lstat", "fstat"):
        wrap(os, name)
    wrap(fcntl, "flock")

    if scenario == "file":
        atomic.write_bytes_atomic(target, b"new" * 3000)
    elif scenario == "by-name":  # a library that writes the temporary by name, in pieces
        with atomic.atomic_file(target) as tmp:
            with open(tmp, "wb") as f:
                for _ in range(3):
                    f.write(b"new" * 1000)
                    f.flush()
                    step()
    elif scenario == "json":
        atomic.write_json_atomic(target, {"format_version": 1, "state": "new", "pad": "x" * 5000})
    elif scenario in ("dir", "new-dir"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "sub").mkdir()
            for name in ("a", "b", "sub/c"):
                (tmp / name).write_text("new " + name)
                step()
    elif scenario == "recover":
        atomic.recover(target)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(count)
    """
)

DIR_FILES = ("a", "b", "sub/c")


def _child(scenario: str, target: Path, k: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-S", "-c", CHILD, str(ROOT), scenario, str(target), str(k)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def _make_dir(path: Path, tag: str) -> None:
    (path / "sub").mkdir(parents=True)
    for name in DIR_FILES:
        (path / name).write_text(f"{tag} {name}")


def _dir_state(path: Path) -> str | None:
    """Old or new for a complete directory of either, None when there is none; fails on anything torn."""
    if not os.path.lexists(path):
        return None
    found = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert found == sorted(DIR_FILES), f"{path}: torn directory {found}"
    tags = {(path / name).read_text().split()[0] for name in DIR_FILES}
    assert len(tags) == 1 and tags <= {"old", "new"}, f"{path}: a mix of {tags}"
    return tags.pop()


def _leftovers(path: Path) -> list[str]:
    return sorted(p for p in os.listdir(path.parent) if p != path.name)


def _file_state(path: Path, scenario: str) -> str:
    if scenario == "json":
        data = read_versioned_json(path, 1, ValueError, "test")
        assert data["state"] in ("old", "new")
        return data["state"]
    data = path.read_bytes()
    assert data in (b"old" * 3000, b"new" * 3000), f"{path}: torn file ({len(data)} bytes)"
    return data[:3].decode()


def _campaign(tmp_path: Path, scenario: str, prepare, check) -> dict[str, int]:
    """Kill the writer at step 1, 2, ... until it completes; ``check(target)`` after each kill. The outcomes seen."""
    seen: dict[str, int] = {}
    for k in range(1, 500):
        work = tmp_path / f"k{k}"
        work.mkdir()
        target = work / ("model" if "dir" in scenario else "state")
        prepare(target)
        done = _child(scenario, target, k)
        if done.returncode == 0:
            assert int(done.stdout) < k, "finished although it should have been killed"
            state = check(target)
            assert state == "new" and _leftovers(target) == [], "a completed write must leave the new state alone"
            return seen
        assert done.returncode == -signal.SIGKILL, done.stderr
        state = check(target)
        seen[str(state)] = seen.get(str(state), 0) + 1
    raise AssertionError("the writer never completed")


@pytest.mark.parametrize("scenario", ["file", "by-name", "json"])
def test_a_file_writer_killed_at_every_step_leaves_the_old_or_the_new_file(tmp_path, scenario):
    def prepare(target: Path) -> None:
        if scenario == "json":
            target.write_text(json.dumps({"format_version": 1, "state": "old"}))
        else:
            target.write_bytes(b"old" * 3000)

    def check(target: Path) -> str:
        state = _file_state(target, scenario)  # before any recovery: the rename is the only change a reader sees
        recover(target)
        assert _leftovers(target) == [], "a killed writer's temporary survived the recovery"
        assert _file_state(target, scenario) == state
        if scenario == "json":  # the next write over it works and leaves nothing behind
            write_json_atomic(target, {"format_version": 1, "state": "new"})
        else:
            write_bytes_atomic(target, b"new" * 3000)
        assert _file_state(target, scenario) == "new" and _leftovers(target) == []
        return state

    seen = _campaign(tmp_path, scenario, prepare, check)
    assert set(seen) == {"old", "new"}, seen  # killed before and after the rename, both observed


@pytest.mark.parametrize("scenario", ["dir", "new-dir"])
def test_a_directory_writer_killed_at_every_step_leaves_the_old_or_the_new_directory(tmp_path, scenario):
    def prepare(target: Path) -> None:
        if scenario == "dir":
            _make_dir(target, "old")

    def check(target: Path) -> str | None:
        before = _dir_state(target)
        if before is None and scenario == "dir":  # killed between the two renames: the old one is aside, whole
            assert _dir_state(target.with_name(".model.old")) == "old"
        recover(target)  # what a restarted writer (or a careful reader) does first
        after = _dir_state(target)
        assert after == (before or ("old" if scenario == "dir" else None))
        assert _leftovers(target) == [], "a temporary or .model.old survived the recovery"
        with atomic_directory(target) as tmp:
            _make_dir(tmp, "new")
        assert _dir_state(target) == "new" and _leftovers(target) == []
        return after

    seen = _campaign(tmp_path, scenario, prepare, check)
    assert set(seen) == ({"old", "new"} if scenario == "dir" else {"None", "new"}), seen


def test_a_recovery_killed_at_every_step_still_ends_with_the_old_or_the_new_directory(tmp_path):
    """The states a killed swap can leave (old aside with no new; new in place with the old one and a temporary
    still beside it), each recovered by a child killed at every step of the recovery, then recovered again."""

    def aside(target: Path) -> None:  # killed between the renames
        _make_dir(target.with_name(".model.old"), "old")
        _make_dir(target.with_name(".model.tmp-deadbeef"), "new")

    def not_cleaned(target: Path) -> None:  # killed after the swap, before removing the old one
        _make_dir(target, "new")
        _make_dir(target.with_name(".model.old"), "old")

    for name, prepare, expected in (("aside", aside, "old"), ("not-cleaned", not_cleaned, "new")):
        for k in range(1, 500):
            work = tmp_path / f"{name}-{k}"
            work.mkdir()
            target = work / "model"
            prepare(target)
            done = _child("recover", target, k)
            assert done.returncode in (0, -signal.SIGKILL), done.stderr
            state = _dir_state(target)
            if state is None:
                assert _dir_state(target.with_name(".model.old")) == "old"
            recover(target)
            assert _dir_state(target) == expected and _leftovers(target) == []
            if done.returncode == 0:
                break
        else:
            raise AssertionError("the recovery never completed")


def test_a_live_writers_temporary_is_not_taken_for_a_dead_ones(tmp_path):
    target = tmp_path / "state"
    target.write_text("old")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
        recover(target)  # in this process
        other = subprocess.run(
            [sys.executable, "-S", "-c", CHILD, str(ROOT), "recover", str(target), "0"], check=False, timeout=600
        )  # and in another one
        assert other.returncode == 0 and tmp.read_text() == "new"
    assert target.read_text() == "new" and _leftovers(target) == []
    with atomic_directory(tmp_path / "model") as tmp:
        _make_dir(tmp, "new")
        recover(tmp_path / "model")
        assert _dir_state(tmp) == "new"
    assert _dir_state(tmp_path / "model") == "new"


def test_a_failed_write_leaves_the_old_state_and_no_temporary(tmp_path):
    target = tmp_path / "state"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and _leftovers(target) == []
    _make_dir(tmp_path / "model", "old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "model") as tmp:
        (tmp / "a").write_text("new a")
        raise KeyboardInterrupt
    assert _dir_state(tmp_path / "model") == "old"
    assert sorted(os.listdir(tmp_path)) == ["model", "state"]
    with pytest.raises(FileNotFoundError):  # a vanished directory is an error, not made again
        write_text_atomic(tmp_path / "gone" / "state", "x")
    assert not (tmp_path / "gone").exists()


def test_modes_and_nested_directories(tmp_path):
    write_text_atomic(tmp_path / "secret", "key\n", mode=0o600)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    write_text_atomic(tmp_path / "plain", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask
    with atomic_directory(tmp_path / "outer") as outer:
        with atomic_directory(outer / "inner") as inner:  # a swap inside our own temporary needs no lock on it
            (inner / "f").write_text("1")
        write_json_atomic(outer / "meta.json", {"format_version": 2})
    assert stat.S_IMODE((tmp_path / "outer").stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "outer" / "inner" / "f").read_text() == "1"
    assert read_versioned_json(tmp_path / "outer" / "meta.json", 2, ValueError, "h") == {"format_version": 2}


def test_read_versioned_json_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"run.json: corrupt, not valid JSON .*; rerun it"):
        read_versioned_json(path, 1, ValueError, "rerun it")
    write_json_atomic(path, {"format_version": 2})
    with pytest.raises(ValueError, match="field 'format_version' is 2, expected 1; rerun it"):
        read_versioned_json(path, 1, ValueError, "rerun it")
