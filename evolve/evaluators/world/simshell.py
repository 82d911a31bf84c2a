"""A simulated shell over an in-memory file system, written in Python: no real shell is ever invoked.

It implements the subset the ``os`` skill asks for (ls, cat, grep, wc, head, tail, sort, uniq, find, echo and
pipes) with GNU-compatible output, so that answers a person would type score the same as they would in bash.
Anything outside that subset (redirection, ``;``, ``&&``, substitutions) is an error, not a silent no-op.

``grep`` patterns are model-written, so they run on RE2 (``google-re2``), which matches in time linear in the
input: a pattern such as ``(a*)*b`` cannot backtrack catastrophically in the evolution process, as it would
with Python's ``re``. What RE2 does not support (backreferences, lookaround) is a grep error, exit status 2.
"""

from __future__ import annotations

import fnmatch
import random
import re
import shlex
from dataclasses import dataclass

import re2

WORDS = ("error", "warn", "info", "disk", "user", "login", "cache", "net", "boot", "sync", "mail", "queue")
DIRS = ("/home/ann", "/home/bob", "/var/log", "/etc", "/srv/data", "/srv/www", "/opt/tools")
FILES = tuple(
    f"{d}/{f}"
    for d, names in {
        "/home/ann": ("notes.txt", "todo.txt", "app.log", "plan.md", "shop.txt"),
        "/home/bob": ("report.csv", "ideas.txt", "build.log", "songs.txt"),
        "/var/log": ("syslog.log", "auth.log", "mail.log", "kern.log", "boot.log"),
        "/etc": ("hosts.conf", "app.conf", "cron.conf"),
        "/srv/data": ("users.csv", "items.csv", "readme.txt", "sales.csv"),
        "/srv/www": ("index.md", "access.log", "errors.log"),
        "/opt/tools": ("setup.md", "jobs.txt", "tools.conf"),
    }.items()
    for f in names
)
MAX_PIPELINE = 8
MAX_PATTERN_CHARS = 1000
RE2_MAX_MEM = 8 * 2**20  # bytes RE2 may use for one compiled pattern; a larger one is refused, not compiled


class ShellError(Exception):
    """A command line the simulated shell cannot run (syntax, unknown command, bad option)."""


@dataclass(frozen=True)
class Result:
    stdout: str
    status: int
    error: str = ""  # why the command failed (status 2), as a shell would say it on stderr


def default_files(seed: int = 7) -> dict[str, str]:
    """The fixed file system of the skill world: 27 files of 6-12 short lines drawn from a small vocabulary."""
    rng = random.Random(seed)
    files = {}
    for path in FILES:
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3))) for _ in range(rng.randint(6, 12))]
        lines[rng.randrange(len(lines))] = lines[0]  # a duplicate line, so that uniq has something to do
        files[path] = "\n".join(lines) + "\n"
    return files


class Shell:
    """Runs one command line against a read-only in-memory file system."""

    def __init__(self, files: dict[str, str] | None = None) -> None:
        self.files = dict(files if files is not None else default_files())
        self.dirs = {"/"}
        for path in self.files:
            parts = path.split("/")[:-1]
            for i in range(2, len(parts) + 1):
                self.dirs.add("/".join(parts[:i]))

    def run(self, line: str) -> Result:
        """Run ``line``; any error becomes status 2 with empty output, never an exception."""
        try:
            stages = self._parse(line)
            data, status = "", 0
            for i, argv in enumerate(stages):
                data, status = self._command(argv, data if i else None)
            return Result(data, status)
        except ShellError as exc:
            return Result("", 2, str(exc))

    # -- parsing --------------------------------------------------------------------------------------------
    def _parse(self, line: str) -> list[list[str]]:
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars="|;&<>()")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError as exc:
            raise ShellError(str(exc)) from exc
        stages: list[list[str]] = [[]]
        for tok in tokens:
            if tok == "|":
                stages.append([])
            elif tok and set(tok) <= set("|;&<>()"):
                raise ShellError(f"unsupported operator {tok!r}")
            else:
                stages[-1].append(tok)
        if any(not s for s in stages) or len(stages) > MAX_PIPELINE:
            raise ShellError("empty or too long pipeline")
        return stages

    # -- file system ----------------------------------------------------------------------------------------
    def _norm(self, path: str) -> str:
        if not path.startswith("/"):
            path = "/home/ann/" + path  # the simulated working directory
        parts: list[str] = []
        for p in path.split("/"):
            if p == "..":
                if parts:
                    parts.pop()
            elif p and p != ".":
                parts.append(p)
        return "/" + "/".join(parts)

    def _read(self, path: str) -> str:
        p = self._norm(path)
        if p not in self.files:
            raise ShellError(f"{path}: No such file")
        return self.files[p]

    def _inputs(self, operands: list[str], stdin: str | None) -> list[tuple[str | None, str]]:
        if operands:
            return [(op, self._read(op)) for op in operands]
        if stdin is None:
            raise ShellError("no input")
        return [(None, stdin)]

    # -- commands -------------------------------------------------------------------------------------------
    def _command(self, argv: list[str], stdin: str | None) -> tuple[str, int]:
        name, args = argv[0], argv[1:]
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None:
            raise ShellError(f"{name}: command not found")
        return handler(args, stdin)

    @staticmethod
    def _flags(args: list[str], allowed: str) -> tuple[set[str], list[str]]:
        flags, rest = set(), []
        for a in args:
            if a.startswith("-") and len(a) > 1 and not a[1:].isdigit():
                for ch in a[1:]:
                    if ch not in allowed:
                        raise ShellError(f"invalid option -{ch}")
                    flags.add(ch)
            else:
                rest.append(a)
        return flags, rest

    @staticmethod
    def _count_option(args: list[str], default: int) -> tuple[int, list[str]]:
        """``-n N``, ``-nN`` or ``-N`` as head and tail accept them."""
        n, rest, i = default, [], 0
        while i < len(args):
            a = args[i]
            if a == "-n" and i + 1 < len(args):
                n, i = _int(args[i + 1]), i + 2
                continue
            if a.startswith("-n") and len(a) > 2:
                n = _int(a[2:])
            elif a.startswith("-") and a[1:].isdigit():
                n = int(a[1:])
            elif a.startswith("-") and len(a) > 1:
                raise ShellError(f"invalid option {a}")
            else:
                rest.append(a)
            i += 1
        return n, rest

    def _cmd_echo(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        return " ".join(args) + "\n", 0

    def _cmd_cat(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        _, ops = self._flags(args, "")
        return "".join(text for _, text in self._inputs(ops, stdin)), 0

    def _cmd_ls(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        _, ops = self._flags(args, "1a")
        out = []
        for op in ops or ["/home/ann"]:
            p = self._norm(op)
            if p in self.files:
                out.append(op)
            elif p in self.dirs:
                prefix = p.rstrip("/") + "/"
                names = {x[len(prefix) :].split("/")[0] for x in [*self.files, *self.dirs] if x.startswith(prefix)}
                out.extend(sorted(n for n in names if n))
            else:
                raise ShellError(f"ls: {op}: No such file or directory")
        return "".join(x + "\n" for x in out), 0

    def _cmd_head(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        n, ops = self._count_option(args, 10)
        return "".join("".join(_lines(text)[:n]) for _, text in self._inputs(ops, stdin)), 0

    def _cmd_tail(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        n, ops = self._count_option(args, 10)
        return "".join("".join(_lines(text)[-n:] if n else []) for _, text in self._inputs(ops, stdin)), 0

    def _cmd_wc(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        flags, ops = self._flags(args, "lwc")
        out = []
        for name, text in self._inputs(ops, stdin):
            counts = {"l": text.count("\n"), "w": len(text.split()), "c": len(text.encode())}
            shown = [str(counts[f]) for f in "lwc" if f in flags] or [str(counts[f]) for f in "lwc"]
            out.append(" ".join(shown) + (f" {name}" if name is not None else ""))
        return "".join(x + "\n" for x in out), 0

    def _cmd_grep(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        flags, rest = self._flags(args, "ivcnwF")
        if not rest:
            raise ShellError("grep: no pattern")
        pattern, ops = rest[0], rest[1:]
        rx = _grep_pattern(pattern, ignore_case="i" in flags, fixed="F" in flags, words="w" in flags)
        inputs = self._inputs(ops, stdin)
        out, total = [], 0
        for name, text in inputs:
            hits = [
                (i, ln) for i, ln in enumerate(_lines(text), 1) if bool(rx.search(ln.rstrip("\n"))) != ("v" in flags)
            ]
            total += len(hits)
            prefix = f"{name}:" if len(inputs) > 1 else ""
            if "c" in flags:
                out.append(f"{prefix}{len(hits)}\n")
            else:
                out.extend(f"{prefix}{f'{i}:' if 'n' in flags else ''}{ln}" for i, ln in hits)
        return "".join(out), 0 if total else 1

    def _cmd_sort(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        flags, ops = self._flags(args, "rnu")
        lines = [ln for _, text in self._inputs(ops, stdin) for ln in _lines(text)]
        if "n" in flags:
            lines.sort(key=lambda ln: (_leading_number(ln), ln), reverse="r" in flags)
        else:
            lines.sort(reverse="r" in flags)
        if "u" in flags:
            lines = list(dict.fromkeys(lines))
        return "".join(lines), 0

    def _cmd_uniq(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        flags, ops = self._flags(args, "c")
        out: list[tuple[int, str]] = []
        for _, text in self._inputs(ops, stdin):
            for ln in _lines(text):
                if out and out[-1][1] == ln:
                    out[-1] = (out[-1][0] + 1, ln)
                else:
                    out.append((1, ln))
        return "".join(f"{c:>7} {ln}" if "c" in flags else ln for c, ln in out), 0

    def _cmd_find(self, args: list[str], stdin: str | None) -> tuple[str, int]:
        start = "."
        if args and not args[0].startswith("-"):
            start, args = args[0], args[1:]
        name_pat, kind = None, None
        while args:
            if args[0] == "-name" and len(args) > 1:
                name_pat, args = args[1], args[2:]
            elif args[0] == "-type" and len(args) > 1 and args[1] in ("f", "d"):
                kind, args = args[1], args[2:]
            else:
                raise ShellError(f"find: unsupported argument {args[0]}")
        root = self._norm(start)
        if root not in self.dirs and root not in self.files:
            raise ShellError(f"find: {start}: No such file or directory")
        shown_root = start.rstrip("/") or "/"
        entries = sorted(p for p in [*self.files, *self.dirs] if p == root or p.startswith(root.rstrip("/") + "/"))
        out = []
        for p in entries:
            is_dir = p in self.dirs
            if (kind == "f" and is_dir) or (kind == "d" and not is_dir):
                continue
            if name_pat is not None and not fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], name_pat):
                continue
            out.append(shown_root + p[len(root.rstrip("/")) :] if p != root else shown_root)
        return "".join(x + "\n" for x in out), 0


def _grep_pattern(pattern: str, *, ignore_case: bool, fixed: bool, words: bool) -> re2._Regexp:
    """Compile a grep pattern with RE2; a pattern RE2 refuses is a grep error (status 2), never a fallback."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ShellError("grep: pattern too long")
    if fixed:
        pattern = re2.escape(pattern)
    if words:
        pattern = rf"\b(?:{pattern})\b"
    options = re2.Options()
    options.case_sensitive = not ignore_case
    options.log_errors = False
    options.max_mem = RE2_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ShellError(f"grep: pattern not supported by RE2 (no backreferences or lookaround): {reason}") from exc


def _lines(text: str) -> list[str]:
    return [ln if ln.endswith("\n") else ln + "\n" for ln in text.splitlines()]


def _int(s: str) -> int:
    if not s.isdigit():
        raise ShellError(f"invalid number {s!r}")
    return int(s)


def _leading_number(line: str) -> float:
    m = re.match(r"\s*(-?\d+(?:\.\d+)?)", line)
    return float(m.group(1)) if m else 0.0
