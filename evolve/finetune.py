"""``cycleqd-evolve finetune``: an expert fine-tuned from any Hugging Face base on a skill's train split.

The bootstrap recipe (see evolve/bootstrap.py), generalised to real models: a short, low-learning-rate
fine-tune of the base on its skill with ``replay`` of the other skills, so the task vector stays small and
mostly touches its own skill (what makes experts mergeable). Several ``--skill`` give the multi-task baseline
(equal mixture, no replay). ``mode: lora`` trains LoRA adapters on every linear layer and merges them into the
weights, so the expert is an ordinary full model either way. Prompts go through the tokenizer's chat template
for chat models (``prompt_format: auto``); the embedded tiny models keep their raw ``prompt + "\\nAnswer:"``.

Training is checkpointed every ``checkpoint_every`` steps to ``.<out>.ckpt/`` next to the output (safetensors:
trainable weights, optimizer moments, RNG state); rerunning the same command resumes from it exactly. The
expert is written atomically with ``cycleqd.json`` (role, skill, base, config, loss, tokens/s). An output is
reused only when retraining would give the same model: its ``cycleqd.json`` must record the same config hash,
``TRAINER_VERSION`` (evolve/models/train.py), digests of the encoded training data per mixture component and
digest of the base's weights; otherwise the reason is logged (``retraining OUT: its training data changed
(db)``) and recorded as ``retrained_because``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

import evolve.models.train as trainer
from cycleqd.atomic import atomic_directory
from cycleqd.errors import UserError
from evolve.evaluators import Evaluator, get_skill
from evolve.evaluators.episodes import EpisodeTask
from evolve.evaluators.registry import build
from evolve.evaluators.specs import SkillSpec, normalise_skills
from evolve.importer import ImportSourceError, check_hf_dir
from evolve.models.modeling import META_FILE
from evolve.models.tokenizer import CHAT_TEMPLATE
from evolve.models.train import (
    CheckpointError,
    Example,
    LoopState,
    PromptFormat,
    TrainSpec,
    checkpoint_meta,
    encode,
    encode_conversation,
    load_checkpoint,
    save_checkpoint,
    train,
)

CHECKPOINT_FILE = "checkpoint.safetensors"
log = logging.getLogger(__name__)


class FinetuneError(UserError, RuntimeError):
    """An output or checkpoint that cannot be used; nothing has been changed. The message names the file."""


class FinetuneConfig(BaseModel):
    """One fine-tune. The defaults suit SmolLM2-135M on 2 CPU cores (about 5 minutes per expert in bf16 autocast)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    steps: int = Field(60, ge=1)
    lr: float = Field(5e-5, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    warmup: int = Field(6, ge=0)
    train_items: int = Field(2000, ge=1, description="train-split items drawn per skill")
    levels: list[int] | None = Field(None, description="difficulty levels of the training items (default: all)")
    replay: float = Field(0.2, ge=0, lt=1, description="share of an expert's batches drawn from the other skills")
    replay_skills: list[str] = Field(
        default_factory=lambda: ["code", "os", "db"], description="skills replayed (the expert's own is skipped)"
    )
    skills: dict[str, SkillSpec] | None = Field(
        None,
        description="skill name -> spec, as a run config has them (benchmark kinds train on their train split's "
        "gold trajectories, multi-turn, loss on the assistant turns); default: the embedded skill world",
    )
    max_tokens: int = Field(
        2048, ge=16, description="examples longer than this many tokens are left out (long episodes; memory)"
    )

    _skills = field_validator("skills", mode="before")(lambda v: None if v is None else normalise_skills(v))
    mode: Literal["full", "lora"] = "full"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    autocast: Literal["none", "bfloat16"] = Field("none", description="bfloat16: about 2x faster on a recent CPU")
    prompt_format: Literal["auto", "chat", "raw"] = Field(
        "auto", description="auto: the chat template when the tokenizer has a real one, else raw"
    )
    checkpoint_every: int = Field(20, ge=0, description="steps between checkpoints (0: none)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: every core)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where to train (the result is saved on CPU)")


def config_hash(config: FinetuneConfig, base: Path, skills: Sequence[str]) -> str:
    key = {"config": config.model_dump(), "base": str(Path(base).resolve()), "skills": list(skills)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# -- what determines a trained model (shared with evolve/bootstrap.py) ----------------------------------------
def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def data_digests(data: Mapping[str, Sequence[Any]]) -> dict[str, str]:
    """Per mixture component, a digest of its encoded examples in order (token ids and prompt length or loss
    mask, as JSON): exactly what training samples from, so the split, the items, the tokenizer and the prompt
    format all show in it. Milliseconds for thousands of examples."""
    return {name: _digest(json.dumps(list(examples), separators=(",", ":"))) for name, examples in data.items()}


def provenance(chash: str, data: Mapping[str, Sequence[Any]], **inputs: Any) -> dict[str, Any]:
    """Everything that determines a trained model: its config hash, the trainer's version, the digests of its
    training data and ``inputs`` (e.g. its base's digest). Recorded in ``cycleqd.json``."""
    version = trainer.TRAINER_VERSION  # read at call time: the one source of truth is evolve/models/train.py
    return {"config_hash": chash, "trainer_version": version, "data_digests": data_digests(data), **inputs}


def reuse_key(prov: Mapping[str, Any]) -> str:
    return _digest(json.dumps(prov, sort_keys=True))


_INPUT_CHANGED = {
    "base_digest": "its base model changed",
    "base_key": "its base model was retrained",
    "tokenizer_digest": "its tokenizer changed",
}


def stale_reason(meta: Mapping[str, Any] | None, prov: Mapping[str, Any]) -> str | None:
    """Why the model whose ``cycleqd.json`` is ``meta`` is not what training with ``prov`` would give now (None:
    it is, and can be reused)."""
    if not isinstance(meta, Mapping):
        return "its cycleqd.json is missing or unreadable"
    old = meta.get("data_digests")
    if "trainer_version" not in meta or not isinstance(old, Mapping):
        return "it was trained before cycleqd.json recorded its training data and TRAINER_VERSION"
    reasons = []
    if meta.get("config_hash") != prov["config_hash"]:
        reasons.append("its config changed")
    if meta["trainer_version"] != prov["trainer_version"]:
        reasons.append(f"the trainer changed (TRAINER_VERSION {meta['trainer_version']} -> {prov['trainer_version']})")
    new = prov["data_digests"]
    changed = [k for k in {**new, **old} if old.get(k) != new.get(k)]
    if changed:
        reasons.append(f"its training data changed ({', '.join(changed)})")
    for key, value in prov.items():
        if key not in ("config_hash", "trainer_version", "data_digests") and meta.get(key) != value:
            reasons.append(_INPUT_CHANGED.get(key, f"its {key} changed"))
    return "; ".join(reasons) or None


def base_digest(base: Path) -> str:
    """A digest of the base's ``config.json`` and weights (every ``*.safetensors`` file), so that an expert of a
    base rewritten at the same path (a rerun bootstrap, another import) is not reused. About 1 s per GB."""
    h = hashlib.sha256()
    for path in [base / "config.json", *sorted(base.glob("*.safetensors"))]:
        with path.open("rb") as f:
            h.update(f"{path.name}\0".encode() + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def skill_task(config: FinetuneConfig, name: str) -> Evaluator:
    """The evaluator a skill name means in this fine-tune: the config's own spec for it, else the world's."""
    if config.skills is None:
        return get_skill(name)  # UnknownSkillError names the built-in skills
    if name not in config.skills:
        raise FinetuneError(f"skill {name!r} is not in the config's skills ({', '.join(config.skills)})")
    return build(name, config.skills[name])


def resolve_format(config: FinetuneConfig, tokenizer: Any) -> PromptFormat:
    """``chat`` for a tokenizer with its own chat template; the embedded tokenizer's template renders the raw
    format already, so those models stay ``raw``."""
    if config.prompt_format != "auto":
        return config.prompt_format
    template = tokenizer.chat_template
    return "chat" if template and template != CHAT_TEMPLATE else "raw"


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.ckpt")


def _saved_meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / META_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def finetune(
    base: Path,
    skills: Sequence[str],
    out: Path,
    config: FinetuneConfig,
    *,
    force: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``base`` on ``skills`` (one: an expert with replay; several: multi-task) into ``out``.

    Returns the metadata written to ``out/cycleqd.json`` (with ``"reused": True`` when nothing was trained).
    ``on_start`` gets the step training starts from (0, or the checkpoint's step). The tokenizer is loaded and the
    data encoded before deciding on reuse (their digests are part of the key); the model only after.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, out = Path(base), Path(out)
    if not skills:
        raise FinetuneError("no skill given; name one (an expert) or several (multi-task)")
    replayed = config.replay_skills if len(skills) == 1 and config.replay > 0 else []
    tasks = {s: skill_task(config, s) for s in [*skills, *replayed]}  # errors name the known skills
    check_hf_dir(base)
    chash = config_hash(config, base, skills)
    existing = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if existing and not (out / META_FILE).is_file():
        raise FinetuneError(f"{out}: exists and is not a model written by cycleqd-evolve; choose another --out")
    if config.threads:
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as exc:  # tokenizers and transformers raise many types for a broken tokenizer
        raise ImportSourceError(
            f"{base}: transformers cannot read its tokenizer ({type(exc).__name__}: {exc})"
        ) from exc
    fmt = resolve_format(config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def data_for(name: str) -> list[Example]:
        task = tasks[name]
        if isinstance(task, EpisodeTask):
            if fmt != "chat":
                raise FinetuneError(
                    f"skill {name!r} trains on multi-turn gold trajectories: it needs a chat model (a tokenizer "
                    "with a chat template, prompt_format chat)"
                )
            convs = task.gold_conversations("train", config.train_items, seed=config.seed)
            examples = [encode_conversation(tokenizer, c) for c in convs]
            kept = [e for e in examples if len(e[0]) <= config.max_tokens]
            if not kept:
                raise FinetuneError(
                    f"skill {name!r}: none of its {len(examples)} train gold trajectories fits max_tokens "
                    f"{config.max_tokens} (the longest has {max((len(e[0]) for e in examples), default=0)})"
                )
            return kept
        items = task.items("train", config.train_items, seed=config.seed, levels=config.levels)
        return encode(tokenizer, items, prompt_format=fmt)

    if len(skills) == 1:
        own = skills[0]
        others = [s for s in config.replay_skills if s != own] if config.replay > 0 else []
        data = {own: data_for(own), **{f"replay:{s}": data_for(s) for s in others}}
        share = config.replay if others else 0.0
        mixture = {own: 1.0 - share, **{f"replay:{s}": share / len(others) for s in others}}
    else:
        data = {s: data_for(s) for s in skills}
        mixture = dict.fromkeys(skills, 1.0)
    spec = TrainSpec(
        steps=config.steps, lr=config.lr, batch_size=config.batch_size, warmup=config.warmup, mixture=mixture
    )
    prov = provenance(chash, data, base_digest=base_digest(base))
    key = reuse_key(prov)
    retrained_because = None
    if existing:
        previous = _saved_meta(out)
        retrained_because = stale_reason(previous, prov)
        if previous is not None and retrained_because is None and not force:
            return {**previous, "reused": True}
        retrained_because = retrained_because or "--force"
        log.warning("retraining %s: %s", out, retrained_because)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    except Exception as exc:
        raise ImportSourceError(f"{base}: transformers cannot load the model ({type(exc).__name__}: {exc})") from exc
    from evolve.models.hf import resolve_device

    model = model.to(resolve_device(config.device))
    saved = json.loads((base / "config.json").read_text())
    saved_dtype = getattr(torch, str(saved.get("dtype") or saved.get("torch_dtype") or "float32"), torch.float32)
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.seed)  # the adapters' random initialisation
        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules="all-linear", lora_dropout=0.0
        )
        model = get_peft_model(model, lora)

    ckpt = checkpoint_dir(out) / CHECKPOINT_FILE
    state = LoopState()
    try:
        # A checkpoint of other inputs (another job's leftovers at this --out, older data) is ignored and replaced.
        if ckpt.is_file() and checkpoint_meta(ckpt).get("reuse_key") == key:
            state, _ = load_checkpoint(ckpt, model)
    except CheckpointError as exc:
        raise FinetuneError(str(exc)) from exc
    if on_start:
        on_start(state.step)
    start_tokens, t_train = state.tokens, time.perf_counter()
    losses = train(
        model,
        data,
        spec,
        pad_id=pad_id,
        seed=config.seed,
        on_step=on_step,
        autocast=torch.bfloat16 if config.autocast == "bfloat16" else None,
        state=state,
        checkpoint_every=config.checkpoint_every,
        on_checkpoint=lambda st: save_checkpoint(ckpt, model, st, {"reuse_key": key}),
    )
    seconds = time.perf_counter() - t_train
    if config.mode == "lora":
        model = model.merge_and_unload()
    model = model.to("cpu", saved_dtype)
    meta = {
        "role": "expert" if len(skills) == 1 else "multitask",
        "skill": skills[0] if len(skills) == 1 else None,
        "skills": list(skills),
        "base": str(base.resolve()),
        **prov,
        "reuse_key": key,
        "retrained_because": retrained_because,
        "prompt_format": fmt,
        "finetune": config.model_dump(),
        "final_loss": losses[-1] if losses else None,
        "tokens": state.tokens,
        "tokens_per_s": round((state.tokens - start_tokens) / seconds, 1) if seconds > 0 else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "saved_dtype": str(saved_dtype).removeprefix("torch."),
    }
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    return meta
