"""Eval refuses a corrupt, NaN or foreign-base adapter before any system writes output."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluribus.config import load_recipe
from pluribus.errors import PluribusError
from pluribus.stages.eval import run_eval
from tests.broken import lora_adapter, nan_copy, other_base, truncated_copy


@pytest.mark.parametrize(("kind", "message"), [
    ("truncated", "adapter weights .* are corrupt or truncated"),
    ("nan", r"hold 1 NaN/Inf value\(s\)"),
    ("foreign", "was trained on base '.*other', but the model is"),
])
def test_bad_adapter_is_refused_before_any_eval_output(tiny_llama_dir: Path, tmp_path: Path, kind: str,
                                                      message: str) -> None:
    good = lora_adapter(tiny_llama_dir, tmp_path / "good")
    if kind == "truncated":
        adapter = truncated_copy(good, tmp_path / kind, "adapter_model.safetensors", keep=5)
    elif kind == "nan":
        adapter = nan_copy(good, tmp_path / kind, "adapter_model.safetensors")
    else:
        adapter = lora_adapter(tiny_llama_dir, tmp_path / kind,
                               base=str(other_base(tiny_llama_dir, tmp_path / "other")))
    _refused_before_any_output(tiny_llama_dir, tmp_path, adapter, message)


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "eval.adapter '.*nowhere' does not exist; set eval.adapter to a trained adapter folder"),
    ("list-config", "adapter config '.*adapter_config.json' is not a JSON object"),
    ("string-rank", 'adapter config .* has r = "four", expected a positive integer'),
])
def test_missing_or_misshapen_adapter_is_named_before_any_eval_output(tiny_llama_dir: Path, tmp_path: Path, kind: str,
                                                                     message: str) -> None:
    import json

    adapter = tmp_path / "nowhere"
    if kind != "missing":
        adapter = lora_adapter(tiny_llama_dir, tmp_path / kind)
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps([1, 2] if kind == "list-config" else {**cfg, "r": "four"}))
    _refused_before_any_output(tiny_llama_dir, tmp_path, adapter, message)


def _refused_before_any_output(model: Path, tmp_path: Path, adapter: Path, message: str) -> None:
    agent = f"{{model: '{model}', dtype: float32, sampling: {{max_new_tokens: 4}}}}"
    recipe = load_recipe(None, [f"root={tmp_path / 'runs'}", "name=ev", "task.source=synthetic", "task.n=2",
                                f"team.agents=[{agent}]", "team.rounds=1", f"eval.adapter={adapter}",
                                "eval.systems=[single, distilled]"])
    with pytest.raises(PluribusError, match=message):
        run_eval(recipe, progress=False)
    assert not (tmp_path / "runs" / "ev" / "eval").exists()
