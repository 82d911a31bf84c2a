"""Placement: which engine runs where, holding which elites, with how much memory.

An engine's memory is estimated as weights + KV cache + a fixed runtime overhead, plus in multi-LoRA mode the
adapter slots vLLM preallocates (``max_loras`` x ``max_lora_rank`` on every adapted matrix) and the adapters
themselves. Multi-LoRA mode runs one engine per device and deals the elites out round-robin; full mode runs one
engine per elite, first fit over the devices. A plan that does not fit is refused with what would fit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from serve.config import Device, ServeConfig

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "auto": 2}


class PlanError(ValueError):
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
    config = json.loads((Path(base_dir) / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    dims = [(h, heads * head_dim), (h, kv_heads * head_dim), (h, kv_heads * head_dim), (heads * head_dim, h)]
    dims += [(h, inter), (h, inter), (inter, h)]
    per_rank = layers * sum(i + o for i, o in dims) + 2 * (vocab + h)  # + embedding and lm_head LoRA
    nbytes = DTYPE_BYTES.get(dtype, 4)
    weights = sum(f.stat().st_size for f in Path(base_dir).glob("*.safetensors"))
    weights = weights * nbytes // 4  # stored as float32
    return ModelSize(weights, per_rank * nbytes, per_rank * 4 * (total_rank or 0))


def make_plan(cfg: ServeConfig, elite_ids: list[str], size: ModelSize, *, max_lora_rank: int | None) -> Plan:
    devices = cfg.devices or detect_devices()
    # memory not given in the config: detect it once (by device name; else the first detected device's)
    detected = {} if all(d.memory_gib for d in devices) else {d.name: d.memory_gib or 0.0 for d in detect_devices()}
    fallback = next(iter(detected.values()), 0.0)
    usable = {d.name: (d.memory_gib or detected.get(d.name, fallback)) * cfg.memory_utilization for d in devices}
    fixed = (size.weights_bytes / GIB) + cfg.kv_cache_gib + cfg.engine_overhead_gib
    engines: list[EnginePlan] = []
    if cfg.mode == "lora":
        assert max_lora_rank is not None
        groups: list[list[str]] = [[] for _ in devices]
        for i, eid in enumerate(elite_ids):
            groups[i % len(devices)].append(eid)
        for d, (dev, group) in enumerate(zip(devices, groups, strict=True)):
            if not group:
                continue
            slots = cfg.max_loras * max_lora_rank * size.lora_slot_bytes_per_rank
            need = fixed + (slots + max(len(group), cfg.max_loras) * size.adapter_bytes) / GIB
            if need > usable[dev.name]:
                raise PlanError(
                    f"one multi-LoRA engine needs {need:.2f} GiB but {dev.name} has {usable[dev.name]:.2f} GiB usable "
                    f"({cfg.memory_utilization:.0%} of it); lower max_loras or lora_rank, or add a device"
                )
            engines.append(EnginePlan(f"engine-{d}", dev, cfg.port + len(engines), "lora", group, need, max_lora_rank))
        return Plan(engines, usable)
    free = dict(usable)
    for eid in elite_ids:
        dev = next((d for d in devices if free[d.name] >= fixed), None)
        if dev is None:
            fit = sum(int(u // fixed) for u in usable.values())
            have = ", ".join(f"{k}: {v:.1f} GiB usable" for k, v in usable.items())
            raise PlanError(
                f"{len(elite_ids)} full-weight engines of {fixed:.2f} GiB each do not fit ({have}); at most {fit} "
                f"fit: select at most {fit} elites, or use mode: lora to serve them all as adapters on one engine"
            )
        free[dev.name] -= fixed
        engines.append(EnginePlan(f"engine-{len(engines)}", dev, cfg.port + len(engines), "full", [eid], fixed))
    return Plan(engines, usable)
