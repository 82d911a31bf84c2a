"""The ``code`` skill: a natural-language spec -> a Python lambda, graded by running it in the sandbox.

Mirrors the paper's coding task (MBPP-like) at a size a laptop-trained model can learn: one-argument
functions over an integer ``x`` or a list ``xs``, from single operations (level 1) to compositions and
comprehensions (level 3). An answer may be a ``lambda``, a ``def`` or a bare expression over the argument;
it scores 1 when it returns the gold function's value on every test input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from evolve.evaluators import sandbox
from evolve.evaluators.base import Item, SkillTask, Template, first_line

INT_INPUTS: tuple[tuple, ...] = ((-7,), (0,), (3,), (12,), (25,), (58,), (99,))
LIST_INPUTS: tuple[tuple, ...] = (([],), ([4, 9, 2],), ([1, 2, 3, 4, 5, 6],), ([12, 5, 30, 5, 7],), ([-3, 8, 0, 21],))

# name -> (level, argument, gold body with {a} {b}, phrasings)
SPECS: dict[str, tuple[int, str, str, tuple[str, ...]]] = {
    "add": (1, "x", "x + {a}", ("Write a function that adds {a} to x.", "Return x plus {a}.")),
    "sub": (1, "x", "x - {a}", ("Write a function that subtracts {a} from x.", "Return x minus {a}.")),
    "mul": (1, "x", "x * {a}", ("Write a function that multiplies x by {a}.", "Return x times {a}.")),
    "mod": (1, "x", "x % {a}", ("Write a function that returns x modulo {a}.", "Return the remainder of x divided by {a}.")),
    "div": (1, "x", "x // {a}", ("Write a function that returns x integer-divided by {a}.", "Return x floor-divided by {a}.")),
    "max": (1, "x", "max(x, {a})", ("Write a function that returns the larger of x and {a}.", "Return the maximum of x and {a}.")),
    "add_mul": (2, "x", "(x + {a}) * {b}", ("Write a function that adds {a} to x and then multiplies by {b}.", "Return x plus {a}, all times {b}.")),
    "mul_add": (2, "x", "x * {a} + {b}", ("Write a function that multiplies x by {a} and then adds {b}.", "Return x times {a} plus {b}.")),
    "keep_gt": (2, "xs", "[v for v in xs if v > {a}]", ("Write a function that keeps the items of the list xs greater than {a}.", "Return the elements of xs that are above {a}.")),
    "map_add": (2, "xs", "[v + {a} for v in xs]", ("Write a function that adds {a} to every item of the list xs.", "Return xs with {a} added to each element.")),
    "count_eq": (2, "xs", "xs.count({a})", ("Write a function that counts how often {a} occurs in the list xs.", "Return the number of times {a} appears in xs.")),
    "add_mod": (2, "x", "(x + {a}) % {b}", ("Write a function that adds {a} to x and returns the result modulo {b}.", "Return x plus {a}, modulo {b}.")),
    "sub_mul": (2, "x", "(x - {a}) * {b}", ("Write a function that subtracts {a} from x and then multiplies by {b}.", "Return x minus {a}, all times {b}.")),
    "count_gt": (2, "xs", "len([v for v in xs if v > {a}])", ("Write a function that counts the items of the list xs greater than {a}.", "Return how many elements of xs are above {a}.")),
    "affine_map": (3, "xs", "[v * {b} + {a} for v in xs]", ("Write a function that multiplies every item of the list xs by {b} and adds {a}.", "Return xs with each element times {b} plus {a}.")),
    "range_keep": (3, "xs", "[v for v in xs if {b} < v < {a}]", ("Write a function that keeps the items of the list xs between {b} and {a}, exclusive.", "Return the elements of xs strictly between {b} and {a}.")),
    "sum_gt": (3, "xs", "sum(v for v in xs if v > {a})", ("Write a function that sums the items of the list xs greater than {a}.", "Return the total of the elements of xs above {a}.")),
    "map_mul_even": (3, "xs", "[v * {a} for v in xs if v % 2 == 0]", ("Write a function that multiplies each even item of the list xs by {a} and drops the others.", "Return the even elements of xs, each times {a}.")),
    "clip": (3, "x", "{a} if x > {a} else x + {b}", ("Write a function that returns {a} when x is above {a} and x plus {b} otherwise.", "Return {a} if x exceeds {a}, else x plus {b}.")),
}  # fmt: skip


class CodeTask(SkillTask):
    name = "code"

    def __init__(self, *, limits: sandbox.Limits | None = None) -> None:
        super().__init__()
        self.limits = limits or sandbox.Limits()

    def templates(self) -> Sequence[Template]:
        return [Template(name, level, phrasings) for name, (level, _, _, phrasings) in SPECS.items()]

    def parameter_space(self, template: Template) -> Iterator[tuple]:
        body = SPECS[template.name][2]
        for a in range(2, 41):
            if "{b}" in body:
                for b in range(2, 10):
                    yield (a, b)
            else:
                yield (a,)

    def render(self, template: Template, params: tuple, phrasing: str) -> tuple[str, str]:
        _, arg, body, _ = SPECS[template.name]
        fields = dict(zip("ab", params, strict=False))
        return phrasing.format(**fields), f"lambda {arg}: " + body.format(**fields)

    def grade(self, items: Sequence[Item], answers: Sequence[str]) -> list[float]:
        jobs, expected = [], []
        for item, answer in zip(items, answers, strict=True):
            arg = SPECS[item.template][1]
            calls = INT_INPUTS if arg == "x" else LIST_INPUTS
            # The gold answer is our own code: evaluating it in-process is safe and saves a sandbox round trip.
            gold = eval(item.answer)  # noqa: S307
            expected.append(tuple(repr(gold(*c)) for c in calls))
            try:
                code = extract_code(answer)
            except Exception:  # a grader never raises: an answer we cannot even read scores zero in the sandbox
                code = ""
            jobs.append(sandbox.Job(code, (arg,), calls))
        outcomes = sandbox.run(jobs, self.limits)
        return [float(o.ok and o.outputs == e) for o, e in zip(outcomes, expected, strict=True)]


def extract_code(answer: str) -> str:
    """The answer's code: its first line, plus the indented body when that line starts a ``def``.

    The ``def`` line is found the way :func:`first_line` reads lines (fences, backticks and an echoed
    ``Answer:`` stripped), so ``Answer: def f(x): return x`` is the one-line function it looks like.
    """
    head = first_line(answer)
    if not head.startswith("def "):
        return head
    lines = answer.splitlines()
    start = next((i for i, ln in enumerate(lines) if first_line(ln) == head), None)
    if start is None:
        return head
    body = [head]
    for ln in lines[start + 1 :]:
        if ln.strip().startswith("```") or (ln.strip() and not ln[:1].isspace() and not ln.startswith("def ")):
            break
        body.append(ln.rstrip())
    return "\n".join(body).strip()
