"""Behaviour of TRL's `trl.trainer.utils` helpers at `llm_trainer.trainer.utils` (offline, CPU)."""

import asyncio
import functools
import io
import os
import socket
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_trainer.testing import make_tiny_model
from llm_trainer.trainer import utils


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_trainer_package_exports_trl_names():
    from llm_trainer.trainer import add_fused_lm_head, disable_dropout_in_model, ensure_master_addr_port

    assert add_fused_lm_head is utils.add_fused_lm_head
    assert disable_dropout_in_model is utils.disable_dropout_in_model
    assert ensure_master_addr_port is utils.ensure_master_addr_port


def test_ensure_master_addr_port(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "auto")
    utils.ensure_master_addr_port()
    assert os.environ["MASTER_ADDR"] == "localhost"
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as s:  # the chosen port is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    utils.ensure_master_addr_port("other", None)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.1", "1234")
    utils.ensure_master_addr_port(port=4321)
    assert os.environ["MASTER_PORT"] == "4321"


def test_maybe_gather_lm_head_ctx_is_null_without_zero3():
    weight = torch.nn.Parameter(torch.ones(2, 2))
    with utils.maybe_gather_lm_head_ctx(weight, None) as value:
        assert value is None


def test_callable_name_and_async_detection():
    def reward(completions, threshold):
        return completions

    async def async_reward(completions):
        return completions

    class Scorer:
        def __call__(self, completions):
            return completions

    class AsyncScorer:
        async def __call__(self, completions):
            return completions

    nested = functools.partial(functools.partial(reward), threshold=0.5)
    assert utils.get_callable_name(nested) == "reward"
    assert utils.get_callable_name(Scorer()) == "Scorer"
    assert utils.get_callable_name(lambda c: c) == "<lambda>"
    assert utils.is_async_callable(async_reward) and utils.is_async_callable(functools.partial(async_reward))
    assert utils.is_async_callable(AsyncScorer()) and not utils.is_async_callable(Scorer())
    assert not utils.is_async_callable(reward)
    assert utils.identity(nested) is nested


def test_generate_model_card_renders_metadata_and_credits_llm_trainer():
    card = str(
        utils.generate_model_card(
            base_model="user/base",
            model_name="my_model",
            hub_model_id="user/hub",
            dataset_name="user/data",
            tags=["sft"],
            wandb_url="https://wandb.ai/run",
            trackio_url="https://trackio/space",
            trainer_name="SFT",
            trainer_citation="@article{x, ...}",
            paper_title="Paper",
            paper_id="1234.56789",
            comet_url="https://comet/exp",
        )
    )
    for piece in (
        "[user/base](https://huggingface.co/user/base)",
        'pipeline("text-generation", model="user/hub", device_map="auto")',
        "datasets: user/data",
        "- generated_from_trainer\n- sft",
        "](https://wandb.ai/run)",
        "](https://trackio/space)",
        "](https://comet/exp)",
        "```bibtex\n@article{x, ...}\n```",
        "[Paper](https://huggingface.co/papers/1234.56789)",
        "llm-trainer",
    ):
        assert piece in card
    bare = str(utils.generate_model_card(None, "m", "u/m", None, [], None, None, "DPO"))
    assert "DPO" in bare and "bibtex" not in bare and "papers/" not in bare
    reward = str(
        utils.generate_model_card(None, "m", "u/m", None, [], None, None, "Reward", template_file="rm_model_card.md")
    )
    assert '"text-classification"' in reward
    with pytest.raises(FileNotFoundError):
        utils.generate_model_card(None, "m", "u/m", None, [], None, None, "X", template_file="nope.md")


def test_trackers_without_runs():
    assert utils.get_comet_experiment_url() is None
    assert utils.get_trackio_space_url() is None
    from transformers import is_comet_available

    if not is_comet_available():
        with pytest.raises(ModuleNotFoundError, match="comet"):
            utils.log_table_to_comet_experiment("t.csv", None)


def test_flush_left():
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    values = torch.tensor([[9, 9, 2, 3, 4], [9, 5, 6, 9, 9]])
    new_mask, new_values = utils.flush_left(mask, values)
    assert torch.equal(new_mask, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(new_values, torch.tensor([[2, 3, 4], [5, 6, 9]]))
    assert torch.equal(utils.flush_left(torch.tensor([[1, 1, 0]])), torch.tensor([[1, 1]]))
    assert mask[0, 0] == 0  # inputs untouched


def test_split_and_shuffle_dicts():
    batch = {"x": torch.arange(12).view(6, 2), "y": list("abcdef"), "none": None, "scalar": torch.tensor(3.0), "n": 7}
    chunks = utils.split_tensor_dict(batch, 3)
    assert [c["y"] for c in chunks] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert torch.equal(chunks[2]["x"], torch.tensor([[8, 9], [10, 11]]))
    assert all(c["none"] is None and c["scalar"] is batch["scalar"] and c["n"] == 7 for c in chunks)
    torch.manual_seed(0)
    shuffled = utils.shuffle_sequence_dict(batch)
    order = shuffled["x"][:, 0] // 2
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    assert shuffled["y"] == [batch["y"][i] for i in order.tolist()]
    assert shuffled["none"] is None and shuffled["scalar"] is batch["scalar"] and shuffled["n"] == 7


def test_split_and_unsplit_pixel_values():
    qwen = {
        "num_images": [1, 2],
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 1, 2], [1, 1, 1]]),
        "pixel_values": torch.arange(7 * 3).view(7, 3),
    }
    split = utils.split_pixel_values_by_grid(qwen)
    assert [p.shape[0] for p in split["pixel_values"]] == [4, 3]
    assert [g.shape[0] for g in split["image_grid_thw"]] == [1, 2]
    merged = utils.unsplit_pixel_values_by_grid(split)
    assert torch.equal(merged["pixel_values"], qwen["pixel_values"])
    assert torch.equal(merged["image_grid_thw"], qwen["image_grid_thw"])
    with pytest.raises(ValueError, match="Mismatch"):
        utils.split_pixel_values_by_grid({**qwen, "pixel_values": torch.zeros(6, 3)})
    llava = {"num_images": [2, 1], "pixel_values": torch.zeros(3, 4), "image_sizes": torch.ones(3, 2)}
    split = utils.split_pixel_values_by_grid(llava)
    assert [p.shape[0] for p in split["pixel_values"]] == [2, 1] and len(split["image_sizes"]) == 2
    padded = {"num_images": [2, 1], "pixel_values": torch.zeros(2, 5)}
    assert utils.split_pixel_values_by_grid(padded) is padded
    assert utils.split_pixel_values_by_grid({"pixel_values": 1}) == {"pixel_values": 1}
    gemma = {"num_images": [1, 1], "pixel_values": torch.zeros(2, 3), "image_position_ids": torch.arange(2)}
    assert len(utils.split_pixel_values_by_grid(gemma)["image_position_ids"]) == 2


def test_remove_none_values_and_strip_images():
    example = [{"a": {"aa": None, "ab": 1}, "b": "s", "c": [None, {"d": None}]}]
    assert utils.remove_none_values(example) == [{"a": {"ab": 1}, "b": "s", "c": [None, {}]}]
    with pytest.raises(TypeError):
        utils.remove_none_values("text")
    messages = [{"role": "user", "content": [{"type": "image", "image": object()}, {"type": "text", "text": "hi"}]}]
    assert utils.strip_images_from_messages(messages) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    ]
    assert "image" in messages[0]["content"][0]  # the input is not modified
    assert utils.strip_images_from_messages("plain") == "plain"


def test_selective_log_softmax_and_entropy_wrapper():
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 11, (2, 3))
    logps, entropy = utils.selective_log_softmax_and_entropy(
        logits, index, entropy_requires_grad=False, temperature=2.0
    )
    log_p = (logits / 2.0).log_softmax(-1)
    torch.testing.assert_close(logps, log_p.gather(-1, index[..., None])[..., 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), rtol=1e-5, atol=1e-6)
    assert logps.dtype == torch.float64 and logps.requires_grad and not entropy.requires_grad


def test_print_prompt_completions_sample(monkeypatch):
    from rich.console import Console

    buffer = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda: Console(file=buffer, width=100))
    prompts = ["The sky is", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]]
    completions = [
        " blue.",
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get", "arguments": '{"city": "Paris"}'}}],
            }
        ],
    ]
    utils.print_prompt_completions_sample(
        prompts, completions, {"Correct": [0.123, 0.456]}, [0.987, -0.5], 42, extra={"source": ["A", "B"]}
    )
    out = buffer.getvalue()
    for piece in (
        "Step 42",
        "Prompt",
        "Completion",
        "Correct",
        "Advantage",
        "source",
        "0.12",
        "0.99",
        "-0.50",
        "USER",
        "[IMAGE]",
        "get(city='Paris')",
        "B",
    ):
        assert piece in out
    buffer.truncate(0)
    buffer.seek(0)
    utils.print_prompt_completions_sample(["p"], ["c"], {}, None, 1)
    assert "Advantage" not in buffer.getvalue()
    buffer.truncate(0)
    buffer.seek(0)
    utils.print_prompt_completions_sample(["p", "q", "r"], ["c", "d", "e"], {}, None, 1, num_samples=0)
    assert buffer.getvalue() == ""


def test_create_model_from_path_hash_and_config_id(tiny_path):
    model = utils.create_model_from_path(tiny_path)
    assert model.dtype == torch.float32 and type(model).__name__.endswith("ForCausalLM")
    half = utils.create_model_from_path(tiny_path, AutoModelForCausalLM, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        utils.create_model_from_path(tiny_path, dtype="float8")
    assert utils.get_config_model_id(model.config) == tiny_path
    again = utils.create_model_from_path(tiny_path)
    assert utils.hash_module(model) == utils.hash_module(again)
    with torch.no_grad():
        again.lm_head.weight.add_(0.01)
    assert utils.hash_module(model) != utils.hash_module(again)
    assert utils.hash_module(model) != utils.hash_module(half)


def test_use_adapter(tiny_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_path),
        peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.tensor([[1, 2, 3]])
    with model.disable_adapter():
        base = model(ids).logits
    with utils.use_adapter(model, None):
        assert torch.equal(model(ids).logits, base)
    with utils.use_adapter(model, "other"):
        assert model.active_adapter == "other"
    assert model.active_adapter == "default"


def test_global_then_local_main_first_runs_block():
    ran = []
    with utils.global_then_local_main_first():
        ran.append(True)
    assert ran == [True]


def test_event_loop_in_daemon():
    thread, loop, ready = utils.start_event_loop_in_daemon(name="test-loop")
    assert ready.wait(5) and thread.daemon and thread.name == "test-loop"

    async def double(x):
        return 2 * x

    assert asyncio.run_coroutine_threadsafe(double(21), loop).result(5) == 42
    utils.shutdown_event_loop_in_daemon(thread, loop)
    assert not thread.is_alive()
    utils.shutdown_event_loop_in_daemon(None, None)  # a no-op


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_add_fused_lm_head_matches_logits(tiny_path, temperature):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        log_p = (model(input_ids=ids).logits[:, :-1].double() / temperature).log_softmax(-1)
    utils.add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy", "is_top1"))
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert isinstance(out, utils.FusedCausalLMOutput)
    mask = labels[:, 1:] != -100
    ref = log_p.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * mask
    torch.testing.assert_close(out.log_probs.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.entropy.double(), -(log_p.exp() * log_p).sum(-1) * mask, rtol=1e-4, atol=1e-4)
    assert out.mean_logits is None and out.log_sum_sq_probs is None and torch.equal(out.label_mask, mask)
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / mask.sum())
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=4)
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / 4)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    shifted = model(input_ids=ids[:, :-1], shift_labels=labels[:, 1:], fused_lm_head=True)
    torch.testing.assert_close(shifted.log_probs, out.log_probs.detach(), rtol=1e-5, atol=1e-5)
    plain = model(input_ids=ids, labels=ids)  # the original forward
    assert plain.logits.shape[-1] == model.config.vocab_size and plain.loss is not None
    with pytest.raises(ValueError, match="Unknown outputs"):
        utils.add_fused_lm_head(model, outputs=("logits",))


def test_flops_and_mfu():
    dense = AutoConfig.for_model(
        "qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        head_dim=16,
    )
    f1, f2, f4 = (utils.compute_flops_per_token(dense, n) for n in (1024, 2048, 4096))
    assert f4 - f2 == 2 * (f2 - f1) > 0
    per_layer_attn_score = 3 * 2 * 2 * 4 * 16  # fwd+bwd, QK^T and AV, per token of context
    assert f2 - f1 == dense.num_hidden_layers * per_layer_attn_score * 1024
    moe = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        num_experts=8,
        num_experts_per_tok=1,
        decoder_sparse_step=1,
    )
    low = utils.compute_flops_per_token(moe, 256)
    moe.num_experts_per_tok = 2
    assert utils.compute_flops_per_token(moe, 256) - low == 3 * 2 * (2 * 3 * 64 * 32)
    assert utils.compute_mfu(100e9, 989e12 * 8 / 100e9, 8, 989e12) == pytest.approx(100.0)
    adjusted = utils.adjusted_mfu(100.0, dense, 2048)
    half = dense.num_hidden_layers * 3 * 2 * 4 * 16 * 2048
    assert adjusted == pytest.approx(100.0 * (f2 - half) / f2)
    assert utils.adjusted_mfu(50.0, dense, 2048) == pytest.approx(adjusted / 2)
    assert utils.get_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert utils.get_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert utils.get_peak_flops("NVIDIA A100-SXM4-80GB", "float16") == 312e12
    assert utils.get_peak_flops("Tesla T4", "bfloat16") is None and utils.get_peak_flops("CPU", "bfloat16") is None
    accelerator = SimpleNamespace(device="cuda:0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA L4")
        assert utils.get_peak_flops_per_device(accelerator, "bfloat16") == 121e12


def test_profiling_and_distributed_twins():
    from llm_trainer.distributed import DistributedBackend
    from llm_trainer.extras.profiling import ProfilingContext, profiling_context, profiling_decorator

    logged = []

    class FakeTrainer:
        args = SimpleNamespace(report_to=[])
        state = SimpleNamespace(global_step=3)
        accelerator = SimpleNamespace(is_main_process=True, state=SimpleNamespace(deepspeed_plugin=None))

        @profiling_decorator
        def work(self, x):
            return x + 1

    trainer = FakeTrainer()
    assert trainer.work(1) == 2 and FakeTrainer.work.__name__ == "work"
    context = profiling_context(trainer, "step")
    assert (context.name, context.step) == ("FakeTrainer.step", 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProfilingContext, "_log_metrics", lambda self, duration: logged.append((self.name, duration)))
        with pytest.raises(RuntimeError):
            with ProfilingContext("block", report_to=[]):
                raise RuntimeError("propagates")
    assert logged and logged[0][0] == "block" and logged[0][1] >= 0
    backend = DistributedBackend(trainer.accelerator)
    assert (backend.zero_stage, backend.is_zero3, backend.is_fsdp) == (0, False, False)
    with backend.gather_params([]), backend.summon_full_params(torch.nn.Linear(1, 1)):
        pass
    zero3 = DistributedBackend(
        SimpleNamespace(
            state=SimpleNamespace(
                deepspeed_plugin=SimpleNamespace(zero_stage=3), fsdp_plugin=SimpleNamespace(fsdp_version=2)
            )
        )
    )
    assert zero3.is_zero3 and zero3.is_fsdp and zero3.fsdp_version == 2
