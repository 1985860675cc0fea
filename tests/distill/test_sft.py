"""Reasoning / augmented SFT: assistant-only labels, packing == unpacked, training, resume, bad inputs."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from pluribus.config import Recipe
from pluribus.distill.data import load_rows
from pluribus.distill.loop import training_arguments
from pluribus.distill.output import checkpoints_dir
from pluribus.distill.packing import VARLEN_SDPA, PackingCollator, use_varlen_attention
from pluribus.distill.sft import causal_lm_loss, prepare_examples, tokenize_conversation, train_sft
from pluribus.distill.student import attach_lora, load_student, patch_kernels
from pluribus.errors import PluribusError
from tests.distill.conftest import read_record, synthetic_problems, write_parquet


def recipe(tmp_path, student_dir, **train) -> Recipe:
    base = {"model": str(student_dir), "kernels": "off", "max_steps": 2, "batch_size": 4, "logging_steps": 1,
            "save_steps": 2, "eval_steps": 2, "eval_fraction": 0.0, "report_to": ["none"], "lora": {"r": 4}}
    lora = {**base["lora"], **train.pop("lora", {})}
    return Recipe(name="t", root=str(tmp_path / "runs"), train={**base, **train, "lora": lora})


@pytest.fixture(scope="module")
def tokenizer(student_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_dir)


def test_labels_cover_assistant_turns_and_their_end_token_only(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
                {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "5 * 4 = 20."}]
    ids, labels = tokenize_conversation(tokenizer, messages)
    labelled = [i for i, x in enumerate(labels) if x != -100]
    assert all(labels[i] == ids[i] for i in labelled)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # two labelled runs, one per assistant turn, each exactly "content<|im_end|>"
    runs, run = [], [labelled[0]]
    for i in labelled[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    runs.append(run)
    assert len(runs) == 2
    for r, text in zip(runs, ["2 + 3 = 5.", "5 * 4 = 20."], strict=True):
        assert ids[r[-1]] == end
        assert tokenizer.decode([ids[i] for i in r[:-1]]) == text
    # no prompt token (user turns, system prompt, role headers) carries a label
    prompt_text = tokenizer.decode([ids[i] for i in range(len(ids)) if labels[i] == -100])
    assert "What is 2 + 3?" in prompt_text and "And times 4?" in prompt_text and "5 * 4" not in prompt_text


def _examples(tokenizer, n=5):
    cfg = Recipe(train={"max_length": 512}).train
    rows = [{"messages": [{"role": "user", "content": p["question"] + " x" * i},
                          {"role": "assistant", "content": " ".join(p["steps"][: 1 + i % 3])}],
             "problem_id": p["id"]} for i, p in enumerate(synthetic_problems(n))]
    from datasets import Dataset

    return prepare_examples(Dataset.from_list(rows), tokenizer, cfg)[0]


def test_packed_loss_matches_unpacked_and_per_example(student_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, attn_implementation="sdpa")
    examples = _examples(tokenizer)
    padded = PackingCollator(tokenizer.pad_token_id, packing=False)(examples)
    packed = PackingCollator(tokenizer.pad_token_id, packing=True)(examples)
    with torch.no_grad():
        loss_padded = causal_lm_loss(model, padded, None)
        # reference: each example alone through the stock model and its own loss, token-weighted
        total, count = 0.0, 0
        for ex in examples:
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss) * n
            count += n
        # transformers' own packed path (dense block-diagonal SDPA mask from position_ids)
        dense = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_length"))}
        loss_dense = causal_lm_loss(model, dense, None)
        assert use_varlen_attention(model) == VARLEN_SDPA
        loss_packed = causal_lm_loss(model, packed, None)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].numel() == sum(len(e["input_ids"]) for e in examples)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(float(loss_packed), total / count, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_packed, loss_dense, rtol=1e-5, atol=1e-5)


def test_packed_rows_never_attend_across_examples(student_dir, tokenizer):
    """Changing example 0 leaves example 1's logits in the packed row unchanged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    use_varlen_attention(model)
    a, b = _examples(tokenizer, 2)
    a2 = {**a, "input_ids": [a["input_ids"][0]] + [7] * (len(a["input_ids"]) - 1)}
    collate = PackingCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        outs = []
        for first in (a, a2):
            batch = collate([first, b])
            batch = {k: v for k, v in batch.items() if k not in {"labels", "shift_labels", "loss_weights"}}
            outs.append(model(**batch).logits[0, len(a["input_ids"]):])
    torch.testing.assert_close(outs[0], outs[1])


def test_train_rsft_writes_adapter_and_record(tmp_path, student_dir, rsft_dir):
    r = recipe(tmp_path, student_dir, eval_fraction=0.2, report_to=["tensorboard"])
    out = train_sft(r, dataset=rsft_dir)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    record = read_record(out)
    assert record["objective"] == "rsft" and record["recipe"]["train"]["model"] == str(student_dir)
    assert list(record["dataset"]["files"].values())[0] and record["data"]["kept"] > 0
    assert "eval_loss" in record["metrics"] and "train_loss" in record["metrics"]
    # the logged steps, for `pluribus view`'s curves: a loss at each logged step, the last one at the final step
    losses = [h for h in record["log_history"] if "loss" in h]
    assert losses and all(isinstance(h["step"], int) for h in losses)
    assert record["log_history"][-1]["step"] == max(h["step"] for h in record["log_history"])
    assert record["data"]["attention"] == VARLEN_SDPA
    assert list((checkpoints_dir(out)).rglob("events.out.tfevents*")), "tensorboard logs are written"


def test_one_optimizer_step_changes_only_the_adapter(tmp_path, student_dir, tokenizer):
    from datasets import Dataset

    from pluribus.distill.sft import PackedSFTTrainer

    cfg = recipe(tmp_path, student_dir, max_steps=1, lr=1e-2, warmup_ratio=0.0).train
    model, tok = load_student(cfg)
    model = attach_lora(model, cfg, "CAUSAL_LM")
    use_varlen_attention(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_arguments(cfg, tmp_path / "ckpt", seed=0, has_eval=False, save_strategy="no")
    PackedSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_examples(tok, 4)),
                     data_collator=PackingCollator(tok.pad_token_id)).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_resume_continues_from_the_saved_step_with_the_same_data(tmp_path, student_dir, rsft_dir):
    kw = {"scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 2, "lr": 1e-2}
    straight = train_sft(recipe(tmp_path / "a", student_dir, max_steps=4, **kw), dataset=rsft_dir)
    r1 = recipe(tmp_path / "b", student_dir, max_steps=2, **kw)
    first = train_sft(r1, dataset=rsft_dir)
    assert (checkpoints_dir(first) / "checkpoint-2").is_dir()
    resumed = train_sft(recipe(tmp_path / "b", student_dir, max_steps=4, **kw), dataset=rsft_dir, resume=True)
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    state = (checkpoints_dir(resumed) / "checkpoint-4" / "trainer_state.json").read_text()
    assert '"global_step": 4' in state


def test_resume_reports_the_whole_runs_train_loss(tmp_path, student_dir, rsft_dir):
    # logging_steps=3 does not divide the checkpoint step: the loss of steps 1-2 reaches the checkpoint only
    # because a checkpoint step is also logged
    kw = {"scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 2, "lr": 1e-2, "logging_steps": 3}
    straight = train_sft(recipe(tmp_path / "a", student_dir, max_steps=4, **kw), dataset=rsft_dir)
    train_sft(recipe(tmp_path / "b", student_dir, max_steps=2, **kw), dataset=rsft_dir)
    resumed = train_sft(recipe(tmp_path / "b", student_dir, max_steps=4, **kw), dataset=rsft_dir, resume=True)
    whole, again = read_record(straight)["metrics"], read_record(resumed)["metrics"]
    assert again["train_loss_steps"] == 4
    assert again["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)


def test_resume_refuses_an_adapter_of_another_base(tmp_path, student_dir, other_student_dir, rsft_dir):
    train_sft(recipe(tmp_path, student_dir, max_steps=2), dataset=rsft_dir)
    with pytest.raises(PluribusError, match="another base|holds an adapter of base"):
        train_sft(recipe(tmp_path, other_student_dir, max_steps=4), dataset=rsft_dir, resume=True)


def test_too_long_rows_are_dropped_or_truncated_and_counted(tmp_path, student_dir, tokenizer, rsft_dir):
    from datasets import Dataset

    rows = load_rows(rsft_dir, "rsft")
    long = {"messages": [{"role": "user", "content": "q " * 300}, {"role": "assistant", "content": "a " * 300}],
            "problem_id": "long", "agent": "a", "round": 0}
    ds = Dataset.from_list([*rows.to_list()[:3], long])
    cfg = Recipe(train={"max_length": 200}).train
    kept, counts = prepare_examples(ds, tokenizer, cfg)
    assert (counts["too_long"], counts["dropped"], counts["kept"]) == (1, 1, 3)
    cfg = Recipe(train={"max_length": 400, "too_long": "truncate", "min_kept_labels": 0.1}).train
    kept, counts = prepare_examples(ds, tokenizer, cfg)
    assert (counts["too_long"], counts["truncated"], counts["kept"]) == (1, 1, 4)
    assert len(kept[-1]["input_ids"]) == 400 and kept[-1]["labels"][-1] != -100
    # truncated inside the prompt: nothing of it is labelled, so it is dropped, and still counted
    cfg = Recipe(train={"max_length": 200, "too_long": "truncate"}).train
    kept, counts = prepare_examples(ds, tokenizer, cfg)
    assert (counts["too_long"], counts["truncated"], counts["dropped"], counts["kept"]) == (1, 0, 1, 3)
    with pytest.raises(PluribusError, match="max_length=50; raise it or set train.too_long=truncate"):
        prepare_examples(Dataset.from_list([long]), tokenizer, Recipe(train={"max_length": 50}).train)
    # the advice to truncate is not given to a recipe that already truncates
    with pytest.raises(PluribusError, match="max_length=50; truncated, they keep no assistant token") as info:
        prepare_examples(Dataset.from_list([long]), tokenizer, Recipe(train={"max_length": 50, "too_long": "truncate"}).train)
    assert "set train.too_long=truncate" not in str(info.value)
    out = train_sft(recipe(tmp_path, student_dir, max_length=60, too_long="truncate", max_steps=1), dataset=rsft_dir)
    data = read_record(out)["data"]
    assert data["too_long"] > 0 and data["too_long"] == data["truncated"] + data["dropped"]


def test_augmented_weights_corrective_traces(tmp_path, student_dir, augmented_dir, tokenizer):
    rows = load_rows(augmented_dir, "augmented")
    cfg = Recipe(train={"objective": "augmented", "corrective_weight": 2.5}).train
    examples, _ = prepare_examples(rows, tokenizer, cfg)
    assert [e["weight"] for e in examples] == [2.5 if k == "corrective" else 1.0 for k in rows["kind"]]
    out = train_sft(recipe(tmp_path, student_dir, objective="augmented", corrective_weight=2.0), dataset=augmented_dir)
    assert read_record(out)["objective"] == "augmented"


def test_dataset_missing_field_or_empty_is_refused(tmp_path, student_dir):
    # pluribus's own columns (problem_id, kind) are optional (tests/distill/test_trl_formats.py); messages is not
    bad = write_parquet([{"text": "hi", "problem_id": "p"}], tmp_path / "bad")
    with pytest.raises(PluribusError, match=r"missing field.*messages.*or TRL's prompt \+ completion"):
        train_sft(recipe(tmp_path, student_dir), dataset=bad)
    with pytest.raises(PluribusError, match="missing field.*messages"):
        train_sft(recipe(tmp_path, student_dir, objective="augmented"), dataset=bad)
    from datasets import Dataset

    (tmp_path / "empty").mkdir()
    Dataset.from_dict({"messages": [], "problem_id": []}).to_parquet(str(tmp_path / "empty" / "data.parquet"))
    with pytest.raises(PluribusError, match="is empty"):
        train_sft(recipe(tmp_path, student_dir), dataset=tmp_path / "empty")
    with pytest.raises(PluribusError, match="does not exist"):
        train_sft(recipe(tmp_path, student_dir), dataset=tmp_path / "nowhere")


def test_target_modules_matching_nothing_lists_the_linear_layers(tmp_path, student_dir, rsft_dir):
    with pytest.raises(PluribusError, match=r"match no linear layer.*'q_proj'"):
        train_sft(recipe(tmp_path, student_dir, lora={"target_modules": ["qkv"]}), dataset=rsft_dir)


def test_qlora_without_bitsandbytes_gives_the_install_hint(tmp_path, student_dir, rsft_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an absent package looks like to `import`
    with pytest.raises(PluribusError, match="pip install 'bitsandbytes"):
        train_sft(recipe(tmp_path, student_dir, lora={"quantize": "nf4"}), dataset=rsft_dir)


def test_qlora_loads_4bit_and_trains_a_step_on_cpu(tmp_path, student_dir, rsft_dir):
    out = train_sft(recipe(tmp_path, student_dir, lora={"quantize": "nf4"}, max_steps=1, warmup_ratio=0.0), dataset=rsft_dir)
    record = read_record(out)
    assert record["recipe"]["train"]["lora"]["quantize"] == "nf4"
    assert record["metrics"]["train_loss"] > 0
    tensors = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and tensors[k].abs().sum() > 0 for k in tensors)


def test_kernels_torch_give_the_same_packed_loss_and_gradients(student_dir, tokenizer):
    """train.kernels=torch (fused LoRA twins + chunked lm_head loss) == kernels off, on a packed batch."""
    from transformers import AutoModelForCausalLM

    cfg = Recipe(train={"lora": {"r": 4}}).train
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    model = attach_lora(model, cfg, "CAUSAL_LM")
    with torch.no_grad():  # non-zero B so the LoRA path matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    use_varlen_attention(model)
    batch = PackingCollator(tokenizer.pad_token_id)(_examples(tokenizer))
    results = []
    for mode in ("off", "torch"):
        handle = patch_kernels(model, mode)
        model.zero_grad()
        loss = causal_lm_loss(model, batch, None, mode)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
        if handle is not None:
            handle.unpatch()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-4, atol=1e-6)


def test_truncation_is_said_and_refused_when_it_keeps_too_few_labelled_tokens(tokenizer, caplog):
    from datasets import Dataset

    def row(i: int, answer_words: int) -> dict:
        return {"messages": [{"role": "user", "content": f"question {i} " + "q " * 40},
                             {"role": "assistant", "content": "a " * answer_words}],
                "problem_id": f"p{i}", "agent": "a", "round": 0}

    ds = Dataset.from_list([row(i, 300) for i in range(3)])
    prompt_len = len(tokenize_conversation(tokenizer, row(0, 1)["messages"])[0])
    # every row cut a few tokens past its prompt: each keeps a sliver of its answer
    cfg = Recipe(train={"max_length": prompt_len + 4, "too_long": "truncate"}).train
    with pytest.raises(PluribusError, match=r"cut 3 of 3 rows to train.max_length=\d+: the kept rows keep \d+ of "
                                            r"\d+ labelled tokens \(\d+\.\d%\), under train.min_kept_labels=0.5"):
        prepare_examples(ds, tokenizer, cfg)
    # cut mildly: allowed, and said
    cfg = Recipe(train={"max_length": prompt_len + 250, "too_long": "truncate"}).train
    with caplog.at_level("WARNING", logger="pluribus.distill"):
        kept, counts = prepare_examples(ds, tokenizer, cfg)
    assert counts["truncated"] == 3 and "train.too_long=truncate cut 3 of 3 rows" in caplog.text
