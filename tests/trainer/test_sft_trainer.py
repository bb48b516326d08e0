"""SFTTrainer behaviour on the tiny offline model: training changes the weights, masks are right, bad input fails."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM

from llm_trainer import SFTConfig, SFTTrainer
from llm_trainer.data.collators import DataCollatorForLanguageModeling
from llm_trainer.testing import get_tokenizer, zen_dataset


def _config(tmp_path, **kwargs) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
    )
    return SFTConfig(**{**defaults, **kwargs})


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "config_name", ["standard_language_modeling", "conversational_language_modeling", "standard_prompt_completion"]
)
def test_training_updates_every_parameter(config_name, tiny_model_path, tmp_path):
    trainer = SFTTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=zen_dataset(config_name))
    before = _params(trainer.model)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param), f"{name} did not change"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert {"entropy", "mean_token_accuracy", "num_tokens"} <= set(logs[0])


def test_default_config_is_named_after_the_model(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SFTTrainer(model=tiny_model_path, train_dataset=zen_dataset("standard_language_modeling"))
    assert trainer.args.output_dir.endswith(f"{os.path.basename(tiny_model_path)}-SFT")
    assert trainer.args.gradient_checkpointing and trainer.args.logging_steps == 10
    # TRL's default, bf16, where bf16 can run; fp32 on a plain CPU run, where TRL's config raises instead
    assert trainer.args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert SFTConfig(str(tmp_path), use_cpu=True).bf16


def test_completion_only_loss_masks_the_prompt(tiny_model_path, tmp_path):
    trainer = SFTTrainer(
        model=tiny_model_path, args=_config(tmp_path), train_dataset=zen_dataset("standard_prompt_completion")
    )
    tokenizer = get_tokenizer()
    row = trainer.train_dataset[0]
    prompt_len = len(tokenizer("Beautiful is better than")["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id  # eos appended to the completion


def test_completion_only_loss_can_be_turned_off(tiny_model_path, tmp_path):
    args = _config(tmp_path, completion_only_loss=False)
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_prompt_completion"))
    assert trainer.train_dataset[0]["labels"] == trainer.train_dataset[0]["input_ids"]


def test_assistant_only_loss_trains_on_assistant_tokens_only(tiny_model_path, tmp_path):
    args = _config(tmp_path, assistant_only_loss=True)
    dataset = zen_dataset("conversational_language_modeling")
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset)
    tokenizer = get_tokenizer()
    row = trainer.train_dataset[0]
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert trained == dataset[0]["messages"][1]["content"] + "<|im_end|>"


def test_pretokenized_dataset_with_completion_mask(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9]] * 4, "completion_mask": [[0, 0, 1, 1, 1]] * 4})
    trainer = SFTTrainer(
        model=tiny_model_path, args=_config(tmp_path, completion_only_loss=True), train_dataset=dataset
    )
    assert trainer.train_dataset[0]["labels"] == [-100, -100, 7, 8, 9]
    trainer.train()


def test_formatting_func(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_preference")
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=_config(tmp_path),
        train_dataset=dataset,
        formatting_func=lambda ex: ex["prompt"] + ex["chosen"],
    )
    expected = get_tokenizer()(dataset[0]["prompt"] + dataset[0]["chosen"] + "<|im_end|>")["input_ids"]
    assert trainer.train_dataset[0]["input_ids"] == expected


def test_truncation_keeps_the_start(tiny_model_path, tmp_path):
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, max_length=3),
        train_dataset=zen_dataset("standard_language_modeling"),
    )
    full = get_tokenizer()(zen_dataset("standard_language_modeling")[0]["text"])["input_ids"]
    assert trainer.train_dataset[0]["input_ids"] == full[:3]


def test_packed_sequences_do_not_attend_to_each_other(tiny_model_path, tmp_path):
    """Log-probs of a packed, padding-free row equal those of each sequence run alone."""
    dataset = zen_dataset("standard_language_modeling")
    trainer = SFTTrainer(
        model=tiny_model_path, args=_config(tmp_path, packing=True, max_length=64), train_dataset=dataset
    )
    assert trainer.padding_free
    row = trainer.train_dataset[0]
    assert len(row["seq_lengths"]) > 1 and sum(row["seq_lengths"]) == len(row["input_ids"])
    batch = trainer.data_collator([row])
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(**batch, token_logprobs=True).log_probs[0]
        start = 0
        for length in row["seq_lengths"]:
            ids = torch.tensor([row["input_ids"][start : start + length]])
            alone = model(input_ids=ids, labels=ids, token_logprobs=True).log_probs[0]
            torch.testing.assert_close(packed[start : start + length - 1], alone, rtol=1e-4, atol=1e-5)
            start += length


def test_eval_metrics_have_eval_prefix(tiny_model_path, tmp_path):
    args = _config(tmp_path, eval_strategy="steps", eval_steps=2)
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=zen_dataset("standard_language_modeling"),
        eval_dataset=zen_dataset("standard_language_modeling", "test"),
    )
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert evals and {"eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens"} <= set(evals[0])


def test_iterable_dataset(tiny_model_path, tmp_path):
    rows = list(zen_dataset("standard_language_modeling"))
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    trainer = SFTTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 2


def test_model_instance_and_tied_llama(tiny_llama_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer = SFTTrainer(
        model=model,
        args=_config(tmp_path),
        train_dataset=zen_dataset("standard_language_modeling"),
        processing_class=get_tokenizer(),
    )
    before = model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.lm_head.weight)


def test_save_writes_model_card(tiny_model_path, tmp_path):
    args = _config(tmp_path, save_strategy="steps", save_steps=2)
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_language_modeling"))
    trainer.train()
    card = (tmp_path / "README.md").read_text()
    assert "SFT" in card and "llm-trainer" in card
    assert (tmp_path / "checkpoint-2").is_dir()


def test_lora_changes_only_the_adapter(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, learning_rate=1.0),
        train_dataset=zen_dataset("standard_language_modeling"),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    before = _params(trainer.model)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(before[name], param), f"{name} did not change"
        else:
            torch.testing.assert_close(before[name], param)


def test_padding_free_collator_restarts_positions():
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]


def test_collator_pads_right_and_masks_padding():
    batch = DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100], [4, 5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


# ------------------------------------------------------------------------------------------------ bad input
def test_dataset_without_usable_column(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"question": ["a"], "answer": ["b"]})
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\].*'text'.*'messages'.*formatting_func"):
        SFTTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=dataset)


def test_empty_dataset(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="train dataset is empty"):
        SFTTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=Dataset.from_dict({"text": []}))


def test_missing_train_dataset(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        SFTTrainer(model=tiny_model_path, args=_config(tmp_path))


@pytest.mark.parametrize("max_length", [0, -5])
def test_max_length_must_be_positive(max_length, tmp_path):
    with pytest.raises(ValueError, match="`max_length` must be a positive number of tokens or None"):
        _config(tmp_path, max_length=max_length)


def test_assistant_only_loss_derives_a_training_template(tiny_model_path, tmp_path):
    # A template without generation markers gets a derived training variant (as TRL swaps in its training
    # templates): only the assistant replies, through their end-of-turn token and the line break after it, are
    # trained on.
    template = tmp_path / "chatml.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    args = _config(tmp_path, assistant_only_loss=True, chat_template_path=str(template))
    dataset = zen_dataset("conversational_language_modeling")
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset)
    assert "generation" in trainer.chat_template
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained == dataset[0]["messages"][1]["content"] + "<|im_end|>\n"


def test_assistant_only_loss_refuses_a_template_without_turns(tiny_model_path, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    args = _config(tmp_path, assistant_only_loss=True, chat_template_path=str(template))
    with pytest.raises(ValueError, match=r"not training-compatible.*\{% generation %\}"):
        SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("conversational_language_modeling"))


def test_assistant_only_loss_needs_conversations(tiny_model_path, tmp_path):
    args = _config(tmp_path, assistant_only_loss=True)
    with pytest.raises(ValueError, match="needs a conversational dataset"):
        SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_language_modeling"))


def test_padding_free_without_packing_needs_no_max_length(tiny_model_path, tmp_path):
    args = _config(tmp_path, padding_free=True)
    with pytest.raises(ValueError, match="set `max_length=None`"):
        SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_language_modeling"))


def test_packing_needs_max_length(tmp_path):
    with pytest.raises(ValueError, match="Packing needs a row length"):
        _config(tmp_path, packing=True, max_length=None)


def test_formatting_func_conflicts_with_completion_only_loss(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="completion_only_loss=False"):
        SFTTrainer(
            model=tiny_model_path,
            args=_config(tmp_path),
            train_dataset=zen_dataset("standard_prompt_completion"),
            formatting_func=lambda ex: ex["prompt"],
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("loss_type", "mse", "`loss_type` must be one of"),
        ("packing_strategy", "greedy", "`packing_strategy` must be one of"),
        ("truncation_mode", "middle", "`truncation_mode` must be one of"),
    ],
)
def test_unknown_option_values(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **{field: value})


def test_unknown_eos_token(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        SFTTrainer(
            model=tiny_model_path,
            args=_config(tmp_path, eos_token="<|nope|>"),
            train_dataset=zen_dataset("standard_language_modeling"),
        )


def test_skip_prepare_with_masks_but_no_labels(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]], "completion_mask": [[0, 1, 1]]})
    args = _config(tmp_path, dataset_kwargs={"skip_prepare_dataset": True})
    with pytest.raises(ValueError, match="Add a 'labels' column"):
        SFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset)
