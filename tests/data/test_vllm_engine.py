"""vLLM engine settings without vLLM: the recipe section, the engine arguments and server flags built from it, and
the hashes they stay out of. (tests/vllm runs the engines themselves.)"""

from __future__ import annotations

import pytest

from pluribus.config import AgentConfig, Recipe, TaskConfig, TeamConfig, VLLMSettings, validate_recipe
from pluribus.data.backends import backend_key
from pluribus.data.builders.datasets import rollout_hash
from pluribus.data.vllm_engine import GIB, engine_kwargs, lora_rank, server_args
from pluribus.errors import PluribusError, RecipeError
from pluribus.stages.debate import config_hash, legacy_config_hash


def _kw(settings: VLLMSettings | None, *, cpu: bool, **over):
    args = {"model": "/m", "dtype": "bfloat16", "max_model_len": None, "lora_rank_needed": None,
            "trust_remote_code": False, **over}
    return engine_kwargs(settings, cpu=cpu, **args)


def test_cpu_defaults_avoid_the_chunked_prefill_crash_and_size_the_kv_cache(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kw = _kw(None, cpu=True)
    assert kw["enable_chunked_prefill"] is False
    assert kw["kv_cache_memory_bytes"] == 2 * GIB
    assert "gpu_memory_utilization" not in kw and "max_model_len" not in kw and "enable_lora" not in kw
    assert _kw(VLLMSettings(chunked_prefill=True, kv_cache_gib=0.5), cpu=True)["enable_chunked_prefill"] is True
    assert _kw(VLLMSettings(kv_cache_gib=0.5), cpu=True)["kv_cache_memory_bytes"] == GIB // 2
    # the user sized the engine by its share of RAM: no KV size on top
    share = _kw(VLLMSettings(gpu_memory_utilization=0.3), cpu=True)
    assert share["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in share


def test_a_cpu_without_native_bf16_runs_vllm_in_float32_as_the_other_backends(monkeypatch):
    import pluribus.device as devices

    monkeypatch.setattr(devices, "supports_bf16", lambda device: False)
    assert _kw(None, cpu=True)["dtype"] == "float32"
    assert _kw(None, cpu=True, dtype="auto")["dtype"] == "float32"
    assert _kw(None, cpu=True, dtype="float16")["dtype"] == "float16"  # asked for by name: kept
    assert _kw(None, cpu=False)["dtype"] == "bfloat16"  # a GPU engine: vLLM's own checks
    monkeypatch.setattr(devices, "supports_bf16", lambda device: True)
    assert _kw(None, cpu=True)["dtype"] == "bfloat16" and _kw(None, cpu=True, dtype="auto")["dtype"] == "bfloat16"


def test_the_record_of_a_vllm_backend_says_its_dtype():
    from pluribus.device import where_backend

    class VLLMBackend:  # what where_backend reads of the real one
        engine_kwargs = {"dtype": "float32"}

    assert where_backend(VLLMBackend())["dtype"] == "float32"
    assert where_backend(VLLMBackend())["device"].endswith("(vLLM)")


def test_vllm_cpu_kvcache_space_is_read_by_vllm_and_a_contradicting_setting_refused(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert "kv_cache_memory_bytes" not in _kw(None, cpu=True)  # vLLM-CPU reads the variable itself
    assert "kv_cache_memory_bytes" not in _kw(VLLMSettings(kv_cache_gib=3), cpu=True)
    with pytest.raises(PluribusError, match="VLLM_CPU_KVCACHE_SPACE=3 is set and overrides vllm.kv_cache_gib=1.0"):
        _kw(VLLMSettings(kv_cache_gib=1), cpu=True)


def test_gpu_defaults_split_the_device_among_engines():
    kw = _kw(None, cpu=False, gpu_share=0.9 / 3)
    assert "enable_chunked_prefill" not in kw and "kv_cache_memory_bytes" not in kw
    assert kw["gpu_memory_utilization"] == 0.3
    assert _kw(VLLMSettings(gpu_memory_utilization=0.5), cpu=False, gpu_share=0.3)["gpu_memory_utilization"] == 0.5
    kv = _kw(VLLMSettings(kv_cache_gib=8), cpu=False)
    assert kv["kv_cache_memory_bytes"] == 8 * GIB and "gpu_memory_utilization" not in kv


def test_every_setting_passes_through():
    s = VLLMSettings(tensor_parallel_size=2, max_num_seqs=64, enforce_eager=True,
                     engine_args={"enable_prefix_caching": False, "max_num_batched_tokens": 8192})
    kw = _kw(s, cpu=False, max_model_len=4096, lora_rank_needed=12, trust_remote_code=True)
    assert kw == {"model": "/m", "dtype": "bfloat16", "trust_remote_code": True, "tensor_parallel_size": 2,
                  "max_model_len": 4096, "enable_lora": True, "max_lora_rank": 16, "max_loras": 1,
                  "gpu_memory_utilization": 0.9, "max_num_seqs": 64, "enforce_eager": True,
                  "enable_prefix_caching": False, "max_num_batched_tokens": 8192}
    args = server_args(kw, port=8123, served_name="m")
    assert args[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(args[3:])
    for part in ("--model /m", "--port 8123", "--served-model-name m", "--tensor-parallel-size 2",
                 "--max-lora-rank 16", "--enable-lora", "--enforce-eager", "--no-enable-prefix-caching",
                 "--max-num-batched-tokens 8192", "--trust-remote-code", "--max-model-len 4096"):
        assert part in flags


def test_lora_ranks_round_up_to_what_vllm_accepts():
    assert [lora_rank(r) for r in (1, 4, 8, 9, 64, 100, 512)] == [1, 8, 8, 16, 64, 128, 512]
    with pytest.raises(PluribusError, match="above vLLM's largest"):
        lora_rank(1024)


def test_engine_settings_are_refused_where_they_would_have_no_effect():
    with pytest.raises(RecipeError, match="vllm engine settings are set but the backend is transformers"):
        validate_recipe({"team": {"agents": [{"vllm": {"kv_cache_gib": 1}}]}})
    with pytest.raises(RecipeError, match="rl.vllm engine settings are set but rl.backend is transformers"):
        validate_recipe({"train": {"objective": "rl", "rl": {"vllm": {"max_num_seqs": 8}}}})
    with pytest.raises(RecipeError, match="set one of them"):
        validate_recipe({"team": {"agents": [{"backend": "vllm", "vllm": {"kv_cache_gib": 1,
                                                                           "gpu_memory_utilization": 0.5}}]}})
    with pytest.raises(RecipeError, match=r"\['max_model_len'\] are set by pluribus"):
        validate_recipe({"team": {"agents": [{"backend": "vllm", "vllm": {"engine_args": {"max_model_len": 9}}}]}})
    with pytest.raises(RecipeError, match="unknown key 'team.agents.0.vllm.kv_cache'"):
        validate_recipe({"team": {"agents": [{"backend": "vllm", "vllm": {"kv_cache": 1}}]}})


def test_engine_settings_change_no_hash_but_do_change_the_engine():
    plain = AgentConfig(backend="vllm", name="a")
    sized = AgentConfig(backend="vllm", name="a", vllm=VLLMSettings(kv_cache_gib=4, max_num_seqs=8))

    def recipe(agent: AgentConfig) -> Recipe:
        return Recipe(task=TaskConfig(n=4), team=TeamConfig(agents=[agent]))

    # a store debated before engine settings existed (no such key in its dump) stays current, and resizing
    # an engine does not orphan it
    assert config_hash(recipe(plain)) == config_hash(recipe(sized))
    assert legacy_config_hash(recipe(plain)) == legacy_config_hash(recipe(sized))
    from pluribus.config import BuildConfig

    assert rollout_hash(BuildConfig(), plain, "s", "p") == rollout_hash(BuildConfig(), sized, "s", "p")
    assert backend_key(plain) != backend_key(sized)  # but they are two engines
