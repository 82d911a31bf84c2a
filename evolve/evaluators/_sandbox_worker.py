"""Sandbox worker: runs untrusted, model-written Python in a separate, locked-down interpreter.

Started by :mod:`evolve.evaluators.sandbox` as ``python -I -S <this file>`` (isolated mode, no site-packages). It
must stay standard-library only and import nothing from the project. Protocol: one JSON document on stdin
``{"jobs": [{"code", "argnames", "calls"}...], "limits": {...}}``; one JSON line per job on stdout, written as
each job finishes so that the parent keeps every result before a crash.

Layers, outermost first (any one of them stops the attacks in the test-suite on its own for its class):
1. the parent: a separate process in its own session, killed as a group on a wall-clock deadline;
2. privileges: as root, a private network namespace (no interfaces but a down loopback) and uid/gid nobody;
3. resource limits: address space, CPU seconds re-armed per job, no file writes, no new processes, few fds;
4. an audit hook that vetoes every audited event (open, socket, subprocess, os.*, import, ctypes, ...) once
   the jobs are read;
5. an AST allow-list: no imports, no names or attributes starting with ``_``, no try/with/class/global;
6. restricted builtins: a short list of pure functions, no ``open``, ``getattr``, ``__import__``, ``eval``.

Each answer's objects are torn down (and a garbage collection run) *before* its result line is written: an
answer that crashes the interpreter while its objects are freed (a million nested ``enumerate`` objects
overflow the C stack on deallocation) then dies without a result and is charged for it, instead of the next
answer, during which the collection would otherwise have happened.
"""

import ast
import gc
import io
import json
import os
import resource
import signal
import sys
import tokenize

# The parser imports unicodedata to NFKC-normalise non-ASCII identifiers; the audit hook would veto that import
# while an answer is parsed, so it is loaded here, while imports are still allowed.
import unicodedata

SAFE_BUILTINS = {
    name: getattr(__builtins__, name) if not isinstance(__builtins__, dict) else __builtins__[name]
    for name in (
        "abs all any bool chr dict divmod enumerate filter float frozenset int isinstance len list map max min "
        "ord pow range reversed round set sorted str sum tuple zip True False None"
    ).split()
}

ALLOWED_NODES = (
    ast.Module, ast.Expression, ast.Expr, ast.FunctionDef, ast.Lambda, ast.arguments, ast.arg, ast.Return,
    ast.If, ast.For, ast.While, ast.Break, ast.Continue, ast.Pass, ast.Assign, ast.AugAssign, ast.AnnAssign,
    ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.Name, ast.Attribute,
    ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.ListComp, ast.SetComp, ast.DictComp,
    ast.GeneratorExp, ast.comprehension, ast.Subscript, ast.Slice, ast.Starred, ast.JoinedStr,
    ast.FormattedValue, ast.Load, ast.Store, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)  # fmt: skip
FORBIDDEN_ATTRIBUTES = {"format", "format_map", "mro"}
MAX_CODE_CHARS = 2000


class Rejected(Exception):
    """The answer is not allowed to run at all."""


class JobTimeout(BaseException):
    """Raised by the interval timer; a BaseException so that no allowed construct can swallow it."""


def check(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if not isinstance(node, ALLOWED_NODES):
            raise Rejected(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise Rejected(f"name {node.id!r} is not allowed")
        if isinstance(node, ast.Attribute) and (node.attr.startswith("_") or node.attr in FORBIDDEN_ATTRIBUTES):
            raise Rejected(f"attribute {node.attr!r} is not allowed")
        if isinstance(node, (ast.FunctionDef, ast.arg)):
            name = node.name if isinstance(node, ast.FunctionDef) else node.arg
            if name.startswith("_"):
                raise Rejected(f"name {name!r} is not allowed")
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            raise Rejected("decorators are not allowed")


def check_identifiers(code: str) -> None:
    """Refuse identifiers that Python would read as other letters (homoglyph tricks), saying so.

    Python NFKC-normalises identifiers, so ``ｅｖａｌ`` (fullwidth letters) *is* ``eval`` to the interpreter while
    looking different to a reader or a text filter. The AST check sees the normalised names anyway; refusing
    them here says why, while names that are already normal (``é``) are accepted like ASCII ones.
    """
    if code.isascii():
        return
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return  # the parser reports the syntax error
    for tok in tokens:
        if tok.type == tokenize.NAME:
            normal = unicodedata.normalize("NFKC", tok.string)
            if normal != tok.string:
                raise Rejected(
                    f"identifier {tok.string!r} is written with look-alike characters (Python reads it as "
                    f"{normal!r}); write it with plain letters"
                )


def build(code: str, argnames: list) -> object:
    """Turn an answer (a ``def``, a ``lambda`` or a bare expression over ``argnames``) into a callable."""
    if len(code) > MAX_CODE_CHARS:
        raise Rejected("answer too long")
    check_identifiers(code)
    try:
        tree = ast.parse(code, mode="eval")
        if not isinstance(tree.body, ast.Lambda):
            tree = ast.parse(f"lambda {', '.join(argnames)}: ({code})", mode="eval")
        check(tree)
        return eval(compile(tree, "<answer>", "eval"), {"__builtins__": SAFE_BUILTINS})  # noqa: S307 (checked)
    except SyntaxError:
        pass
    tree = ast.parse(code, mode="exec")
    check(tree)
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    if not functions:
        raise Rejected("no function, lambda or expression found")
    namespace: dict = {"__builtins__": SAFE_BUILTINS}
    exec(compile(tree, "<answer>", "exec"), namespace)  # noqa: S102 (checked tree, restricted builtins)
    return namespace[functions[-1]]


def confine(limits: dict) -> None:
    """Apply the process-level layers. Each is best effort where the OS refuses it; the others still hold."""
    mem = limits["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    if os.geteuid() == 0:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare(0x40000000)  # CLONE_NEWNET: a namespace with no usable interface
        except Exception:  # noqa: S110 (no namespace support: the audit hook still vetoes sockets)
            pass
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError:
            pass
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


UNTRUSTED = [False]


def audit(event: str, args: tuple) -> None:
    """Veto every audited event while answer code runs (the worker's own bookkeeping runs in between)."""
    if UNTRUSTED[0] and event not in ("compile", "exec"):
        raise PermissionError(f"sandbox: {event} is not allowed")


def on_alarm(signum, frame):
    raise JobTimeout()


def main() -> None:
    request = json.loads(sys.stdin.read())
    limits = request["limits"]
    out = sys.stdout
    dumps = json.dumps
    # The hard CPU limit covers the whole batch and is fixed before privileges are dropped (it can only be
    # lowered afterwards); the soft limit is re-armed below for each job.
    hard_cpu = int(len(request["jobs"]) * (limits["seconds_per_job"] + 1)) + 5
    resource.setrlimit(resource.RLIMIT_CPU, (hard_cpu, hard_cpu))
    confine(limits)
    signal.signal(signal.SIGALRM, on_alarm)
    sys.addaudithook(audit)
    max_output = limits["max_output_chars"]
    seconds = limits["seconds_per_job"]
    for job in request["jobs"]:
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = int(used.ru_utime + used.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (min(cpu + int(seconds) + 1, hard_cpu), hard_cpu))
        signal.setitimer(signal.ITIMER_REAL, seconds)
        UNTRUSTED[0] = True
        try:
            result = run_job(job, max_output)
            # Free everything the answer made (its function and globals form a cycle) before reporting it, so
            # that a crash on deallocation is this answer's, not the next one's.
            gc.collect()
        except JobTimeout:
            result = {"ok": False, "error": "timeout"}
        except BaseException as exc:  # raised while its objects were freed: still this answer's failure
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            UNTRUSTED[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(dumps(result) + "\n")
        out.flush()


def run_job(job: dict, max_output: int) -> dict:
    """Run one answer; everything it made is local here, so it is unreachable once this returns."""
    try:
        fn = build(job["code"], job["argnames"])
        outputs = []
        for call in job["calls"]:
            text = repr(fn(*call))
            if len(text) > max_output:
                raise Rejected("output too large")
            outputs.append(text)
        return {"ok": True, "outputs": outputs}
    except JobTimeout:
        return {"ok": False, "error": "timeout"}
    except BaseException as exc:  # everything an answer can raise is its own failure
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}


if __name__ == "__main__":
    main()
