"""`llm-trainer train-serve` + `llm_trainer.remote` against a real server process on the tiny model: log-probs, LoRA
sessions, the custom-loss path, sampler snapshots, state round trips, and the errors bad requests get."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.remote import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, TensorData

SEQUENCES = [[5, 17, 42, 8, 99, 3], [7, 7, 12, 250, 31], [11, 64, 2]]


def datums(weights_scale: float = 1.0) -> list[Datum]:
    return [
        Datum(ModelInput.from_ints(s[:-1]), {"target_tokens": s[1:], "weights": [weights_scale] * (len(s) - 1)})
        for s in SEQUENCES
    ]


def local_logprobs(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([sequence[:-1]])).logits[0]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(sequence[1:])[:, None]).squeeze(-1)


def lps(output) -> list[torch.Tensor]:
    return [out["logprobs"].to_torch() for out in output.loss_fn_outputs]


@pytest.fixture
def service(train_server):
    return ServiceClient(train_server[0])


def test_forward_gives_the_models_logprobs_and_forward_backward_their_weighted_sum(service, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with service.create_training_client(tiny_model_path) as client:
        assert client.info["lora_rank"] is None
        assert client.info["trainable_parameters"] == client.info["total_parameters"]
        forward = client.forward(datums()).result()
        for got, sequence in zip(lps(forward), SEQUENCES):
            torch.testing.assert_close(got, local_logprobs(model, sequence), rtol=1e-5, atol=1e-5)
        backward = client.forward_backward(datums(0.5), "cross_entropy").result()
        expected = -0.5 * sum(local_logprobs(model, s).sum() for s in SEQUENCES)
        assert backward.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-5)
    assert not [t for t in threading.enumerate() if t.name.startswith("llm-trainer-remote")]


def lora_run(service, model_path, seed, steps=2):
    with service.create_lora_training_client(model_path, rank=4, seed=seed) as client:
        for _ in range(steps):
            client.forward_backward(datums(), "cross_entropy")
            client.optim_step(AdamParams(learning_rate=0.05))
        return lps(client.forward(datums()).result())


def test_lora_adapters_initialise_from_the_seed(service, tiny_model_path):
    first, again, other = (lora_run(service, tiny_model_path, seed) for seed in (1, 1, 2))
    for a, b, c in zip(first, again, other):
        torch.testing.assert_close(a, b)
        assert (a - c).abs().max() > 1e-4


def test_lora_session_trains_only_the_adapter(service, tiny_model_path):
    with service.create_lora_training_client(tiny_model_path, rank=4) as client:
        info = client.get_info()
        assert info["is_lora"] and info["lora_rank"] == 4
        assert 0 < info["trainable_parameters"] < info["total_parameters"]
        before = lps(client.forward(datums()).result())
        client.forward_backward(datums(), "cross_entropy")
        # LoRA's B starts at 0: the first step moves B only, so logits move from the second step on
        for _ in range(2):
            client.forward_backward(datums(), "cross_entropy")
            step = client.optim_step(AdamParams(learning_rate=0.05)).result()
        assert step.step == 2 and step.metrics["grad_norm"] > 0
        after = lps(client.forward(datums()).result())
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(after, before))
        path = client.save_state("lora").result().path
    state = torch.load(f"{path}/state.pt", weights_only=True)
    assert state["weights"] and all("lora_" in name for name in state["weights"])
    assert state["lora_rank"] == 4 and state["step"] == 2


def test_custom_loss_path_equals_the_builtin_loss(service, tiny_model_path):
    """forward_backward_custom (gradient of a client-side loss sent back as a linear loss) takes the same step as
    the built-in cross-entropy with the same weights."""

    def custom(data, logprobs):
        loss = -sum((lp * d.loss_fn_inputs["weights"].to_torch()).sum() for lp, d in zip(logprobs, data))
        return loss, {"custom": 1.0}

    results = []
    for use_custom in (False, True):
        with service.create_training_client(tiny_model_path) as client:  # a new session: the base weights again
            if use_custom:
                out = client.forward_backward_custom(datums(0.1), custom).result()
                assert out.metrics["custom"] == 1.0
            else:
                out = client.forward_backward(datums(0.1), "cross_entropy").result()
            client.optim_step(AdamParams(learning_rate=0.01, beta2=0.999, eps=1e-8)).result()
            results.append((out.metrics["loss:sum"], lps(client.forward(datums()).result())))
    (loss_a, after_a), (loss_b, after_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for a, b in zip(after_a, after_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_sampler_snapshots_and_state_round_trip(service, tiny_model_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert service.get_server_capabilities() == {"supported_models": [{"model_name": tiny_model_path}]}
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    prompt = ModelInput.from_ints(SEQUENCES[0])
    with service.create_training_client(tiny_model_path) as client:
        initial = client.save_weights_and_get_sampling_client("initial")
        first = initial.sample(prompt, 2, greedy).result().sequences
        assert first[0].tokens == first[1].tokens and len(first[0].logprobs) == len(first[0].tokens)
        assert all(lp <= 0 for lp in first[0].logprobs)
        seeded = [initial.sample(prompt, 3, SamplingParams(max_tokens=6, seed=5)).result() for _ in range(2)]
        assert [s.tokens for s in seeded[0].sequences] == [s.tokens for s in seeded[1].sequences]

        saved = client.save_state("start").result().path
        start = lps(client.forward(datums()).result())
        for _ in range(3):
            client.forward_backward(datums(), "cross_entropy")
            client.optim_step(AdamParams(learning_rate=0.1))
        trained = lps(client.forward(datums()).result())
        assert any((a - b).abs().max() > 1e-2 for a, b in zip(trained, start))
        # the snapshot still samples (and scores) the weights it was taken with
        assert initial.sample(prompt, 1, greedy).result().sequences[0].tokens == first[0].tokens
        scored = initial.compute_logprobs(ModelInput.from_ints(SEQUENCES[1])).result()
        assert scored[0] is None
        torch.testing.assert_close(torch.tensor(scored[1:]), local_logprobs(base, SEQUENCES[1]), rtol=1e-5, atol=1e-5)
        assert client.load_state(saved).result()["step"] == 0
        for a, b in zip(lps(client.forward(datums()).result()), start):
            torch.testing.assert_close(a, b)


def test_bad_requests_name_the_field(service, tiny_model_path, train_server):
    with service.create_training_client(tiny_model_path) as client:
        bad = Datum(ModelInput.from_ints([1, 2, 3]), {"target_tokens": [2, 3], "weights": [1.0, 1.0]})
        with pytest.raises(ValueError, match=r"HTTP 400.*data\[0\]\.loss_fn_inputs\.target_tokens has 2 values"):
            client.forward_backward([bad]).result()
        with pytest.raises(ValueError, match=r"data\[0\]\.loss_fn_inputs\.logprobs is missing"):
            client.forward_backward(datums()[:1], "ppo").result()
        with pytest.raises(ValueError, match="`loss_fn` must be one of cross_entropy, importance_sampling, ppo"):
            client.forward_backward(datums(), "mse").result()
        with pytest.raises(ValueError, match=r"not options of 'ppo'"):
            data = [Datum(d.model_input, {**d.loss_fn_inputs, "logprobs": [0.0] * d.model_input.length,
                                          "advantages": [1.0] * d.model_input.length}) for d in datums()]  # fmt: skip
            client.forward_backward(data, "ppo", {"clip": 0.1}).result()
        huge = Datum(ModelInput.from_ints([1, 10**6]), {"target_tokens": [2, 3], "weights": [1.0, 1.0]})
        with pytest.raises(ValueError, match=r"data\[0\]\.model_input tokens must be token ids in \[0, "):
            client.forward([huge]).result()
        with pytest.raises(ValueError, match=r"adam_params\.learning_rate must be a number >= 0"):
            client.optim_step(AdamParams(learning_rate=-1.0)).result()
        with pytest.raises(ValueError, match=r"sampling_params: temperature must be >= 0"):
            service.create_sampling_client().sample(
                ModelInput.from_ints([1]), 1, SamplingParams(temperature=-1)
            ).result()
        with pytest.raises(ValueError, match="`model_path`.*no such snapshot"):
            service.create_sampling_client("llm-trainer://sampler/nope").sample(ModelInput.from_ints([1])).result()
        with pytest.raises(ValueError, match=r"`path` 'missing' holds no saved state"):
            client.load_state("missing").result()
        with pytest.raises(TypeError, match="a list of Datum"):
            client.forward(datums()[0])
        with pytest.raises(TypeError, match="TensorData"):
            TensorData.coerce("text")
    with pytest.raises(ValueError, match="`base_model` 'other/model' is not served here"):
        service.create_training_client("other/model")
    old = service.create_training_client(tiny_model_path)
    service.create_training_client(tiny_model_path).close()
    with pytest.raises(ValueError, match="`session_id` .* is not the current session"):
        old.forward(datums()).result()
    old.close()
    with pytest.raises(RuntimeError, match="HTTP 404.*POST /create_model/"):
        service._http.post("nope", {})


def test_lora_rank_and_micro_batch_flags_and_the_process_is_gone_at_the_end(
    tiny_model_path, start_train_serve, service
):
    """`--micro_batch_size 1` runs each datum alone and sums the gradients: the same steps as one batch."""
    expected = lora_run(service, tiny_model_path, seed=3)
    with start_train_serve(tiny_model_path, "--lora_rank", "4", "--micro_batch_size", "1") as (url, process):
        chunked = ServiceClient(url)
        assert chunked.health()["lora_rank"] == 4
        with pytest.raises(ValueError, match="`lora_rank` must be 4: this server was started with --lora_rank 4"):
            chunked.create_training_client(tiny_model_path)
        for a, b in zip(lora_run(chunked, tiny_model_path, seed=3), expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert process.poll() is not None
    with pytest.raises(ConnectionError, match=f"training service at {url} is not reachable"):
        ServiceClient(url, timeout=2).health()


def test_cli_flags(capsys):
    from llm_trainer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train-serve", "--model", "m", "--lora_rank", "0"])
    assert "--lora_rank must be a positive integer, got 0" in str(exit_info.value)
    with pytest.raises(SystemExit):
        main(["train-serve", "--model", "m", "--nope", "1"])
    assert "unrecognized arguments: --nope 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-serve", "--help"])
    assert "--lora_rank" in capsys.readouterr().out
