"""The on-disk cache of precomputed reference log-probs (`llm_trainer.trainer.reference_cache`): a second run of the
same recipe loads the columns and makes no reference forward (counted through `reference_batch_logps`), with
identical columns and per-step losses; a changed reference model, dataset or `max_length` misses; a corrupt file is
recomputed; the cache can be turned off; it lives beside a dataset's own cache files when there are any."""

from __future__ import annotations

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from llm_trainer import BCOConfig, BCOTrainer, DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from llm_trainer.testing import zen_dataset
from llm_trainer.trainer import reference_cache

COMMON = dict(
    report_to="none",
    max_steps=2,
    learning_rate=1e-2,
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    disable_tqdm=True,
    dataloader_pin_memory=False,
    precompute_ref_log_probs=True,
)
TRAINERS = {
    "dpo": (
        DPOTrainer,
        DPOConfig,
        "standard_preference",
        dict(per_device_train_batch_size=4, precompute_ref_batch_size=8),
    ),
    "kto": (
        KTOTrainer,
        KTOConfig,
        "standard_unpaired_preference",
        dict(per_device_train_batch_size=4, precompute_ref_batch_size=8),
    ),
    "bco": (
        BCOTrainer,
        BCOConfig,
        "standard_unpaired_preference",
        dict(per_device_train_batch_size=8),
    ),  # no batch field
}


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LLM_TRAINER_CACHE", str(root))
    monkeypatch.delenv("LLM_TRAINER_REF_CACHE", raising=False)
    return root / reference_cache.CACHE_SUBDIR


@pytest.fixture
def forwards(monkeypatch) -> dict[str, int]:
    """Counts the batches each trainer class's reference pass runs."""
    counts: dict[str, int] = {}
    for key, (trainer_cls, *_) in TRAINERS.items():
        original = trainer_cls.reference_batch_logps

        def counted(self, batch, _original=original, _key=key):
            counts[_key] = counts.get(_key, 0) + 1
            return _original(self, batch)

        monkeypatch.setattr(trainer_cls, "reference_batch_logps", counted)
    return counts


def _build(algo, model, tmp_path, dataset=None, eval_dataset=None, ref_model=None, **overrides):
    trainer_cls, config_cls, config, defaults = TRAINERS[algo]
    args = config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, **defaults, **overrides})
    dataset = zen_dataset(config) if dataset is None else dataset
    return trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=dataset, eval_dataset=eval_dataset)


def _columns(trainer, dataset=None) -> dict[str, list[float]]:
    dataset = trainer.train_dataset if dataset is None else dataset
    return {c: list(dataset[c]) for c in trainer.reference_columns if c in dataset.column_names}


def _losses(trainer) -> list[float]:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("algo", ["dpo", "kto", "bco"])
def test_second_run_loads_the_columns_without_a_reference_forward(algo, tiny_model_path, tmp_path, forwards):
    eval_dataset = zen_dataset(TRAINERS[algo][2], "test")
    first = _build(algo, tiny_model_path, tmp_path, eval_dataset=eval_dataset)
    computed = forwards.pop(algo)
    assert computed >= 2  # the train and the eval dataset
    first_columns, first_eval = _columns(first), _columns(first, first.eval_dataset)
    assert set(first_columns) == set(first.reference_columns) or algo != "dpo"
    assert first_columns and first_eval
    first_losses = _losses(first)

    second = _build(algo, tiny_model_path, tmp_path, eval_dataset=eval_dataset)
    assert forwards.get(algo, 0) == 0  # every column came from disk
    assert _columns(second) == first_columns  # exactly: the values are stored as float64
    assert _columns(second, second.eval_dataset) == first_eval
    assert second.train_dataset.column_names == first.train_dataset.column_names
    assert _losses(second) == first_losses


def test_cache_misses_when_what_the_log_probs_depend_on_changes(tiny_model_path, tmp_path, forwards, cache_root):
    first = _build("dpo", tiny_model_path, tmp_path)
    base = _columns(first)
    assert forwards.pop("dpo") > 0 and len(list(cache_root.glob("*.safetensors"))) == 1

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    same = _build("dpo", tiny_model_path, tmp_path, ref_model=ref_model)  # a separate reference is keyed apart
    assert forwards.pop("dpo") > 0
    torch.testing.assert_close(
        torch.tensor(_columns(same)["ref_chosen_logps"]), torch.tensor(base["ref_chosen_logps"])
    )
    with torch.no_grad():
        ref_model.lm_head.weight.mul_(0.9)  # same name and shapes, other weights
    scaled = _build("dpo", tiny_model_path, tmp_path, ref_model=ref_model)
    assert forwards.pop("dpo") > 0
    assert _columns(scaled)["ref_chosen_logps"] != base["ref_chosen_logps"]

    _build("dpo", tiny_model_path, tmp_path, dataset=zen_dataset("standard_preference").select(range(16)))
    assert forwards.pop("dpo") > 0  # another dataset
    _build("dpo", tiny_model_path, tmp_path, max_length=12)
    assert forwards.pop("dpo") > 0  # truncated in the collator: same dataset, other inputs
    assert len(list(cache_root.glob("*.safetensors"))) == 5

    _build("dpo", tiny_model_path, tmp_path)  # the first recipe still hits
    assert forwards.get("dpo", 0) == 0


def test_corrupt_or_foreign_cache_is_recomputed_with_a_warning(tiny_model_path, tmp_path, forwards, cache_root):
    first = _build("kto", tiny_model_path, tmp_path)
    expected = _columns(first)
    forwards.pop("kto")
    (path,) = cache_root.glob("*.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial write
    with pytest.warns(UserWarning, match="Ignoring the cached reference log-probs"):
        again = _build("kto", tiny_model_path, tmp_path)
    assert forwards.pop("kto") > 0 and _columns(again) == expected

    data = bytearray(path.read_bytes())  # rewritten whole by the recomputation
    data[-3] ^= 0xFF  # a flipped bit inside the values: caught by the checksum
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        _build("kto", tiny_model_path, tmp_path)
    assert forwards.pop("kto") > 0
    _build("kto", tiny_model_path, tmp_path)
    assert forwards.get("kto", 0) == 0
    assert not list(cache_root.glob(".*.tmp"))  # no temporary file left behind


def test_cache_can_be_turned_off(tiny_model_path, tmp_path, forwards, cache_root, monkeypatch):
    monkeypatch.setenv("LLM_TRAINER_REF_CACHE", "0")
    _build("dpo", tiny_model_path, tmp_path)
    _build("dpo", tiny_model_path, tmp_path)
    assert forwards["dpo"] == 2 * 3  # 17 rows in batches of 8, both runs
    assert not cache_root.exists()


def test_cache_lives_beside_the_datasets_cache_files(tiny_model_path, tmp_path, forwards, monkeypatch):
    monkeypatch.delenv("LLM_TRAINER_CACHE")
    zen_dataset("standard_preference").save_to_disk(str(tmp_path / "saved"))
    dataset = load_from_disk(str(tmp_path / "saved"))
    assert dataset.cache_files
    _build("dpo", tiny_model_path, tmp_path, dataset=dataset)
    folders = {p.parent for p in tmp_path.glob("saved/**/*.safetensors")}
    assert folders and all(f.name == "llm_trainer_ref_logps" for f in folders)
    forwards.pop("dpo")
    _build("dpo", tiny_model_path, tmp_path, dataset=load_from_disk(str(tmp_path / "saved")))
    assert forwards.get("dpo", 0) == 0


def test_model_fingerprint_full_and_sampled(tiny_model_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    full = reference_cache.model_fingerprint(model)
    assert reference_cache.model_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_model_path)) == full
    monkeypatch.setattr(reference_cache, "FULL_HASH_BYTES", 0)  # hash sampled elements, as for a large model
    sampled = reference_cache.model_fingerprint(model)
    assert sampled != full
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1e-3)  # a trained checkpoint moves every element
    assert reference_cache.model_fingerprint(model) != sampled


def test_peft_policy_as_its_reference_is_keyed_by_the_base_weights(tiny_model_path, tmp_path, forwards):
    peft = pytest.importorskip("peft")
    lora = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    trainer_cls, config_cls, config, defaults = TRAINERS["dpo"]
    args = config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, **defaults})

    def build(**options):
        return trainer_cls(
            model=tiny_model_path,
            args=args,
            train_dataset=zen_dataset(config),
            peft_config=peft.LoraConfig(**lora, **options),
        )

    first = build(r=4)
    assert forwards.pop("dpo") > 0
    # Adapters disabled: the reference is the base model, whatever the (fresh) adapter's rank or initialisation.
    second = build(r=8, lora_alpha=32)
    assert forwards.get("dpo", 0) == 0
    assert _columns(second) == _columns(first)


def test_unwritable_cache_only_warns(tiny_model_path, tmp_path, forwards, monkeypatch):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    monkeypatch.setenv("LLM_TRAINER_CACHE", str(blocker))  # the cache folder cannot be created under a file
    with pytest.warns(UserWarning, match="Could not cache the reference log-probs"):
        trainer = _build("dpo", tiny_model_path, tmp_path)
    assert forwards["dpo"] > 0 and set(trainer.reference_columns) <= set(trainer.train_dataset.column_names)
