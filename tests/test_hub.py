"""Export: Hub-ready folders, model cards, and a token that never leaks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from pluribus.errors import PluribusError
from pluribus.hub import export_folder, push_folder, redact


@pytest.fixture()
def adapter_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    (out / "training_record.json").write_text(json.dumps({"stage": "rsft", "final_loss": 1.25}))
    return out


def _front_matter(card: str) -> dict:
    _, meta, _ = card.split("---", 2)
    return yaml.safe_load(meta)


def test_export_adapter_writes_card_with_base_and_results(adapter_dir: Path, tmp_path: Path) -> None:
    results = {"task": "synthetic", "systems": {"single": {"accuracy": 0.25}, "distilled": {"accuracy": 0.4}}}
    out = export_folder(adapter_dir, tmp_path / "export", datasets=["me/rsft"], eval_results=results)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    meta = _front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "adapter"
    assert meta["datasets"] == ["me/rsft"]
    values = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"single accuracy": 0.25, "distilled accuracy": 0.4}
    assert "final_loss" in (out / "README.md").read_text()


def test_card_shows_intervals_and_robustness_when_the_eval_has_them(adapter_dir: Path, tmp_path: Path) -> None:
    results = {"task": "synthetic:quickstart", "problems": 27,
               "systems": {"distilled-greedy": {"accuracy": 0.963, "accuracy_low": 0.817, "accuracy_high": 0.993}},
               "robustness": {"distilled-greedy": {"distractor": {"accuracy": 0.778, "change": -0.185}}}}
    card = (export_folder(adapter_dir, tmp_path / "export", eval_results=results) / "README.md").read_text()
    assert "27 held-out problems of `synthetic:quickstart`" in card
    assert "| distilled-greedy | 0.963 | 0.817 - 0.993 |" in card
    assert "| distilled-greedy | distractor | 0.778 | -0.185 |" in card


def test_export_refuses_existing_output_and_bad_source(adapter_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        export_folder(adapter_dir, tmp_path / "taken")
    with pytest.raises(PluribusError, match="neither a PEFT adapter"):
        export_folder(tmp_path / "taken", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_redact_hides_env_token_and_token_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret-value-123")
    assert "secret-value-123" not in redact("auth failed for secret-value-123")
    assert "hf_abcdefghijklmnop" not in redact("Bearer hf_abcdefghijklmnop")


def test_push_without_token_is_clear(adapter_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PluribusError, match="no Hub token"):
        push_folder(adapter_dir, "me/model")


def test_push_failure_never_shows_the_token(adapter_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on: a real refused connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "hf_" + "Z" * 30
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{port}", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False, raising=False)
    with pytest.raises(PluribusError) as info:
        push_folder(adapter_dir, "me/model")
    assert token not in str(info.value)
    assert "push to 'me/model' failed" in str(info.value)
