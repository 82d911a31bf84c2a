"""Supervised training of the tiny models on skill-world items (CPU, seconds to minutes).

One loop serves the base model, the experts (own skill plus replay of the others) and the multi-task
baseline: they differ only in the skill mixture, the learning rate and the number of steps. Loss is on the
answer tokens only; batches are sampled from a seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evolve.evaluators.base import Item, format_prompt

Example = tuple[list[int], int]  # token ids, number of prompt tokens


class TrainSpec(BaseModel):
    """One training phase. ``mixture`` maps skill -> sampling weight (replay is a small weight)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(32, ge=1)
    warmup: int = Field(20, ge=0)
    mixture: dict[str, float]


def encode(tokenizer: PreTrainedTokenizerFast, items: Sequence[Item]) -> list[Example]:
    """Prompt and answer are tokenized apart, exactly as generation sees them (prompt, then new tokens)."""
    prompts = tokenizer([format_prompt(i.prompt) for i in items])["input_ids"]
    answers = tokenizer([" " + i.answer for i in items], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + a + [eos], len(p)) for p, a in zip(prompts, answers, strict=True)]


def train(
    model: LlamaForCausalLM,
    data: Mapping[str, Sequence[Example]],
    spec: TrainSpec,
    *,
    pad_id: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place; returns the loss of every step."""
    unknown = set(spec.mixture) - set(data)
    if unknown:
        raise KeyError(f"mixture names skills without training data: {sorted(unknown)}")
    skills = [s for s, w in spec.mixture.items() if w > 0]
    weights = [spec.mixture[s] for s in skills]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    for step in range(spec.steps):
        batch = [rng.choice(data[s]) for s in rng.choices(skills, weights, k=spec.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
