"""Supervised training on skill items: one loop for the tiny models of bootstrap and for fine-tuning any HF model.

One loop serves the base model, the experts (own skill plus replay of the others), the multi-task baseline and
``cycleqd-evolve finetune`` of a real model: they differ only in the skill mixture, the learning rate, the
number of steps, the prompt format and whether a bf16 autocast or LoRA is used. Loss is on the answer tokens
only; batches are sampled from a seeded generator, so a run is reproducible. The loop's whole state (step,
sampler and torch RNG, optimizer moments) can be checkpointed as safetensors and resumed, and a resumed run
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cycleqd.atomic import atomic_file
from cycleqd.errors import UserError
from evolve.evaluators.base import Item, format_prompt

#: The version of the training recipe implemented here and in evolve/models/tokenizer.py: :func:`train` (batch
#: sampling, loss masking, optimizer, schedule, clipping), :func:`encode`, :func:`encode_conversation` and
#: ``train_tokenizer``. Every saved model records it, and bootstrap and finetune reuse a saved model only when it
#: matches (besides the config and the digests of the encoded training data), so BUMP IT WITH ANY CHANGE AFTER
#: WHICH RETRAINING WOULD GIVE A DIFFERENT MODEL; models trained before are then retrained instead of passing as
#: current. (Changes to the data or its encoding also show in the data digests; the version catches the rest.)
TRAINER_VERSION = 1

#: Token ids and what is trained on: the number of prompt tokens (loss on everything after them: single-turn
#: items) or a 0/1 mask per token (loss on the assistant turns of a multi-turn conversation only).
Example = tuple[list[int], int | list[int]]
PromptFormat = Literal["raw", "chat"]


class TrainSpec(BaseModel):
    """One training phase. ``mixture`` maps skill -> sampling weight (replay is a small weight)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(32, ge=1)
    warmup: int = Field(20, ge=0)
    mixture: dict[str, float]


def encode(tokenizer: Any, items: Sequence[Item], *, prompt_format: PromptFormat = "raw") -> list[Example]:
    """Prompt and answer are tokenized apart, exactly as generation sees them (prompt, then new tokens).

    ``raw``: the text is ``format_prompt(prompt)`` and the answer follows after a space (the embedded world's
    format). ``chat``: that text is the user message of the tokenizer's chat template with the generation
    prompt added, and the answer is the assistant's reply, ended by EOS (the template's end-of-turn token).
    """
    eos = tokenizer.eos_token_id
    if prompt_format == "chat":
        prompts = [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": format_prompt(i.prompt)}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                )["input_ids"]
            )
            for i in items
        ]
        answers = tokenizer([i.answer for i in items], add_special_tokens=False)["input_ids"]
    else:
        prompts = tokenizer([format_prompt(i.prompt) for i in items])["input_ids"]
        answers = tokenizer([" " + i.answer for i in items], add_special_tokens=False)["input_ids"]
    return [(p + a + [eos], len(p)) for p, a in zip(prompts, answers, strict=True)]


def _template_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def encode_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> Example:
    """A whole multi-turn conversation (a gold trajectory) through the chat template, the loss on the assistant
    turns only: what the model must learn is its actions and answers, never the environment's observations.

    Each assistant turn's tokens are those its message adds to the conversation before it (rendered with the
    generation prompt, exactly as an engine feeds it), so training sees the very ids generation will.
    """
    ids = _template_ids(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template_ids(tokenizer, messages[:k], generation_prompt=True)
        upto = _template_ids(tokenizer, messages[: k + 1], generation_prompt=False)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as a prefix of its continuation; "
                "multi-turn fine-tuning needs one that does (ChatML-style templates do)"
            )
        for j in range(len(before), len(upto)):
            mask[j] = 1
    return ids, mask


@dataclass
class LoopState:
    """Where a training loop stands; what a checkpoint holds besides the trainable weights."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # tokens in the batches so far (padding excluded)
    sampler: Any = None  # random.Random.getstate() of the batch sampler
    torch_rng: torch.Tensor | None = None
    optimizer: dict[str, Any] | None = None


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then cosine decay to 10% of ``spec.lr``."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    data: Mapping[str, Sequence[Example]],
    spec: TrainSpec,
    *,
    pad_id: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    autocast: torch.dtype | None = None,
    state: LoopState | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[LoopState], None] | None = None,
) -> list[float]:
    """Train the parameters of ``model`` that require grad, in place; returns the loss of every step.

    With ``state`` (fresh or from :func:`load_checkpoint`), training continues from ``state.step`` and the
    object is kept up to date; every ``checkpoint_every`` steps (and not after the last), ``on_checkpoint``
    gets it with the sampler, RNG and optimizer state filled in.
    """
    unknown = set(spec.mixture) - set(data)
    if unknown:
        raise KeyError(f"mixture names skills without training data: {sorted(unknown)}")
    state = state if state is not None else LoopState()
    skills = [s for s, w in spec.mixture.items() if w > 0]
    weights = [spec.mixture[s] for s in skills]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if state.sampler is not None:
        rng.setstate(state.sampler)
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    device = next(model.parameters()).device
    model.train()
    for step in range(state.step, spec.steps):
        for group in opt.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec)
        batch = [rng.choice(data[s]) for s in rng.choices(skills, weights, k=spec.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, trained) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            if isinstance(trained, int):  # the number of prompt tokens: the answer after them is trained on
                labels[row, trained : len(ids)] = torch.tensor(ids[trained:])
            else:  # a per-token mask (the assistant turns of a conversation)
                keep = torch.tensor(trained, dtype=torch.bool)
                labels[row, : len(ids)] = torch.where(keep, torch.tensor(ids), torch.tensor(-100))
            mask[row, : len(ids)] = 1
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step = step + 1
        state.losses.append(loss.item())
        state.tokens += int(mask.sum())
        if on_step is not None:
            on_step(step, state.losses[-1])
        if checkpoint_every and on_checkpoint and state.step % checkpoint_every == 0 and state.step < spec.steps:
            state.sampler = rng.getstate()
            state.torch_rng = torch.get_rng_state()
            state.optimizer = opt.state_dict()
            on_checkpoint(state)
    model.eval()
    return state.losses


# -- checkpoints ---------------------------------------------------------------------------------------------
class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed; the message names the file."""


def save_checkpoint(path: Path, model: torch.nn.Module, state: LoopState, meta: Mapping[str, Any]) -> None:
    """The trainable weights, optimizer moments and RNG state as one safetensors file (never pickle), the rest
    as JSON in its metadata; written next to ``path`` and renamed over it."""
    path = Path(path)
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt = state.optimizer or {"state": {}, "param_groups": []}
    for idx, moments in opt["state"].items():
        for key, value in moments.items():
            tensors[f"opt/{idx}/{key}"] = torch.as_tensor(value).contiguous()
    if state.torch_rng is not None:
        tensors["rng/torch"] = state.torch_rng
    version, internal, gauss = state.sampler
    loop = {
        "meta": dict(meta),
        "step": state.step,
        "losses": state.losses,
        "tokens": state.tokens,
        "sampler": [version, list(internal), gauss],
        "param_groups": opt["param_groups"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"loop": json.dumps(loop)})


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` a checkpoint was saved with (read without loading its tensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["loop"])["meta"]
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a training checkpoint ({exc}); delete it to start over") from exc


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[LoopState, dict[str, Any]]:
    """Load the trainable weights into ``model`` and return the loop state and the saved ``meta``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            loop = json.loads((f.metadata() or {})["loop"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a training checkpoint ({exc}); delete it to start over") from exc
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    if saved.keys() != params.keys():
        raise CheckpointError(f"{path}: its weights do not match the model being trained; delete it to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, idx, key = k.split("/", 2)
            moments.setdefault(int(idx), {})[key] = v
    version, internal, gauss = loop["sampler"]
    state = LoopState(
        step=loop["step"],
        losses=loop["losses"],
        tokens=loop["tokens"],
        sampler=(version, tuple(internal), gauss),
        torch_rng=tensors.get("rng/torch"),
        optimizer={"state": moments, "param_groups": loop["param_groups"]},
    )
    return state, loop["meta"]
