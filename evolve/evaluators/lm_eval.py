"""``lm_eval`` skills: an lm-evaluation-harness task scored in-process on our engine, fully offline.

The task is a YAML file with local data (``dataset_path: json``, ``dataset_kwargs: {data_files: ...}``) found
through ``include_path``; lm-eval's own task index is left out unless ``builtin_tasks`` (its tasks download
their data). A child is scored without starting a server: :class:`EngineLM` is an lm-eval ``LM`` over any
engine with ``generate`` (``generate_until``), and over the transformers engine's model also
``loglikelihood`` (multiple-choice tasks); lm-eval's ``evaluate`` then runs the task's own prompts, filters and
metrics, and its logged samples give the per-item scores that behaviour bins need.

A ``!function`` metric (a Python function next to the YAML) is read under the function's name, as lm-eval logs
it. A task marked ``unsafe_code`` is refused when the skill is built: lm-eval's code-executing metrics
(``code_eval``) run the model's programs inside this process, unsandboxed; the ``humaneval`` kind and the ``jsonl``
``python`` grader run them in a sandbox instead.

Splits: the task's evaluation documents (its test split, else validation) are divided among our held-out
splits by a stable hash of each document (calibration .25, validation .375, test .375: the world's .1/.15/.15
renormalised); ``train`` is the task's training documents when it has them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from typing import Any

from evolve.evaluators.base import Evaluator, EvaluatorError, Generator, Split, TaskResult, check_split
from evolve.evaluators.specs import LmEvalSpec

HELD_OUT: tuple[tuple[Split, float], ...] = (("calibration", 0.25), ("validation", 0.375), ("test", 0.375))


def held_out_split(key: str) -> Split:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    edge = 0.0
    for split, frac in HELD_OUT:
        edge += frac
        if h < edge:
            return split
    return HELD_OUT[-1][0]


def _doc_key(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, default=str)


def _lm_base() -> type:
    from lm_eval.api.model import LM

    return LM


class EngineLM(_lm_base()):  # type: ignore[misc]
    """lm-eval's ``LM`` interface over one of our engines (whatever weights it holds right now)."""

    def __init__(self, engine: Generator, *, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.engine = engine
        self.max_gen_toks = max_gen_toks

    # -- generation: any engine --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, req in enumerate(requests):
            _, kw = req.args
            until = kw.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            groups.setdefault((until, int(kw.get("max_gen_toks", self.max_gen_toks))), []).append(i)
        for (until, max_toks), idx in groups.items():
            texts = self.engine.generate([requests[i].args[0] for i in idx], max_new_tokens=max_toks)
            for i, text in zip(idx, texts, strict=True):
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[i] = text
        return out

    # -- log-likelihood: engines that expose their model ---------------------------------------------------------
    def _model(self) -> tuple[Any, Any]:
        if hasattr(self.engine, "loglikelihood"):
            return None, None
        model, tok = getattr(self.engine, "model", None), getattr(self.engine, "tokenizer", None)
        if model is None or tok is None:
            raise NotImplementedError(
                f"{type(self.engine).__name__} gives no log-likelihoods; score this task with the transformers "
                "engine, or choose a generate_until task"
            )
        return model, tok

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        model, tok = self._model()
        if model is None:
            return list(self.engine.loglikelihood([r.args for r in requests]))  # type: ignore[attr-defined]
        return [self._score(model, tok, *r.args) for r in requests]

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        model, tok = self._model()
        if model is None:
            raise NotImplementedError(f"{type(self.engine).__name__} gives no rolling log-likelihoods")
        return [self._score(model, tok, "", r.args[0])[0] for r in requests]

    @staticmethod
    def _score(model: Any, tok: Any, context: str, continuation: str) -> tuple[float, bool]:
        """Like lm-eval's HFLM: trailing spaces of the context move to the continuation; the continuation's
        tokens are the whole text's tokens after the context's."""
        import torch

        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = tok(context + continuation)["input_ids"]
        ctx = tok(context)["input_ids"] if context else [tok.bos_token_id or tok.eos_token_id]
        if not context:
            whole = ctx + whole
        cont = whole[len(ctx) :]
        limit = model.config.max_position_embeddings
        ids = torch.tensor([whole[-limit:]])
        with torch.no_grad():
            logits = model(ids).logits[0].float().log_softmax(-1)
        n = len(cont)
        pred = logits[-n - 1 : -1]
        target = torch.tensor(cont)
        lp = pred.gather(1, target[:, None]).sum().item()
        return float(lp), bool((pred.argmax(-1) == target).all())


class LmEvalEvaluator(Evaluator):
    def __init__(self, name: str, spec: LmEvalSpec) -> None:
        self.name = name
        self.spec = spec
        field = f"skills.{name}.task"
        for logger in ("lm_eval", "lm-eval"):
            logging.getLogger(logger).setLevel(logging.WARNING)
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as exc:
            raise EvaluatorError(f"{field}: lm_eval skills need lm-eval: pip install 'cycleqd-serve[harness]'") from exc
        tm = TaskManager(include_path=str(spec.include_path) if spec.include_path else None,
                         include_defaults=spec.builtin_tasks)  # fmt: skip
        if spec.task not in tm.all_tasks:
            where = f"include_path {spec.include_path}" if spec.include_path else "no include_path"
            known = ", ".join(tm.all_subtasks[:20]) or "none"
            raise EvaluatorError(f"{field}: no lm-eval task {spec.task!r} ({where}; tasks found: {known})")
        try:
            loaded = tm.load([spec.task])
        except Exception as exc:
            raise EvaluatorError(
                f"{field}: lm-eval cannot load task {spec.task!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if len(loaded["tasks"]) != 1:
            raise EvaluatorError(f"{field}: {spec.task!r} is a group of {len(loaded['tasks'])} tasks; name one task")
        self.task_dict = loaded
        ((self.task_name, self.task),) = loaded["tasks"].items()
        if getattr(self.task, "UNSAFE_CODE", False) or getattr(self.task.config, "unsafe_code", False):
            raise EvaluatorError(
                f"{field}: lm-eval task {spec.task!r} is marked unsafe_code: its metric executes the model's code, "
                "and lm-eval's code metrics (code_eval) run it inside this process, without a sandbox, so it is "
                "refused; score code with the humaneval skill kind or a jsonl skill with grader: python "
                "(sandbox: os runs whole programs in the OS sandbox)"
            )
        docs = list(self.task.eval_docs)
        self.docs = docs
        self.doc_splits: dict[str, list[int]] = {s: [] for s, _ in HELD_OUT}
        for i, doc in enumerate(docs):
            self.doc_splits[held_out_split(_doc_key(doc))].append(i)
        # A `!function` metric is the function itself in the config; lm-eval names its score by the function's name
        configured = [m["metric"] for m in self.task.config.metric_list or []]
        metrics = [_metric_name(m) for m in configured]
        self.metric = spec.metric or (metrics[0] if metrics else None)
        # (a function may return a dict of scores: their keys are only known once it has run)
        if spec.metric and metrics and spec.metric not in metrics and all(isinstance(m, str) for m in configured):
            raise EvaluatorError(f"skills.{name}.metric: task {spec.task!r} has no metric {spec.metric!r} ({metrics})")
        self._gen_kwargs = self.task.config.generation_kwargs or {}

    def _sample_metric(self, sample: dict[str, Any]) -> str:
        """The metric to read from a logged sample: the configured one, else the task's first; a ``!function``
        metric returning a dict gives its keys instead of its name, so then the sample's first."""
        names = list(sample.get("metrics") or [])
        if self.metric in names or not names:
            return self.metric  # type: ignore[return-value]
        if self.spec.metric:
            raise EvaluatorError(
                f"skills.{self.name}.metric: task {self.spec.task!r} scores its items by {names}, not {self.metric!r}"
            )
        return names[0]

    def _indices(self, split: Split, n: int, seed: int) -> list[int]:
        if check_split(split) == "train":
            raise EvaluatorError(f"skill {self.name!r}: lm_eval skills are scored on held-out splits, not train")
        pool = self.doc_splits[split]
        if not pool:
            raise EvaluatorError(
                f"skill {self.name!r}: task {self.spec.task!r} has no document in the {split} split "
                f"({len(self.docs)} documents in all); give the task more documents"
            )
        if n >= len(pool):
            return list(pool)
        return sorted(random.Random(f"{self.name}:{split}:{seed}").sample(pool, n))

    def exemplars(self, split: Split, n: int, *, seed: int = 0) -> list[str]:
        if split == "train":
            docs = list(self.task.training_docs()) if self.task.has_training_docs() else []
            if not docs:  # no training documents: calibration prompts (the classifier never tests on them)
                docs = [self.docs[i] for i in self.doc_splits["calibration"]]
            docs = docs[:n]
        else:
            docs = [self.docs[i] for i in self._indices(split, n, seed)] if self.doc_splits.get(split) else []
        texts = []
        for doc in docs:
            text = self.task.doc_to_text(doc)
            texts.append(text if isinstance(text, str) else str(text))
        return texts

    def evaluate(self, engine: Generator, split: Split, limit: int, *, seed: int = 0) -> TaskResult:
        from lm_eval.evaluator import evaluate

        idx = self._indices(split, limit, seed)
        lm = EngineLM(engine)
        quiet = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # lm-eval draws a progress bar per call: one per child scored
        try:
            res = evaluate(lm, self.task_dict, samples={self.task_name: idx}, bootstrap_iters=0, log_samples=True)
        finally:
            if quiet is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = quiet
        samples = res["samples"][self.task_name]
        first_filter = samples[0]["filter"] if samples else None
        by_doc = {s["doc_id"]: s for s in samples if s["filter"] == first_filter}
        metric = self._sample_metric(samples[0]) if samples else self.metric
        scores = [float(by_doc[i][metric]) for i in idx]
        answers = [_first_response(by_doc[i]) for i in idx]
        return TaskResult(self.name, split, scores, answers)


def _metric_name(metric: Any) -> str:
    """A ``metric_list`` entry's name: a string as written, a ``!function`` metric by its function's name."""
    if isinstance(metric, str):
        return metric
    return getattr(metric, "__name__", None) or str(metric)


def _first_response(sample: dict[str, Any]) -> str:
    resp: Sequence[Any] = sample.get("filtered_resps") or []
    first = resp[0] if resp else ""
    return first if isinstance(first, str) else json.dumps(first, default=str)
