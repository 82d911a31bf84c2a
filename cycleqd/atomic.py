"""Atomic writes: files (bytes, text, or whatever a library writes to a path), whole directories, and versioned JSON.

What a reader of ``PATH`` can see, whenever the writer is killed (SIGKILL included): the old content or the new,
complete, never a mix and never a half-written file. Files are flushed to disk before they are renamed into place,
so the same holds across a power loss.

- A file is written to a temporary sibling, ``.NAME.tmp-XXXXXXXX``, which is then renamed over ``PATH``.
- A directory is filled as a temporary sibling of the same name pattern and swapped in: the old ``PATH`` is moved
  aside to ``.NAME.old``, the new one renamed in, the old one removed. Swaps and their recovery hold a lock on the
  parent directory, so two of them never interleave.
- A writer holds a lock on its temporary for as long as it lives. The next write of ``PATH`` (or ``recover(PATH)``)
  removes the temporaries whose writer is gone, puts back a ``.NAME.old`` that has no ``NAME`` (a swap killed
  between its two renames) and removes one that has (a swap killed before its clean-up). A failed write (an
  exception) removes its temporary at once and leaves ``PATH`` as it was.

Locks are ``flock`` locks: the kernel drops them when their process dies, whatever killed it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_directory",
    "atomic_file",
    "read_versioned_json",
    "recover",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

TMP_MARK = ".tmp-"

#: This process's live directory temporaries: a swap inside one of them needs no lock on it (its writer holds it).
_LIVE: set[str] = set()


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}{TMP_MARK}"


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, a race with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _fsync(path: Path | str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _fsync(p)
        _fsync(dirpath, directory=True)


def _remove(path: Path | str) -> None:
    """Remove a file or a directory tree; nothing when it is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextmanager
def _parent_lock(path: Path) -> Iterator[None]:
    if os.path.abspath(path.parent) in _LIVE:  # inside our own temporary: nobody else swaps there
        yield
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def _new_temp(path: Path, directory: bool) -> tuple[Path, int]:
    """A fresh temporary sibling of ``path`` and an open descriptor on it that holds its lock.

    A cleaner that took the lock between the creation and our lock has removed it: then we make another."""
    while True:
        if directory:
            name = tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            except BaseException:
                _remove(name)
                raise
        else:
            fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a cleaner holds it
            if os.path.samestat(os.fstat(fd), os.lstat(name)):
                return Path(name), fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            _remove(name)
            raise
        os.close(fd)


def _remove_if_abandoned(tmp: str) -> None:
    """Remove a temporary whose writer is gone (nobody holds its lock); leave a live writer's alone."""
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # gone already, another user's, or not ours to judge
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is alive
            return
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(tmp))
        except FileNotFoundError:  # renamed into place or removed meanwhile
            return
        if same:
            _remove(tmp)
    finally:
        os.close(fd)


def _restore_or_drop_old(path: Path) -> None:
    """A swap's leftover: ``.NAME.old`` without ``NAME`` is put back, beside ``NAME`` it is removed. Hold the
    parent's lock."""
    old = _old(path)
    if not os.path.lexists(old):
        return
    if os.path.lexists(path):
        _remove(old)
    else:
        os.replace(old, path)


def recover(path: Path) -> None:
    """Finish what a killed writer of ``path`` left: put back or remove a directory swap's ``.NAME.old`` and remove
    the temporaries whose writer is gone. Every write here does it first; a reader of a directory that a writer
    replaces calls it before reading (it costs a stat when there is nothing to do, and needs no write access then)."""
    path = Path(path)
    if os.path.lexists(_old(path)):
        with _parent_lock(path):
            _restore_or_drop_old(path)
    prefix = _tmp_prefix(path)
    try:
        entries = [e.path for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for tmp in entries:
        _remove_if_abandoned(tmp)


@contextmanager
def atomic_file(path: Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write by name (``save_file(tensors, tmp)``, ``tmp.write_text``);
    when the block ends it is flushed to disk and renamed over ``path``, and when the block raises it is removed.

    ``mode``: the file's permissions (default: ``0o666`` less the umask, as ``open`` makes them); the temporary has
    them, never wider, from its creation on, so a secret written with ``mode=0o600`` is never readable by others.
    The directory must exist (a vanished one is an error, not made again)."""
    path = Path(path)
    recover(path)
    tmp, fd = _new_temp(path, directory=False)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        yield tmp
        if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
            os.fsync(fd)
        else:  # the writer replaced the file we made (a library that writes beside and renames)
            _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    with atomic_file(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, *, mode: int | None = None, encoding: str = "utf-8") -> None:
    with atomic_file(path, mode=mode) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 2, **dumps: Any) -> None:
    """``data`` as JSON at ``path``, atomically (``dumps``: more ``json.dumps`` arguments, e.g. ``sort_keys``)."""
    write_text_atomic(path, json.dumps(data, indent=indent, **dumps))


def read_versioned_json(path: Path, version: int, error: type[Exception], hint: str) -> dict[str, Any]:
    """The JSON object at ``path``, refused with ``error`` when it is not JSON or has another ``format_version``.

    ``hint`` ends each message with what the user can do about it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: corrupt, not valid JSON ({exc}); {hint}") from exc
    found = data.get("format_version") if isinstance(data, dict) else None
    if found != version:
        raise error(f"{path}: field 'format_version' is {found!r}, expected {version}; {hint}")
    return data


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to fill; when the block ends its files are flushed to disk and it
    replaces ``path`` (an older ``path`` is moved aside first and removed only once the new one is in place); when
    the block raises it is removed and ``path`` is left exactly as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp, fd = _new_temp(path, directory=True)
    _LIVE.add(os.path.abspath(tmp))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        _fsync_tree(tmp)
        with _parent_lock(path):
            _restore_or_drop_old(path)  # a swap killed since our recover()
            if os.path.lexists(path):
                old = _old(path)
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)
                    raise
                _fsync(path.parent, directory=True)
                _remove(old)
            else:
                os.replace(tmp, path)
                _fsync(path.parent, directory=True)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(fd)
        _LIVE.discard(os.path.abspath(tmp))
