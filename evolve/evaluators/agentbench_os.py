"""The ``agentbench_os`` skill: AgentBench's OS-interaction tasks (THUDM/AgentBench ``data/os_interaction``,
Apache-2.0, vendored unmodified in ``evolve/data/agentbench_os``), run and graded as AgentBench runs and grades
them, with a bubblewrap sandbox (:mod:`evolve.evaluators.os_sandbox`) in place of AgentBench's docker container.

One episode, as in AgentBench's ``OSInteraction`` (``src/server/tasks/os_interaction/task.py``):

1. a fresh privileged sandbox :class:`~evolve.evaluators.os_sandbox.Session` (root inside, a throw-away root
   filesystem, no network), root in ``/root`` as in AgentBench's container (its ``environment.py``: user root,
   ``WorkingDir /root``); the agent's shell and every script start there;
2. the task's ``create.init`` scripts, each a separate process (AgentBench's ``execute_independent``); one that
   fails ends the episode with score 0 (AgentBench: "Init script ... failed"), and so does one that hits the
   sandbox's read-only ``/usr`` even if its exit status hides it;
3. its ``start`` script, sent to the agent's interactive shell (AgentBench's ``container.execute``: a
   ``var=3.14`` or a ``cd`` stays for the agent, a ``... &`` keeps running in the background);
4. the conversation: AgentBench's instructions and one-shot example (:data:`PROMPT`, :data:`ONE_SHOT`), then the
   task; each turn is read by AgentBench's ``extract_action`` (:func:`extract_action`): ``Act: bash`` runs the
   turn's ```` ```bash ```` blocks in the persistent shell (``cd``, variables and background jobs persist), and the
   output comes back as ``The output of the OS:`` (cut at 780 characters plus AgentBench's truncation note when
   longer than ``observation_chars``, 800 by default); ``Act: answer(...)`` and ``Act: finish`` end the episode
   (AgentBench's ``commit``); a turn with no action ends it with score 0 (AgentBench's
   ``AGENT_INVALID_ACTION``), as does the turn limit;
5. grading: ``evaluation.match`` compares the answer (stripped) with the expected string, or searches a regex in
   it; ``evaluation.check`` runs its scripts one after another in the same sandbox, each given the answer
   (``str(answer)``, so ``"None"`` after ``finish``) and the stdout of every earlier check as arguments; a
   ``null`` check runs the task's ``example`` script in its place (the reference solution, whose output the next
   check compares the answer with); every check must exit 0.

Differences from AgentBench's docker shell, all small: the agent's command output is its stdout and stderr
interleaved as a terminal shows them, without the terminal's echo, prompts or ``\\r``; a command that runs past
``timeout`` seconds is interrupted and the observation says so; a command's stdin is ``/dev/null``, so an
interactive program (``su - jack``, ``vim``) returns at once instead of taking over the shell. Tasks that need
what the sandbox cannot give (package installs, the network, a shell taken over by ``su``, writing the host's
read-only ``/usr``) are excluded, with the reason, in ``excluded.json``; see :meth:`AgentBenchOsTask.gold_control`.

The data and the environment follow AgentBench's current code (commit 578c5e9, whose task descriptions were
reworded for the ``/root`` working directory); the conversation is the ``Act:`` text protocol of its earlier
task code (commit ac57ad0, also CycleQD's fishfarm copy), since the current one uses OpenAI function calls.

Gold trajectories (:meth:`AgentBenchOsTask.gold_conversations`): the task's example script as an ``Act: bash``
turn, then ``Act: answer(<the last line it printed>)`` built from the observation the sandbox really returned
(or ``Act: finish`` when it printed nothing: the example changed the system, and the checks look at it); kept
only where the episode then scores 1.
"""

from __future__ import annotations

import glob
import json
import math
import re
import secrets
import shlex
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evolve.evaluators import os_sandbox
from evolve.evaluators.base import SPLITS, EvaluatorError
from evolve.evaluators.episodes import Action, EpisodeItem, EpisodeTask, Message, Policy, Transcript
from evolve.evaluators.specs import AgentBenchOsSpec

#: The vendored copy of AgentBench's ``data/os_interaction`` (the task files and the scripts they name).
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "agentbench_os"
EXCLUDED_FILE = "excluded.json"

#: AgentBench's task files and the directory their script files are relative to: ``configs/tasks/os.yaml``'s
#: ``os-dev`` and ``os-std`` (the benchmark's 26 dev and 144 test tasks; CycleQD's 170).
TASK_FILES: tuple[tuple[str, str], ...] = (
    ("data/dev.json", "scripts/dev"),
    ("data/1/*.json", "scripts/1"),
    ("data/2/*.json", "scripts/2"),
    ("data/3/*.json", "scripts/3"),
    ("data/4/*.json", "scripts/4"),
    ("data/5/*.json", "scripts/5"),
    ("data/6/*.json", "scripts/6"),
    ("data/7/*.json", "scripts/7"),
)

LANGUAGES = ("bash", "python")
#: AgentBench's containers run as root in ``/root`` (``environment.py``: ``WorkingDir``), and so do the episodes:
#: the agent's shell and every init, example and check script start there.
WORKDIR = "/root"

# -- AgentBench's conversation (src/server/tasks/os_interaction/task.py at commit ac57ad0, the ``Act:`` format
# -- that CycleQD's fishfarm copy also uses; the later function-calling version keeps the same tasks and checks).

#: The instructions, sent as the first user turn together with the one-shot problem.
PROMPT = (
    "You are an assistant that will act like a person, I'will play the role of linux(ubuntu) operating system. "
    "Your goal is to implement the operations required by me or answer to the question proposed by me. For each "
    "of your turn, you should first think what you should do, and then take exact one of the three actions: "
    '"bash", "finish" or "answer". \n\n'
    "1. If you think you should execute some bash code, take bash action, and you should print like this:\n\n"
    "Think: put your thought here.\n\nAct: bash\n\n```bash\n# put your bash code here\n```\n\n"
    "2. If you think you have finished the task, take finish action, and you should print like this:\n\n"
    "Think: put your thought here.\n\nAct: finish\n\n"
    "3. If you think you have got the answer to the question, take answer action, and you should print like "
    "this:\n\nThink: put your thought here.\n\n"
    "Act: answer(Your answer to the question should be put in this pair of parentheses)\n\n"
    "If the output is too long, I will truncate it. The truncated output is not complete. You have to deal with "
    "the truncating problem by yourself. Attention, your bash code should not contain any input operation. Once "
    "again, you should take only exact one of the three actions in each turn.\n\n"
)

#: The one-shot example (AgentBench's ``ONE_SHOT``; its ``agent`` turns are the assistant's).
ONE_SHOT: tuple[Message, ...] = (
    {"role": "user", "content": 'tell me how many files are in the directory "/etc"?'},
    {
        "role": "assistant",
        "content": "Think: To count the files in /etc, I need to print all the files in it.\n\n"
        "Act: bash\n\n```bash\nls /etc\n```",
    },
    {
        "role": "user",
        "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher protocols "
        "selinux tmpfiles.d [truncated because the output is too long]",
    },
    {
        "role": "assistant",
        "content": "Think: The output has been truncated because it is too long, so I need to count files by "
        "script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```",
    },
    {"role": "user", "content": "The output of the OS:\n220"},
    {"role": "assistant", "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"},
)

NEW_PROBLEM = "Now, I will start a new problem in a new OS. My problem is:\n\n"
OUTPUT_PREFIX = "The output of the OS:\n\n"
EMPTY_OUTPUT = "The output of the OS is empty."
READ_ONLY = "Read-only file system"
TRUNCATED = "\n[truncated because the output is too long]"

#: Commands that need package installs or the network, neither of which an episode has.
_NEEDS_PACKAGES = re.compile(r"\b(apt-get|apt|aptitude|dpkg\s+-i|snap|pip3?\s+install|npm\s+install|git\s+clone)\b")
_NEEDS_NETWORK = re.compile(r"\b(curl|wget)\b[^\n]*\bhttps?://|\bping\s")
#: A start script that hands the agent's shell to another user (``su - jack``): AgentBench's terminal keeps the
#: new user's shell for the agent's commands; here a command's stdin is /dev/null, so su returns at once.
_SU_SHELL = re.compile(r"(^|[;&|]\s*)su\s+(-\s+|-l\s+|--login\s+)?[A-Za-z_][\w-]*\s*$", re.M)


#: Tasks whose example solution cannot pass reliably, and why (found by reading each failure of the gold
#: control); the gold control excludes them without running them.
KNOWN_BROKEN: dict[str, str] = {
    "os/dev/8": "its example prints `du -sh`'s `4.0K` and its check (size-match.py) cannot read a decimal size "
    "(`int('4.0')`); the same in AgentBench's container, where it prints `8.0K`",
    "os/4/Q09/0": "its init's `echo 123321>/var/tmp.log` is, to bash, a redirection of file descriptor 123321, "
    "which needs an open-files limit above 123321 (docker's is 1048576, the sandbox's 256)",
    "os/7/bootstrap/0": "the answer counts processes (`ps -A | wc -l`), and the check's re-run of the example "
    "counts its own bash too: one more than any count the agent's shell can see (in AgentBench's container too)",
    "os/7/bootstrap/75": "the answer counts processes (`ps -e | wc -l`), and the check's re-run of the example "
    "counts its own processes too: never the count the agent's shell sees (in AgentBench's container too)",
    "os/7/bootstrap/1": "the answer counts processes with bash in their command line (`ps -ef | grep bash`), "
    "which races with the shell's own forks (a child not yet exec'd still reads as bash): the example passes its "
    "check only most of the time",
    "os/7/bootstrap/6": "the answer is the host's memory use at that moment (`free`), which changes between the "
    "agent's run and the check's re-run of the example: passes only by chance",
    "os/7/bootstrap/18": "the answer includes the host's memory use at that moment (`free`), which changes "
    "between the agent's run and the check's re-run of the example: passes only by chance",
    "os/7/bootstrap/67": "it expects the files an Ubuntu image has in /var/log (dpkg and apt logs); the "
    "sandbox's fresh /var/log is empty, so the example prints no number",
}


# --------------------------------------------------------------------------------------------------------------
# Reading AgentBench's task files.


def _script(obj: Any, *, where: str, script_dir: Path, allow_null: bool = False) -> tuple[str, str] | None:
    """AgentBench's ``load_script``: a string is bash code; an object has ``code`` or ``file`` (relative to the
    task file's script directory) and an optional ``language``."""
    if obj is None:
        if allow_null:
            return None
        raise EvaluatorError(f"{where}: null where a script is needed")
    if isinstance(obj, str):
        return "bash", obj
    if not isinstance(obj, dict):
        raise EvaluatorError(
            f"{where}: a script must be a string (bash code) or an object with code or file, not a {type(obj).__name__}"
        )
    language = obj.get("language", "bash")
    if language not in LANGUAGES:
        raise EvaluatorError(f"{where}.language: {language!r} is not supported (use {' or '.join(LANGUAGES)})")
    if "file" in obj:
        rel = obj["file"]
        if not isinstance(rel, str) or not rel:
            raise EvaluatorError(f"{where}.file: must be a path relative to {script_dir}")
        path = (script_dir / rel).resolve()
        if not path.is_relative_to(script_dir.resolve()):
            raise EvaluatorError(f"{where}.file: {rel!r} leaves the script directory {script_dir}")
        try:
            return language, path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EvaluatorError(f"{where}.file: cannot read {path} ({type(exc).__name__}: {exc})") from exc
    if "code" in obj:
        if not isinstance(obj["code"], str):
            raise EvaluatorError(f"{where}.code: must be a string")
        return language, obj["code"]
    raise EvaluatorError(f"{where}: a script object needs code or file")


def _scripts(obj: Any, *, where: str, script_dir: Path, allow_null: bool) -> list[tuple[str, str] | None]:
    if isinstance(obj, list):
        return [
            _script(s, where=f"{where}[{i}]", script_dir=script_dir, allow_null=allow_null) for i, s in enumerate(obj)
        ]
    return [_script(obj, where=where, script_dir=script_dir, allow_null=allow_null)]


def parse_task(raw: Any, *, where: str, script_dir: Path) -> dict[str, Any]:
    """One task object as AgentBench's ``_load_configs`` reads it, with its scripts' text; errors name the file,
    the task's index and the field."""
    if not isinstance(raw, dict):
        raise EvaluatorError(f"{where}: a task must be an object, not a {type(raw).__name__}")
    description = raw.get("description")
    if not isinstance(description, str) or not description.strip():
        raise EvaluatorError(f"{where}.description: missing (the task as the agent is told it, a string)")
    init: list[tuple[str, str] | None] = []
    create = raw.get("create")
    # AgentBench reads an image and init scripts only from an object; two of its tasks have a list there (a
    # copy of their check list), which it ignores: so does this.
    if isinstance(create, dict) and "init" in create:
        init = _scripts(create["init"], where=f"{where}.create.init", script_dir=script_dir, allow_null=False)
    start = None
    if "start" in raw:
        start = _script(raw["start"], where=f"{where}.start", script_dir=script_dir)
    evaluation = raw.get("evaluation")
    if not isinstance(evaluation, dict):
        raise EvaluatorError(f"{where}.evaluation: missing (an object with match or check)")
    match = check = None
    if "match" in evaluation:
        m = evaluation["match"]
        if isinstance(m, str):
            match = {"answer": m, "strip": True}
        elif isinstance(m, dict) and (isinstance(m.get("answer"), str) or isinstance(m.get("regex"), str)):
            match = dict(m)
            if "regex" in match and "answer" not in match:
                try:
                    re.compile(match["regex"])
                except re.error as exc:
                    raise EvaluatorError(f"{where}.evaluation.match.regex: not a regular expression ({exc})") from exc
        else:
            raise EvaluatorError(f"{where}.evaluation.match: a string, or an object with answer or regex")
    elif "check" in evaluation:
        check = _scripts(evaluation["check"], where=f"{where}.evaluation.check", script_dir=script_dir, allow_null=True)
    else:
        raise EvaluatorError(f"{where}.evaluation: check or match must exist")
    # The reference solution: AgentBench reads evaluation.example for check tasks (a null check runs it); a few
    # match tasks have one too, in evaluation or beside it, used here for their gold trajectories only.
    example = None
    for key, holder in (("evaluation.example", evaluation), ("example", raw)):
        if "example" in holder and holder["example"] is not None:
            example = _script(holder["example"], where=f"{where}.{key}", script_dir=script_dir)
            break
    if check is not None and None in check and example is None:
        raise EvaluatorError(f"{where}.evaluation.example: missing, and a null check runs it")
    labels = raw.get("labels", [])
    return {
        "description": description,
        "init": init,
        "start": start,
        "match": match,
        "check": check,
        "example": example,
        "labels": list(labels) if isinstance(labels, list) else [],
    }


def task_files(root: Path) -> list[tuple[Path, Path]]:
    """The task files under ``root`` (an ``os_interaction`` data directory) and their script directories."""
    out = []
    for pattern, scripts in TASK_FILES:
        for name in sorted(glob.glob(str(root / pattern))):
            if name.endswith(".json"):
                out.append((Path(name), root / scripts))
    return out


def task_id(root: Path, path: Path, index: int) -> str:
    """``os/<task file under data/, without .json>/<index in the file>``: ``os/dev/3``, ``os/4/Q47/0``."""
    rel = path.relative_to(root / "data").with_suffix("")
    return f"os/{rel.as_posix()}/{index}"


def read_tasks(root: Path) -> list[EpisodeItem]:
    """Every task of an AgentBench ``os_interaction`` directory, in AgentBench's order (JSON only)."""
    if not (root / "data").is_dir():
        raise EvaluatorError(
            f"{root}: not an AgentBench os_interaction directory (it needs data/ with the task files, and scripts/)"
        )
    files = task_files(root)
    if not files:
        raise EvaluatorError(f"{root}: no task files ({', '.join(p for p, _ in TASK_FILES)})")
    items: list[EpisodeItem] = []
    for path, script_dir in files:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise EvaluatorError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
        except json.JSONDecodeError as exc:
            raise EvaluatorError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        tasks = [raw] if isinstance(raw, dict) else raw
        if not isinstance(tasks, list):
            raise EvaluatorError(
                f"{path}: a task file holds a task object or a list of them, not a {type(raw).__name__}"
            )
        for index, obj in enumerate(tasks):
            cfg = parse_task(obj, where=f"{path}: task {index}", script_dir=script_dir)
            cfg["file"] = path.relative_to(root).as_posix()
            cfg["index"] = index
            items.append(EpisodeItem(task_id(root, path, index), cfg["description"], cfg))
    return items


def static_reason(cfg: Mapping[str, Any]) -> str | None:
    """Why a task cannot run in the sandbox, seen from its scripts alone (None: it may)."""
    setup = [s for s in (*cfg["init"], cfg["start"]) if s is not None]
    texts = [code for _, code in setup]
    for code in texts:
        m = _NEEDS_PACKAGES.search(code)
        if m:
            return (
                f"its setup runs `{m.group(1)}` (package installs): the sandbox has the host's read-only /usr and "
                "no network"
            )
        if _NEEDS_NETWORK.search(code):
            return "its setup needs the network, which the sandbox does not have"
    if cfg["start"] is not None and _SU_SHELL.search(cfg["start"][1]):
        return (
            "its start script hands the agent's shell to another user (`su - <user>` on AgentBench's terminal); "
            "here a command's stdin is /dev/null, so su returns at once and the agent would stay root"
        )
    return None


def extract_action(raw: str) -> dict[str, Any]:
    """AgentBench's ``extract_action``, unchanged: the last ``Act:`` line that names an action wins; ``bash``
    takes the turn's ```` ```bash ```` blocks (joined by a blank line), ``answer`` what is between the first ``(``
    and the last ``)`` of its line, ``finish`` no content (both are a ``commit``)."""
    think = re.findall(r"Think:\s*(.+)", raw)
    act = re.findall(r"Act:\s*(.+)", raw)
    ret: dict[str, Any] = {"thought": "\n".join(think), "action": None, "content": None}
    for action in act[::-1]:
        if action.lower().startswith("bash"):
            ret["action"] = "bash"
            break
        if action.lower().startswith("finish"):
            ret["action"] = "commit"
            break
        if action.lower().startswith("answer"):
            content = action[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left == -1 or right == -1:
                continue
            ret["action"] = "commit"
            ret["content"] = content[left + 1 : right]
            break
    if ret["action"] == "bash":
        ret["content"] = "\n\n".join(re.findall(r"```bash\n(.*?)\n```", raw, re.DOTALL))
    return ret


def bash_turn(code: str, thought: str = "I will run this command.") -> str:
    return f"Think: {thought}\n\nAct: bash\n\n```bash\n{code.strip(chr(10))}\n```"


def answer_turn(answer: str) -> str:
    return f"Think: Now I get the answer, it is {answer}.\n\nAct: answer({answer})"


FINISH_TURN = "Think: The task is done.\n\nAct: finish"


def _with_args(language: str, code: str, args: Sequence[str]) -> str:
    """``code`` run as AgentBench runs it (``bash -c code -- *args`` / ``python3 -c code *args``, in
    :data:`WORKDIR`):
    the sandbox's scripts take no arguments and start in the episode's working directory, so a prelude sets
    both and the code then runs unchanged."""
    clean = [a.replace("\0", "") for a in args]
    if language == "bash":
        prelude = f"cd {WORKDIR} || exit 1\n"
        if clean:
            prelude = "set -- " + " ".join(shlex.quote(a) for a in clean) + "\n" + prelude
        return prelude + code
    return (
        "import os as _os, sys as _sys\n"
        f"_sys.argv[:] = ['-c', *{clean!r}]\n"
        f"_os.chdir({WORKDIR!r})\n"
        "del _os, _sys\n"
        f"exec(compile({code!r}, '<string>', 'exec'))\n"
    )


# --------------------------------------------------------------------------------------------------------------
# The episode.


class OsEnvironment:
    """One episode's sandbox session (see the module docstring), with its init and start already run."""

    def __init__(self, item: EpisodeItem, *, limits: os_sandbox.Limits, timeout: float) -> None:
        self.item = item
        self.timeout = timeout
        self.session = os_sandbox.Session(privileged=True, limits=limits)
        try:
            cd = self.session.execute(f"cd {WORKDIR}", timeout=timeout)
            if not cd.ok:
                raise RuntimeError(f"the shell could not cd to {WORKDIR}: {cd.stderr.strip()}")
            inits = item.data["init"]
            for n, (language, code) in enumerate(inits, 1):
                r = self.run_init(language, code)
                if not r.ok:
                    why = "timed out" if r.timed_out else f"exit {r.returncode}"
                    raise RuntimeError(f"init script {n} of {len(inits)} failed ({why}): {_tail(r.stderr or r.stdout)}")
                if READ_ONLY in r.stderr:
                    # AgentBench only looks at the exit status, but a write the sandbox refused is not the task.
                    raise RuntimeError(
                        f"init script {n} of {len(inits)} writes where the sandbox is read-only: {_tail(r.stderr)}"
                    )
            if item.data["start"] is not None:
                # AgentBench sends the start script to the agent's terminal and ignores how it ends.
                r = self.session.execute(item.data["start"][1], timeout=timeout)
                if r.timed_out:
                    raise RuntimeError(f"the start script did not return in {timeout:g} s")
        except BaseException:
            self.session.close()
            raise

    def run_init(self, language: str, code: str) -> os_sandbox.Result:
        """An init script. A bash one writes its stderr to a file rather than to the pipe, so the processes it
        leaves in the background (``(sleep 60) &``) do not hold the pipe open: the script is done when it exits,
        as under ``docker exec``."""
        if language != "bash":
            return self.run_script(language, code)
        err = f"/tmp/.agentbench-init-{secrets.token_hex(4)}"  # noqa: S108 - the episode's own /tmp, a tmpfs
        r = self.run_script(language, f"exec </dev/null >/dev/null 2>{err}\n{code}")
        log = self.session.run_script(f"cat {err} 2>/dev/null; rm -f {err}", timeout=self.timeout)
        return os_sandbox.Result(r.returncode, r.stdout, log.stdout + r.stderr, r.timed_out, r.truncated)

    def run_script(self, language: str, code: str, *args: str) -> os_sandbox.Result:
        return self.session.run_script(_with_args(language, code, args), language=language, timeout=self.timeout)

    def step(self, action: Action) -> str:
        # One brace group, so stderr interleaves with stdout as on AgentBench's terminal; cd, variables and
        # background jobs still persist (no subshell).
        # (The leading ``:`` keeps an empty or comment-only turn valid bash: AgentBench runs it, output empty.)
        r = self.session.execute("{ :\n" + action.content + "\n} 2>&1", timeout=self.timeout)
        text = r.stdout + r.stderr
        if r.timed_out:
            text += f"\n[the command ran past {self.timeout:g} seconds and was interrupted]"
        return text

    def close(self) -> None:
        self.session.close()


def _tail(text: str, n: int = 300) -> str:
    text = " ".join(text.strip().split())
    return text if len(text) <= n else "..." + text[-n:]


class AgentBenchOsTask(EpisodeTask):
    """AgentBench's OS interaction as an episode skill (see the module docstring)."""

    def __init__(self, name: str, spec: AgentBenchOsSpec | None = None) -> None:
        super().__init__()
        spec = spec or AgentBenchOsSpec(kind="agentbench_os")
        self.name = name
        self.spec = spec
        self.root = Path(spec.path) if spec.path is not None else DATA_DIR
        self.max_turns = spec.max_turns
        self.max_new_tokens = spec.max_new_tokens
        self.observation_chars = spec.observation_chars
        self.workers = spec.workers
        self.timeout = spec.timeout
        self.limits = os_sandbox.Limits(wall_seconds=spec.timeout, cpu_seconds=max(1, math.ceil(spec.timeout)))
        self._all: list[EpisodeItem] | None = None
        self._excluded: dict[str, str] | None = None
        self._notes: dict[str, str] = {}
        self._notes_lock = threading.Lock()

    # -- data --------------------------------------------------------------------------------------------
    def all_items(self) -> list[EpisodeItem]:
        """Every task of the data directory, excluded ones too (what the gold control looks at)."""
        if self._all is None:
            self._all = read_tasks(self.root)
        return self._all

    def excluded(self) -> dict[str, str]:
        """Tasks left out of every split, with the reason: ``excluded.json`` of the data directory (the gold
        control's result, see :meth:`gold_control`) or, for a directory without one, :data:`KNOWN_BROKEN` and
        what :func:`static_reason` sees."""
        if self._excluded is None:
            out: dict[str, str] = {}
            path = self.root / EXCLUDED_FILE
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as exc:
                    raise EvaluatorError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
                listed = data.get("excluded") if isinstance(data, dict) else None
                if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
                    raise EvaluatorError(f"{path}: excluded: expected an object of task id -> reason")
                out.update(listed)
            else:
                for item in self.all_items():
                    why = KNOWN_BROKEN.get(item.id) or static_reason(item.data)
                    if why:
                        out[item.id] = why
            self._excluded = out
        return self._excluded

    def load_items(self) -> list[EpisodeItem]:
        excluded = self.excluded()
        return [item for item in self.all_items() if item.id not in excluded]

    def messages(self, item: EpisodeItem) -> list[Message]:
        first = {"role": "user", "content": PROMPT + "Now, my problem is:\n\n" + ONE_SHOT[0]["content"]}
        return [first, *(dict(m) for m in ONE_SHOT[1:]), {"role": "user", "content": NEW_PROBLEM + item.prompt}]

    def gold(self, item: EpisodeItem) -> list[str]:
        """The reference solution's first turn: the example script as ``Act: bash`` (the answer turn depends on
        what it prints in the episode; :meth:`gold_policy` adds it). No example: no gold turns."""
        example = item.data["example"]
        return [bash_turn(example[1], "I will solve it with a script.")] if example else []

    # -- the episode -------------------------------------------------------------------------------------
    def parse(self, item: EpisodeItem, reply: str) -> Action:
        try:
            ret = extract_action(reply)
        except Exception as exc:  # extract_action cannot fail on a string; a grader never raises all the same
            return Action("invalid", f"unreadable turn ({type(exc).__name__}: {exc})")
        if ret["action"] == "bash":
            return Action("act", ret["content"])
        if ret["action"] == "commit":
            return Action("finish") if ret["content"] is None else Action("answer", ret["content"])
        return Action(
            "invalid", "no action: a turn needs `Act: bash` (with a ```bash block), `Act: answer(...)` or `Act: finish`"
        )

    def observe(self, item: EpisodeItem, action: Action, observation: str) -> Message:
        """AgentBench's observation: ``The output of the OS:`` and the output, cut to 20 characters under the
        limit plus its truncation note when longer; ``The output of the OS is empty.`` when there is none."""
        limit = self.observation_chars
        if len(observation) > limit:
            observation = observation[: max(0, limit - 20)] + TRUNCATED
        return {"role": "user", "content": OUTPUT_PREFIX + observation if observation else EMPTY_OUTPUT}

    def open(self, item: EpisodeItem) -> OsEnvironment:
        os_sandbox.check_available(privileged=True)
        return OsEnvironment(item, limits=self.limits, timeout=self.timeout)

    def grade(self, item: EpisodeItem, env: Any, final: Action | None) -> float:
        ok, note = self.judge(item, env, final)
        with self._notes_lock:
            self._notes[item.id] = note
        return 1.0 if ok else 0.0

    def judge(self, item: EpisodeItem, env: OsEnvironment, final: Action | None) -> tuple[bool, str]:
        """AgentBench's verdict on the episode and why (the gold control's reasons)."""
        if final is None:
            return False, "no answer within the turn limit"
        if final.kind not in ("answer", "finish"):
            return False, f"the episode ended on an {final.kind} turn"
        answer: str | None = final.content if final.kind == "answer" else None
        cfg = item.data
        if cfg["match"] is not None:
            match = cfg["match"]
            if answer is not None and match.get("strip"):
                answer = answer.strip()
            if answer is None:
                return False, "finish without an answer, and the task expects one"
            if "answer" in match:
                return answer == match["answer"], f"answer {answer!r}, expected {match['answer']!r}"
            return re.search(match["regex"], answer) is not None, f"answer {answer!r}, regex {match['regex']!r}"
        params = [str(answer)]
        checks = cfg["check"]
        for n, script in enumerate(checks, 1):
            if script is None:
                script = cfg["example"]
            r = env.run_script(script[0], script[1], *params)
            if r.timed_out:  # what a killed check printed by then depends on the machine's load: not part of why
                return False, f"check {n} of {len(checks)} timed out"
            if not r.ok:
                return False, f"check {n} of {len(checks)} exited {r.returncode}: {_tail(r.stderr or r.stdout)}"
            params.append(r.stdout)
        return True, "every check passed"

    def note(self, item_id: str) -> str:
        """Why the last episode of ``item_id`` scored as it did (the judge's words, or the episode's error)."""
        with self._notes_lock:
            return self._notes.get(item_id, "")

    # -- gold --------------------------------------------------------------------------------------------
    def gold_policy(self, items: Sequence[EpisodeItem]) -> Policy:
        """The gold turns of each item, then the answer: for a ``match`` task its expected answer (what the gold
        control accepts; some examples do not run here), else the one read from the last observation,
        ``Act: answer(...)`` with what the example printed (stripped), or ``Act: finish`` when it printed nothing."""
        scripts = [self.gold(i) for i in items]
        expected = [
            answer_turn(str(i.data["match"]["answer"])) if (i.data["match"] or {}).get("answer") is not None else None
            for i in items
        ]

        def policy(indices: Sequence[int], conversations: Sequence[Sequence[Message]]) -> list[str]:
            out = []
            for i, conv in zip(indices, conversations, strict=True):
                turn, script = agent_turn(conv), scripts[i]
                if turn < len(script):
                    out.append(script[turn])
                elif turn == len(script) and expected[i] is not None:
                    out.append(expected[i])  # type: ignore[arg-type]
                elif turn == len(script) and script:
                    out.append(answer_from(conv[-1]["content"]))
                else:
                    out.append("")
            return out

        return policy

    def gold_control(self, items: Sequence[EpisodeItem] | None = None) -> tuple[list[str], dict[str, str]]:
        """Which tasks the sandbox can run as AgentBench does: ``(passed ids, {excluded id: reason})``.

        A check task passes when its example solution, run as a gold trajectory (see :meth:`gold_policy`),
        scores 1; a match task when its environment builds and the expected answer scores 1 (the example, when
        it has one, only makes its gold trajectory). A task :func:`static_reason` rules out is not run. Over
        ``items`` (default: every task, excluded ones too); what ``excluded.json`` holds. The tasks of
        :data:`KNOWN_BROKEN` are not run: their examples fail, or pass by chance, for reasons found by reading them
        (most fail in AgentBench's own container too)."""
        items = list(self.all_items() if items is None else items)
        reasons: dict[str, str] = {}
        runnable: list[EpisodeItem] = []
        for item in items:
            why = KNOWN_BROKEN.get(item.id) or static_reason(item.data)
            if why:
                reasons[item.id] = why
            elif item.data["check"] is not None and item.data["example"] is None:
                reasons[item.id] = "a check task without an example solution to verify it with"
            elif item.data["match"] is not None and "answer" not in item.data["match"]:
                reasons[item.id] = "a regex match task without an answer to verify it with"
            else:
                runnable.append(item)
        checks = [i for i in runnable if i.data["check"] is not None]
        matches = [i for i in runnable if i.data["match"] is not None]
        transcripts: list[Transcript] = []
        if checks:
            transcripts += self.run(checks, self.gold_policy(checks))
        if matches:
            answers = [[f"Act: answer({i.data['match']['answer']})"] for i in matches]
            transcripts += self.replay(matches, answers)
        passed = []
        for t in transcripts:
            if t.score >= 1.0:
                passed.append(t.item_id)
            else:
                reasons[t.item_id] = self._failure(t)
        order = {item.id: n for n, item in enumerate(items)}
        passed.sort(key=order.__getitem__)
        return passed, dict(sorted(reasons.items(), key=lambda kv: order[kv[0]]))

    def _failure(self, t: Transcript) -> str:
        observed, note = _observed(t), self.note(t.item_id)
        for text in (t.error, observed, note):
            if READ_ONLY in text:
                m = re.search(r"(/usr[^\s:'\"‘’]*)", text)
                what = f"writes {m.group(1)}" if m else "writes under /usr"
                return f"{what}: the sandbox binds the host's /usr read-only (AgentBench's container has its own)"
        if t.status == "error":
            return f"the environment does not build here: {t.error.removeprefix('environment: RuntimeError: ')}"
        if TRUNCATED in t.messages[-2]["content"] if len(t.messages) > 1 else False:
            return f"the example's output is longer than the observation the agent is shown ({note})"
        if t.status == "invalid":
            return f"the gold answer turn does not parse ({t.error})"
        return f"the example solution fails here: {note or t.error}"

    def write_excluded(self, path: Path | None = None) -> dict[str, str]:
        """Run the gold control over every task and write ``excluded.json`` (default: in the data directory)."""
        passed, reasons = self.gold_control()
        path = path or self.root / EXCLUDED_FILE
        doc = {
            "about": "AgentBench OS tasks left out of every split, with the reason: the gold control of "
            "evolve.evaluators.agentbench_os (AgentBenchOsTask.gold_control); regenerate with "
            "`python -m evolve.evaluators.agentbench_os --write-excluded`",
            "passed": len(passed),
            "total": len(passed) + len(reasons),
            "excluded": reasons,
        }
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self._excluded = None
        self._pools = None
        return reasons

    def split_counts(self) -> dict[str, int]:
        return {s: self.split_size(s) for s in SPLITS}


def _observed(t: Transcript) -> str:
    """The last observation of a transcript, without AgentBench's prefix."""
    for m in reversed(t.messages):
        if m["role"] == "user":
            return m["content"].removeprefix(OUTPUT_PREFIX) if m["content"].startswith(OUTPUT_PREFIX) else ""
    return ""


def answer_from(observation: str) -> str:
    """The answer turn a perfect agent gives after the example ran: the last line it printed (the lines before
    it are the shell's messages on stderr, or an answer that would not fit ``answer(...)`` anyway), or
    ``finish`` if it printed nothing."""
    if not observation.startswith(OUTPUT_PREFIX):
        return FINISH_TURN
    lines = [ln.strip() for ln in observation.removeprefix(OUTPUT_PREFIX).strip().splitlines() if ln.strip()]
    return answer_turn(lines[-1]) if lines else FINISH_TURN


def agent_turn(conversation: Sequence[Message]) -> int:
    """How many turns the agent has taken in the episode (the one-shot example's turns are not its own)."""
    return sum(1 for m in conversation if m["role"] == "assistant") - sum(
        1 for m in ONE_SHOT if m["role"] == "assistant"
    )


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="AgentBench OS tasks: the gold control")
    parser.add_argument("--path", type=Path, default=None, help="an AgentBench os_interaction directory")
    parser.add_argument("--write-excluded", action="store_true", help="write excluded.json from the gold control")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    task = AgentBenchOsTask("os", AgentBenchOsSpec(kind="agentbench_os", path=args.path, workers=args.workers))
    if args.write_excluded:
        reasons = task.write_excluded()
        total = len(task.all_items())
    else:
        passed, reasons = task.gold_control()
        total = len(passed) + len(reasons)
    for item_id, why in reasons.items():
        print(f"{item_id}: {why}")
    print(f"usable {total - len(reasons)} of {total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
