"""Export: Hub-ready folders, model cards, and a token that never leaks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pluribus.errors import PluribusError
from pluribus.hub import export_folder, push_folder
from pluribus.public import TOKEN_ENVS, redact


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


def measured(adapter: Path, systems: dict, **extra) -> dict:
    """A results.json as `pluribus eval` writes it, whose `distilled-*` systems measured ``adapter``."""
    from pluribus.adapter import adapter_fingerprint

    adapters = {k: {"path": str(adapter), "fingerprint": adapter_fingerprint(adapter)} for k in systems
                if k.startswith("distilled")}
    task = {"name": "heldout", "task": extra.get("task", "synthetic"), "split": "heldout",
            "problems": extra.get("problems", 20), "systems": systems, "adapters": adapters}
    return {"task": task["task"], "split": "heldout", "problems": task["problems"], "systems": systems,
            "tasks": [task], **extra}


def test_export_adapter_writes_card_with_base_and_results(adapter_dir: Path, tmp_path: Path) -> None:
    results = measured(adapter_dir, {"single-greedy": {"accuracy": 0.25}, "distilled-greedy": {"accuracy": 0.4}})
    out = export_folder(adapter_dir, tmp_path / "export", datasets=["me/rsft"], eval_results=results)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    meta = _front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "adapter"
    assert meta["datasets"] == ["me/rsft"]
    values = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"accuracy (greedy decoding)": 0.4}  # the base agent's is a comparison, in the text
    assert "| single-greedy | 0.250 |" in (out / "README.md").read_text()
    assert "final_loss" in (out / "README.md").read_text()


def test_card_shows_intervals_and_robustness_when_the_eval_has_them(adapter_dir: Path, tmp_path: Path) -> None:
    results = measured(adapter_dir, {"distilled-greedy": {"accuracy": 0.963, "accuracy_low": 0.817,
                                                          "accuracy_high": 0.993}},
                       task="synthetic:quickstart", problems=27,
                       robustness={"distilled-greedy": {"distractor": {"accuracy": 0.778, "change": -0.185}}})
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


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "eval results file '.*' does not exist"),
        (b"[1, 2]", "is not a results.json written by `pluribus eval`"),
        (b'{"foo": 1}', "is not a results.json written by `pluribus eval`"),
        (b'{"systems": {"single": {"accuracy": "high"}}}', "is not a results.json written by `pluribus eval`"),
        (b"{bad", "is not valid JSON"),
        (b"\xff\xfe\x00", "is not UTF-8 text"),
    ],
    ids=["missing", "list", "other", "text-accuracy", "bad-json", "binary"],
)
def test_export_refuses_bad_eval_results_before_writing(
    adapter_dir: Path, tmp_path: Path, content: bytes | None, needle: str
) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PluribusError, match=needle):
        export_folder(adapter_dir, tmp_path / "out", eval_results=path)
    assert not (tmp_path / "out").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _poison(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(("kind", "damage", "needle"), [
    ("adapter", _truncate, "adapter weights '.*adapter_model.safetensors' are corrupt or truncated"),
    ("adapter", _poison, "holds 1 NaN/Inf value"),
    ("model", _truncate, "model weights '.*model.safetensors' are corrupt or truncated"),
    ("model", _poison, "holds 1 NaN/Inf value"),
], ids=["adapter-truncated", "adapter-nan", "model-truncated", "model-nan"])
def test_export_refuses_corrupt_and_nan_weights(adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path, kind: str,
                                                damage, needle: str) -> None:
    import shutil

    source = tmp_path / "source"
    shutil.copytree(adapter_dir if kind == "adapter" else tiny_llama_dir, source)
    export_folder(source, tmp_path / "fine")  # intact weights export
    damage(source / ("adapter_model.safetensors" if kind == "adapter" else "model.safetensors"))
    with pytest.raises(PluribusError, match=needle):
        export_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_source_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text("name: x\n")
    with pytest.raises(PluribusError, match="is a file, expected a model or adapter folder"):
        export_folder(tmp_path / "q.yaml", tmp_path / "out")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, env=env)


def test_cli_export_checks_the_push_before_writing(adapter_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_ENVS}
    out = tmp_path / "out"
    proc = _cli("export", str(adapter_dir), "-o", str(out), "--push-to-hub", "me/repo", env=env)
    assert proc.returncode == 2 and "no Hub token" in proc.stderr and not out.exists()
    token = "hf_" + "Q" * 30
    proc = _cli("export", str(adapter_dir), "-o", str(out), "--push-to-hub", "bad repo!!", env={**env, "HF_TOKEN": token})
    assert proc.returncode == 2 and "'bad repo!!' is not a valid Hub repo id" in proc.stderr and not out.exists()
    assert token not in proc.stderr
    proc = _cli("export", str(adapter_dir), "-o", str(out), "--eval", str(tmp_path / "nonexist.json"), env=env)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not out.exists()


def test_export_refuses_a_corrupt_adapter_config(adapter_dir: Path, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "source"
    shutil.copytree(adapter_dir, source)
    (source / "adapter_config.json").write_text("{bad")
    with pytest.raises(PluribusError, match="adapter config '.*adapter_config.json' is not valid JSON"):
        export_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("edit", "message"), [
    ([1, 2], "is not a JSON object"),
    ({"r": "four"}, 'has r = "four", expected a positive integer'),
    ({"target_modules": 5}, "has target_modules = 5, expected a list of module names"),
])
def test_export_refuses_an_adapter_config_of_the_wrong_shape(adapter_dir: Path, tmp_path: Path, edit: object,
                                                             message: str) -> None:
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, **edit} if isinstance(edit, dict) else edit))
    with pytest.raises(PluribusError, match=f"adapter config '.*adapter_config.json' {message}"):
        export_folder(adapter_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "model.safetensors"])
def test_export_names_weights_that_are_a_folder(adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path,
                                                name: str) -> None:
    import shutil

    source = adapter_dir if name.startswith("adapter") else shutil.copytree(tiny_llama_dir, tmp_path / "model")
    (source / name).unlink()
    (source / name).mkdir()
    with pytest.raises(PluribusError, match=f"{name}' is a folder, not a file|{name} is a folder, not a file"):
        export_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ nothing local or secret leaves in an export


def _all_text(folder: Path) -> str:
    return "\n".join(f.read_text() for f in folder.iterdir() if f.suffix in {".json", ".md", ".yaml"})


def test_export_names_the_base_by_hub_id_and_strips_local_paths(adapter_dir: Path, tmp_path: Path) -> None:
    # what the quickstart writes: the base is the dequantized cache folder of the embedded alias
    cache = "/root/.cache/pluribus/models/smollm2-135m-58e992c2ff92"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": cache}))
    record = {"stage": "rsft", "base_model": "smollm2-135m", "base_model_path": cache,
              "recipe": {"root": str(tmp_path / "runs")},
              "dataset": {"path": str(tmp_path / "data"), "files": {str(tmp_path / "data" / "d.parquet"): "ab12"}}}
    (adapter_dir / "training_record.json").write_text(json.dumps(record))
    out = export_folder(adapter_dir, tmp_path / "export")
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == hub
    assert _front_matter((out / "README.md").read_text())["base_model"] == hub
    exported = json.loads((out / "training_record.json").read_text())
    assert exported["base_model_path"] == hub and exported["dataset"] == {"path": "data", "files": {"d.parquet": "ab12"}}
    text = _all_text(out)
    assert "/root/" not in text and str(tmp_path) not in text


def test_a_local_base_is_named_by_the_hub_id_it_records_else_by_its_folder(tiny_llama_dir: Path, tmp_path: Path,
                                                                         adapter_dir: Path) -> None:
    import shutil

    from pluribus.public import public_model_name

    base = shutil.copytree(tiny_llama_dir, tmp_path / "mybase")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(tmp_path / "elsewhere")}))
    assert public_model_name(str(base)) == "mybase"
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "someone/tiny-llama"}))
    assert public_model_name(str(base)) == "someone/tiny-llama"
    (base / "pluribus_source.json").write_text(json.dumps({"gguf": "/x/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert public_model_name(str(base)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_export_redacts_url_credentials_and_api_keys(adapter_dir: Path, tmp_path: Path) -> None:
    url = "https://bob:sk-LEAKED999@api.example.com/v1"
    record = {"stage": "rsft", "recipe": {"team": {"agents": [{"base_url": url, "api_key": "plain-secret-1"}]}}}
    (adapter_dir / "training_record.json").write_text(json.dumps(record))
    out = export_folder(adapter_dir, tmp_path / "export")
    text = _all_text(out)
    assert "sk-LEAKED999" not in text and "bob:" not in text and "plain-secret-1" not in text
    agent = json.loads((out / "training_record.json").read_text())["recipe"]["team"]["agents"][0]
    assert agent == {"base_url": "https://***@api.example.com/v1", "api_key": "***"}
    assert "sk-LEAKED" not in redact("key sk-LEAKED999abc") and "***@h" in redact("http://u:p@h/x")


@pytest.fixture()
def two_adapters(adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    a, b = shutil.copytree(adapter_dir, tmp_path / "adA"), shutil.copytree(adapter_dir, tmp_path / "adB")
    for ad in (a, b):
        cfg = json.loads((ad / "adapter_config.json").read_text())
        (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tiny_llama_dir)}))
    return a, b


@pytest.mark.parametrize("output", ["model", "adapter"])
def test_export_of_a_merge_carries_relation_inputs_and_recipe(two_adapters: tuple[Path, Path], tiny_llama_dir: Path,
                                                            tmp_path: Path, output: str) -> None:
    import shutil

    from pluribus.merge import MergeInput, MergeSpec, run_merge

    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "someone/tiny-llama"}))
    spec = MergeSpec(method="linear", inputs=[MergeInput(path=str(p)) for p in two_adapters], output=output,
                     base=str(base), check_base=False)
    run_merge(spec, tmp_path / "merged")
    out = export_folder(tmp_path / "merged", tmp_path / "export")
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "someone/tiny-llama" and meta["base_model_relation"] == "merge"
    assert "linear" in meta["tags"] and "`adA`, `adB`" in card and "## Merge recipe" in card
    recipe = yaml.safe_load((out / "merge.yaml").read_text())
    assert recipe["base"] == "someone/tiny-llama" and [i["path"] for i in recipe["inputs"]] == ["adA", "adB"]
    assert str(tmp_path) not in _all_text(out)


def test_export_warns_when_a_model_has_no_tokenizer(tiny_llama_dir: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, source, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                          "vocab.json", "chat_template.jinja"))
    with caplog.at_level("WARNING", logger="pluribus.hub"):
        export_folder(source, tmp_path / "export")
    assert [r.getMessage() for r in caplog.records if "no tokenizer files" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pluribus.hub"):
        export_folder(tiny_llama_dir, tmp_path / "export2")
    assert not [r for r in caplog.records if "no tokenizer" in r.getMessage()]
