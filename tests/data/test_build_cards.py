"""Dataset cards a user may push: Hub metadata (license, language, size), no local path, TRL's formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from datasets import load_dataset
from huggingface_hub import DatasetCard

from pluribus.config import BuildConfig
from pluribus.data.builders import build
from pluribus.stages.build import hub_card
from tests.data.test_builders import make_run, sample_trajs


def _built(tmp_path: Path, **kw):
    run = make_run(tmp_path / "run", sample_trajs())
    return {b.kind: b for b in build(BuildConfig(kinds=["rsft", "augmented"]), [run], progress=False, **kw)}


def test_a_card_carries_license_language_and_size_and_no_local_path(tmp_path: Path) -> None:
    built = _built(tmp_path, task_source="gsm8k")
    text = (built["rsft"].path / "README.md").read_text()
    meta = DatasetCard(text).data.to_dict()  # huggingface_hub's own parsing of the header
    assert meta["license"] == "mit" and meta["language"] == ["en"] and meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == ["text-generation"] and "pluribus" in meta["tags"]
    assert "GSM8K (license mit)" in text
    assert str(tmp_path) not in text and "`run/trajectories`" in text


def test_the_task_source_is_read_from_the_run_recipe_else_the_license_is_unknown(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": {"source": "synthetic"}}))
    card = DatasetCard((build(BuildConfig(kinds=["rsft"]), [run], progress=False)[0].path / "README.md").read_text())
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    other = make_run(tmp_path / "other", sample_trajs())
    card = DatasetCard((build(BuildConfig(kinds=["rsft"]), [other], progress=False)[0].path / "README.md").read_text())
    assert card.data.license == "unknown" and "set `license` above" in card.text


def test_rsft_is_also_written_as_trl_prompt_completion(tmp_path: Path, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    built = _built(tmp_path, prompt_completion=True)
    folder = built["rsft"].path
    chats = load_dataset(str(folder), split="train")  # the default config is still the messages rows
    pairs = load_dataset(str(folder), data_dir="prompt_completion", split="train")
    assert "messages" in chats.column_names and len(pairs) == len(chats)
    assert [r["prompt"] + r["completion"] for r in pairs] == chats["messages"]
    # TRL's own reading of the format: conversational, its template splits into prompt and completion text
    row = pairs[0]
    assert is_conversational(row)
    out = apply_chat_template({"prompt": row["prompt"], "completion": row["completion"]},
                              AutoTokenizer.from_pretrained(smollm2_dir))
    assert out["completion"].startswith(row["completion"][0]["content"])
    assert "prompt_completion" in (folder / "README.md").read_text()
    assert not (built["augmented"].path / "prompt_completion").exists()  # rsft only


def test_the_pushed_card_keeps_the_datasets_header_and_pluribus_metadata(tmp_path: Path) -> None:
    built = list(_built(tmp_path, task_source="gsm8k").values())
    # the header `datasets`' push_to_hub writes: configs and dataset_info, no pluribus metadata
    pushed = ("---\n" + yaml.safe_dump({
        "configs": [{"config_name": "rsft", "data_files": [{"split": "train", "path": "rsft/train-*"}]},
                    {"config_name": "augmented", "data_files": [{"split": "train", "path": "augmented/train-*"}]}],
        "dataset_info": [{"config_name": "rsft", "splits": [{"name": "train", "num_examples": 2}]}],
    }) + "---\n")
    merged = DatasetCard(hub_card(pushed, built))
    meta = merged.data.to_dict()
    assert [c["config_name"] for c in meta["configs"]] == ["rsft", "augmented"] and meta["dataset_info"]
    assert {"pluribus", "rsft", "augmented"} <= set(meta["tags"]) and meta["license"] == "mit"
    assert meta["language"] == ["en"] and meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == ["text-generation"]
    assert "`rsft` dataset" in merged.text and "`augmented` dataset" in merged.text
    assert str(tmp_path) not in str(merged)


@pytest.mark.parametrize(("rows", "category"), [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"),
                                               (250_000, "100K<n<1M")])
def test_size_categories_are_the_hubs(rows: int, category: str) -> None:
    from pluribus.data.builders.card import size_category

    assert size_category(rows) == category
