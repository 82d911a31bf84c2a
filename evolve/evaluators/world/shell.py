"""The ``os`` skill: a request -> a shell command line, graded by running it in the simulated shell.

Mirrors the paper's OS-interaction task (AgentBench OS) with a read-only file system: an answer scores 1
when its standard output and exit status equal the gold command's, so ``grep -c w f`` and
``grep w f | wc -l`` are both right. Nothing here ever reaches a real shell.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from evolve.evaluators.base import Item, SkillTask, Template, first_line
from evolve.evaluators.world.simshell import DIRS, FILES, WORDS, Shell

# name -> (level, gold command, phrasings)
SPECS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "cat": (1, "cat {f}", ("Show the contents of {f}.", "Print the file {f}.")),
    "wc": (1, "wc -l {f}", ("Count the lines in {f}.", "How many lines does {f} have?")),
    "ls": (1, "ls {d}", ("List the files in {d}.", "What is in the directory {d}?")),
    "head": (1, "head -n {n} {f}", ("Show the first {n} lines of {f}.", "Print the top {n} lines of {f}.")),
    "tail": (1, "tail -n {n} {f}", ("Show the last {n} lines of {f}.", "Print the bottom {n} lines of {f}.")),
    "sort": (1, "sort {f}", ("Sort the lines of {f}.", "Print {f} in sorted order.")),
    "grep": (2, "grep {w} {f}", ("Show the lines of {f} that contain {w}.", "Which lines of {f} mention {w}?")),
    "grep_c": (2, "grep -c {w} {f}", ("Count the lines of {f} that contain {w}.", "How many lines of {f} mention {w}?")),
    "grep_v": (2, "grep -v {w} {f}", ("Show the lines of {f} that do not contain {w}.", "Print the lines of {f} without {w}.")),
    "find": (2, "find {d} -name '*.{e}'", ("Find the files under {d} whose names end in .{e}.", "List every .{e} file below {d}.")),
    "sort_r": (2, "sort -r {f}", ("Sort the lines of {f} in reverse order.", "Print {f} sorted backwards.")),
    "uniq": (3, "sort {f} | uniq", ("Show the distinct lines of {f}, sorted.", "Print each different line of {f} once, in order.")),
    "grep_sort": (3, "grep {w} {f} | sort", ("Show the lines of {f} that contain {w}, sorted.", "Sort the lines of {f} that mention {w}.")),
    "grep_head": (3, "grep {w} {f} | head -n {n}", ("Show the first {n} lines of {f} that contain {w}.", "Print the top {n} lines of {f} mentioning {w}.")),
    "distinct": (3, "sort {f} | uniq | wc -l", ("How many distinct lines does {f} have?", "Count the different lines of {f}.")),
}  # fmt: skip
EXTENSIONS = ("txt", "log", "csv", "conf", "md")


class ShellTask(SkillTask):
    name = "os"

    def __init__(self) -> None:
        super().__init__()
        self.shell = Shell()

    def templates(self) -> Sequence[Template]:
        return [Template(name, level, phrasings) for name, (level, _, phrasings) in SPECS.items()]

    def parameter_space(self, template: Template) -> Iterator[tuple]:
        gold = SPECS[template.name][1]
        if "{d}" in gold:
            for d in DIRS:
                for e in EXTENSIONS if "{e}" in gold else ("",):
                    if self._nonempty(template, (d, e)):
                        yield (d, e)
            return
        for f in FILES:
            for w in WORDS if "{w}" in gold else ("",):
                for n in range(1, 10) if "{n}" in gold else (0,):
                    if self._nonempty(template, (f, w, n)):
                        yield (f, w, n)

    def _nonempty(self, template: Template, params: tuple) -> bool:
        """Keep only parameters whose gold command prints something, so an empty answer never scores."""
        _, gold = self.render(template, params, "")
        result = self.shell.run(gold)
        if template.name == "grep_v" and self.shell.run(gold.replace("-v ", "")).status != 0:
            return False  # the word must occur, or the answer is just the whole file
        return result.status == 0 and bool(result.stdout.strip()) and result.stdout.strip() != "0"

    def render(self, template: Template, params: tuple, phrasing: str) -> tuple[str, str]:
        gold = SPECS[template.name][1]
        if "{d}" in gold:
            fields = dict(zip("de", params, strict=True))
        else:
            fields = dict(zip("fwn", params, strict=True))
        return phrasing.format(**fields), gold.format(**fields)

    def grade(self, items: Sequence[Item], answers: Sequence[str]) -> list[float]:
        scores = []
        for item, answer in zip(items, answers, strict=True):
            want = self.shell.run(item.answer)
            try:
                got = self.shell.run(first_line(answer))
            except Exception:  # a grader never raises: whatever the simulated shell trips over scores zero
                scores.append(0.0)
                continue
            scores.append(float(got.status == want.status and _normal(got.stdout) == _normal(want.stdout)))
        return scores


def _normal(text: str) -> list[str]:
    """Lenient about spacing (``wc`` padding, trailing blanks), strict about every character that matters."""
    return [" ".join(line.split()) for line in text.strip("\n").split("\n")]
