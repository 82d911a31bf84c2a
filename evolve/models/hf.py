"""Any Hugging Face causal LM directory: checked before anything is computed, then loaded with ``transformers``.

A population (a base and one expert per skill) is ordinary HF directories: ``config.json``, safetensors weights
(one file or shards with ``model.safetensors.index.json``), tokenizer files, in any dtype, tied or untied head,
any architecture ``AutoModelForCausalLM`` knows. Checks read only headers and JSON, so a mismatch is refused in
seconds, naming the file and what differs, before minutes of loading and SVD:

- a missing directory, config or tokenizer; a missing or corrupt shard (its header is read, never guessed);
- a pickle-only checkpoint (``pytorch_model.bin``, ``*.pt``): refused and never unpickled, since unpickling runs
  arbitrary code;
- experts whose architecture, tensor names, shapes or vocabulary differ from the base's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from cycleqd.atomic import recover
from cycleqd.errors import UserError

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
#: Config keys that may differ between a base and its fine-tuned experts without changing what the weights mean.
VOLATILE_CONFIG = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "architectures",
    "quantization_config",
    "_attn_implementation_autoset",
}


class ModelError(UserError):
    """A model directory that is missing, incomplete, unsafe or does not match; the message names the file."""


@dataclass(frozen=True)
class ModelInfo:
    """What a directory holds, read from its headers: enough to compare models without loading them."""

    path: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, over every shard
    dtypes: set[str]
    files: tuple[Path, ...]

    def n_params(self) -> int:
        n = 0
        for shape in self.shapes.values():
            k = 1
            for d in shape:
                k *= d
            n += k
        return n


def resolve_dtype(dtype: DType | str, info: ModelInfo | None = None) -> torch.dtype:
    """``auto`` is the checkpoint's own dtype (the first one its headers name); float32 when unknown."""
    if dtype == "auto":
        found = sorted(info.dtypes) if info else []
        dtype = (
            {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(found[0], "float32") if found else "float32"
        )
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype)]
    except KeyError:
        raise ModelError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16") from None


def resolve_device(device: Device | str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but torch sees no GPU here; use device: cpu or auto")
    return torch.device(str(device))


def weight_files(path: Path) -> tuple[Path, ...]:
    """The safetensors files of a model directory (every shard named by the index), each checked to exist."""
    path = Path(path)
    if not path.is_dir():  # a save killed between its two renames left the old directory aside: put it back
        with contextlib.suppress(OSError):
            recover(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model directory")
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ModelError(f"{path / INDEX}: corrupt shard index ({exc})") from exc
        files = tuple(path / n for n in names)
        for f in files:
            if not f.is_file():
                raise ModelError(f"{f}: missing shard named by {path / INDEX}; copy the whole model directory")
        return files
    if (path / SINGLE).is_file():
        return (path / SINGLE,)
    pickles = [p for p in PICKLES if (path / p).exists()] + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise ModelError(
            f"{path / pickles[0]}: a pickle checkpoint; it is never unpickled (that can run arbitrary code). "
            "Convert it to safetensors where you trust it, e.g. `model.save_pretrained(dir, safe_serialization=True)`"
        )
    raise ModelError(f"{path / SINGLE}: missing; the directory has no safetensors weights")


def inspect_model(path: Path) -> ModelInfo:
    """Read a directory's config and every shard's header (no tensor data); refuse what cannot load."""
    path = Path(path)
    files = weight_files(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: missing; not a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{cfg_path}: unreadable, not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{cfg_path}: no 'model_type'; not a transformers model config")
    if not any((path / t).is_file() for t in TOKENIZER_FILES):
        raise ModelError(f"{path / 'tokenizer.json'}: missing; the model directory has no tokenizer")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[str] = set()
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    shapes[k] = tuple(sl.get_shape())
                    dtypes.add(sl.get_dtype())
        except (OSError, SafetensorError) as exc:
            raise ModelError(f"{f}: corrupt or truncated safetensors file ({exc})") from exc
    return ModelInfo(path, config, shapes, dtypes, files)


def tokenizer_fingerprint(path: Path) -> str:
    """A hash of what decides token ids: the vocabulary and merges, not the chat template or padding side."""
    path = Path(path)
    tj = path / "tokenizer.json"
    h = hashlib.sha256()
    if tj.is_file():
        try:
            model = json.loads(tj.read_text()).get("model", {})
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{tj}: unreadable, not valid JSON ({exc})") from exc
        h.update(json.dumps([model.get("vocab"), model.get("merges")], sort_keys=True).encode())
    else:
        for name in TOKENIZER_FILES[1:]:
            if (path / name).is_file():
                h.update((path / name).read_bytes())
    return h.hexdigest()


def check_population(base: Path, experts: Mapping[str, Path]) -> dict[str, ModelInfo]:
    """Inspect the base and every expert; refuse experts that are not fine-tunes of the base (same architecture,
    tensor names and shapes, vocabulary). Returns the infos keyed ``base`` and by skill."""
    infos = {"base": inspect_model(base)}
    b = infos["base"]
    b_cfg = {k: v for k, v in b.config.items() if k not in VOLATILE_CONFIG}
    b_tok = tokenizer_fingerprint(base)
    for skill, path in experts.items():
        e = inspect_model(path)
        cfg = {k: v for k, v in e.config.items() if k not in VOLATILE_CONFIG}
        diff = sorted(k for k in set(cfg) | set(b_cfg) if cfg.get(k) != b_cfg.get(k))
        if diff:
            k = diff[0]
            raise ModelError(
                f"{Path(path) / 'config.json'}: expert {skill!r} differs from the base in {k!r} "
                f"({e.config.get(k)!r} vs {b.config.get(k)!r}); experts must be fine-tunes of the base"
            )
        if e.shapes.keys() != b.shapes.keys():
            extra = sorted(e.shapes.keys() - b.shapes.keys())
            missing = sorted(b.shapes.keys() - e.shapes.keys())
            what = f"has {extra[0]!r} that the base lacks" if extra else f"lacks the base's {missing[0]!r}"
            raise ModelError(f"{e.files[0]}: expert {skill!r} {what}")
        for k, shape in b.shapes.items():
            if e.shapes[k] != shape:
                raise ModelError(f"{e.files[0]}: expert {skill!r} tensor {k!r} has shape {e.shapes[k]}, base {shape}")
        if tokenizer_fingerprint(path) != b_tok:
            raise ModelError(
                f"{Path(path) / 'tokenizer.json'}: expert {skill!r} has another vocabulary than the base's; "
                "experts must share the base's tokenizer"
            )
        infos[skill] = e
    return infos


def load_hf(path: Path, *, dtype: DType | str = "float32", device: Device | str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of any HF causal LM directory, checked first (see :func:`inspect_model`).

    The tokenizer pads on the left (decoder-only batched generation) and gets a pad token (its EOS) when it has
    none, so batching works for every tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = inspect_model(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers raise their own exception types
        raise ModelError(f"{Path(path) / 'tokenizer.json'}: unreadable ({exc})") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype, info), use_safetensors=True, low_cpu_mem_usage=True
        )
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"{info.files[0]}: corrupt or does not match {Path(path) / 'config.json'} ({exc})") from exc
    return model.to(resolve_device(device)).eval(), tokenizer


def parameter_order(path: Path) -> list[str]:
    """The model's parameter names in its own order (tied weights once), from its config alone (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_parameters()]


@dataclass(frozen=True)
class EmbeddingRoles:
    """Module names of a model's token embedding and output head, found through its own accessors."""

    input: str  # e.g. model.embed_tokens
    output: str | None  # e.g. lm_head
    tied: bool


def embedding_roles(path: Path) -> EmbeddingRoles:
    """From the config alone (a model on the meta device): which modules are the embedding and the head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    return EmbeddingRoles(names[id(emb)], names[id(head)] if head is not None else None, tied)
