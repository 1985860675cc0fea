"""What an export tells the Hub is true: the model it is built on, its own results only, license and metadata.

The Hub's own card validation (``ModelCard.validate``) posts the card to the Hub, which tests cannot reach: the
card is parsed here with huggingface_hub's offline parsers (``ModelCard``, ``metadata_load``,
``model_index_to_eval_results``) and the fields are checked one by one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from pluribus.errors import PluribusError
from pluribus.hub import export_folder
from tests.test_hub import adapter_dir, measured  # noqa: F401 (a fixture)


def test_model_index_holds_this_model_only_as_the_hub_parses_it(adapter_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    systems = {"single-greedy": {"accuracy": 0.3, "mode": "greedy"}, "team": {"accuracy": 0.5},
               "distilled-greedy": {"accuracy": 0.45, "mode": "greedy"},
               "distilled-sampled": {"accuracy": 0.4, "mode": "sampled"}}
    results = measured(adapter_dir, systems, task="gsm8k:train.jsonl", problems=40)
    out = export_folder(adapter_dir, tmp_path / "export", eval_results=results, title="me-rsft")
    card = ModelCard.load(out / "README.md")  # parses model-index into EvalResults, refusing a malformed one
    meta = metadata_load(out / "README.md")
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and meta["pipeline_tag"] == "text-generation"
    name, evals = model_index_to_eval_results(meta["model-index"])
    assert name == "me-rsft" and len(card.data.eval_results) == 2
    assert {(e.metric_name, e.metric_value) for e in evals} == {("accuracy (greedy decoding)", 0.45),
                                                                ("accuracy (sampled decoding)", 0.4)}
    e = evals[0]
    assert (e.task_type, e.task_name) == ("text-generation", "Text Generation")
    assert (e.dataset_type, e.dataset_name, e.dataset_split) == ("openai/gsm8k", "GSM8K (train.jsonl)", "heldout")
    assert e.dataset_args == {"problems": 40}
    text = (out / "README.md").read_text()
    assert "| team | 0.500 |" in text and "| single-greedy | 0.300 |" in text  # comparisons stay in the text
    assert re.search(r"\| distilled-greedy \| 0\.450 .*\| yes \|", text)


def test_export_refuses_results_of_another_model_naming_what_they_measured(adapter_dir: Path,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    import shutil

    other = shutil.copytree(adapter_dir, tmp_path / "other")
    from safetensors.torch import load_file, save_file

    tensors = load_file(other / "adapter_model.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, other / "adapter_model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(measured(other, {"distilled-greedy": {"accuracy": 0.4}})))
    with pytest.raises(PluribusError, match=r"did not measure '.*adapter' \(fingerprint \w+\); they measured "
                                            r"distilled-greedy \(.*other, fingerprint \w+\)"):
        export_folder(adapter_dir, tmp_path / "out", eval_results=path)
    base_only = {"task": "synthetic", "systems": {"single-greedy": {"accuracy": 0.2}}}
    with pytest.raises(PluribusError, match="measured no adapter or merged model"):
        export_folder(adapter_dir, tmp_path / "out", eval_results=base_only)
    assert not (tmp_path / "out").exists()


def test_a_long_training_record_is_summarized_never_cut(adapter_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    record = {"objective": "rsft", "expert": "rsft", "base_model": "smollm2-135m", "metrics": {"train_loss": 1.5},
              "recipe": {"notes": ["x" * 300 for _ in range(40)]}}
    (adapter_dir / "training_record.json").write_text(json.dumps(record))
    text = (export_folder(adapter_dir, tmp_path / "export") / "README.md").read_text()
    block = text.split("## Training", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block) == {k: record[k] for k in ("objective", "expert", "base_model", "metrics")}
    assert "`training_record.json` beside this card" in text
    assert json.loads((tmp_path / "export" / "training_record.json").read_text())["recipe"] == record["recipe"]


def test_the_cards_dtype_is_the_one_the_eval_ran_this_model_in() -> None:
    from pluribus.hub import _eval_dtype

    def task(name: str, ran_on: object) -> dict:
        return {"name": name, "systems": {}, "ran_on": ran_on}

    cpu32, gpu16 = {"device": "cpu", "dtype": "float32"}, {"device": "cuda:0", "dtype": "bfloat16"}
    both = {"tasks": [task("heldout", {"d-greedy": {"d": cpu32}, "team": {"a": gpu16}}),
                      task("transfer", {"d-greedy": {"d": cpu32}})]}
    assert _eval_dtype(both, {"heldout": ["d-greedy"], "transfer": ["d-greedy"]}) == "float32"  # others' aside
    mixed = {"tasks": [task("heldout", {"d-greedy": {"d": cpu32}}), task("transfer", {"d-greedy": {"d": gpu16}})]}
    assert _eval_dtype(mixed, {"heldout": ["d-greedy"], "transfer": ["d-greedy"]}) is None  # not one dtype
    assert _eval_dtype({"tasks": [task("heldout", {"d-greedy": {"d": {"device": "cpu"}}})]},
                       {"heldout": ["d-greedy"]}) is None  # a backend that records no dtype
    assert _eval_dtype({"tasks": [task("heldout", {"d-greedy": "cpu"})]}, {"heldout": ["d-greedy"]}) is None
    assert _eval_dtype({"systems": {}}, {"heldout": ["d-greedy"]}) is None  # an older results.json: no ran_on
    assert _eval_dtype(None, {}) is None


@pytest.mark.integration
@pytest.mark.parametrize("ran_in", [None, "bfloat16", "float32"])
def test_following_the_card_gives_the_logits_the_eval_measured(smollm2_dir: Path, tmp_path: Path,
                                                               ran_in: str | None) -> None:
    """An adapter trained on the embedded (dequantized Q4_1 GGUF) model: the card says so, and its loading code,
    run as written, gives the logits of the model eval ran (pluribus.models.load_model with the adapter) in the
    dtype its results.json says it ran in (float32 on a CPU without native bf16; bf16 where nothing says)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pluribus.models import load_model

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: it changes logits
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")  # records the cache folder, as training does
    results = None
    if ran_in is not None:
        results = measured(tmp_path / "adapter", {"distilled-greedy": {"accuracy": 0.4}})
        results["tasks"][0]["ran_on"] = {"distilled-greedy": {"distilled": {"device": "cpu", "dtype": ran_in}}}
    out = export_folder(tmp_path / "adapter", tmp_path / "export", eval_results=results)
    card = (out / "README.md").read_text()
    assert ("The evaluation ran in float32" in card) == (ran_in == "float32")
    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "not on the bf16 weights of" in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == meta["base_model"]

    code = card.split("```python\n", 1)[1].split("\n```", 1)[0].replace("<this repo>", str(out))
    scope: dict = {}
    exec(compile(code, "card", "exec"), scope)  # the card's code, as a user runs it
    evaluated, tokenizer = load_model("smollm2-135m", adapter=tmp_path / "adapter",
                                      dtype=getattr(torch, ran_in or "bfloat16"))
    ids = tokenizer("What is 12 + 30? Answer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = scope["model"].eval()(ids).logits
        ours = evaluated(ids).logits
    assert torch.equal(theirs, ours)
    assert scope["tokenizer"]("What is 12 + 30? Answer:")["input_ids"] == ids[0].tolist()


# ------------------------------------------------------------------ every folder pluribus writes is pushable or says so


def test_a_merge_folder_card_names_the_base_by_hub_id_and_no_local_path(adapter_dir: Path, tiny_llama_dir: Path,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    import shutil

    from pluribus.merge import MergeInput, MergeSpec, run_merge

    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "someone/tiny-llama"}))
    a, b = shutil.copytree(adapter_dir, tmp_path / "adA"), shutil.copytree(adapter_dir, tmp_path / "adB")
    spec = MergeSpec(method="linear", inputs=[MergeInput(path=str(p)) for p in (a, b)], output="adapter",
                     base=str(base), check_base=False)
    run_merge(spec, tmp_path / "merged")
    readme = tmp_path / "merged" / "README.md"
    meta = metadata_load(readme)
    assert meta["base_model"] == "someone/tiny-llama" and meta["base_model_relation"] == "adapter"
    text = readme.read_text()
    assert str(tmp_path) not in text and "`adA`" in text and "pluribus export merged" in text
    ModelCard.load(readme)  # parses as a Hub card


def test_a_trained_adapter_card_names_the_hub_base_and_points_to_export(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pluribus.distill.output import save_output

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    cache = "/root/.cache/pluribus/models/smollm2-135m-58e992c2ff92"  # where the embedded base's weights are
    record = {"objective": "rsft", "expert": "rsft", "base_model": "smollm2-135m", "base_model_path": cache}
    out = save_output(model, AutoTokenizer.from_pretrained(tiny_llama_dir), tmp_path / "rsft", record)
    text = (out / "README.md").read_text()  # PEFT's own card (base_model: a local path) is replaced
    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "/root/" not in text and str(tmp_path) not in text
    assert "pluribus export rsft" in text and "SmolLM2-135M-Instruct.Q4_1.gguf" in text
