"""Judges: the base-class contract, AllTrueJudge, shuffle mapping, and the real judges against real models/servers.

The HTTP judges talk to a small OpenAI-shaped server started here on a free port (`http.server` in a thread); it
judges by reading the question it receives, so shuffled pairs really reach it in swapped order.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import llm_trainer
from llm_trainer.judges import (
    AllTrueJudge,
    BaseBinaryJudge,
    BaseJudge,
    BasePairwiseJudge,
    BaseRankJudge,
    HfPairwiseJudge,
    JudgeRequestError,
    OpenAIPairwiseJudge,
    PairRMJudge,
)
from llm_trainer.trainer.utils import free_port

MARK = "<<best>>"
# A question format the fake server can parse back into (prompt, answer 0, answer 1).
TEST_SYSTEM_PROMPT = "P=[{prompt}] A0=[{response0}] A1=[{response1}] Reply 0 or 1."

PROMPTS = ["What is 2+2?", "Name a colour.", "Say hi.", "Capital of France?", "Pick a fruit."]
PAIRS = [
    ["4", f"4 {MARK}"],
    [f"blue {MARK}", "a colour"],
    ["hello", f"hi {MARK}"],
    [f"Paris {MARK}", "Lyon"],
    [f"apple {MARK}", "rock"],
]
EXPECTED = [int(MARK in pair[1]) for pair in PAIRS]


# ---------------------------------------------------------------------------------------------------------------------
# The base classes


def test_bases_are_abstract():
    for base in (BaseJudge, BaseRankJudge, BasePairwiseJudge, BaseBinaryJudge):
        with pytest.raises(TypeError):
            base()

    class NoJudge(BasePairwiseJudge):
        pass

    with pytest.raises(TypeError):
        NoJudge()
    assert issubclass(BasePairwiseJudge, BaseJudge) and issubclass(BaseBinaryJudge, BaseJudge)
    for name in ("BaseJudge", "BasePairwiseJudge", "BaseBinaryJudge", "BaseRankJudge", "AllTrueJudge", "PairRMJudge"):
        assert name in llm_trainer.__all__
        assert getattr(llm_trainer, name) is getattr(llm_trainer.judges, name)


def test_rank_judge_contract():
    class ByLength(BaseRankJudge):  # a test fixture: ranks longer completions first
        def judge(self, prompts, completions, shuffle_order=True):
            return [sorted(range(len(c)), key=lambda i: -len(c[i])) for c in completions]

    assert ByLength().judge(["p", "q"], [["a", "ccc", "bb"], ["x", "yy"]]) == [[1, 2, 0], [1, 0]]


class Constant(BaseBinaryJudge):
    """A binary judge returning fixed verdicts, recording what it was asked."""

    def __init__(self, verdicts):
        self.verdicts = verdicts
        self.calls = []

    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        self.calls.append((list(prompts), list(completions), gold_completions, shuffle_order))
        return list(self.verdicts)


def test_all_true_judge_combines_binary_judges():
    a = Constant([1, 1, 0, 1, -1, 0])
    b = Constant([1, 0, 0, -1, 1, -1])
    c = Constant([1, 1, 1, 1, 1, 1])
    prompts, completions = list("abcdef"), list("ABCDEF")
    assert AllTrueJudge([a, b, c]).judge(prompts, completions) == [1, 0, 0, -1, -1, -1]
    # gold completions and shuffle_order reach every inner judge
    AllTrueJudge([a, b]).judge(prompts, completions, gold_completions=list("gggggg"), shuffle_order=False)
    assert a.calls[-1] == (prompts, completions, list("gggggg"), False) == b.calls[-1]
    assert AllTrueJudge([Constant(np.array([1, 0]))]).judge(["p", "q"], ["x", "y"]) == [1, 0]


def test_all_true_judge_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        AllTrueJudge([])
    with pytest.raises(ValueError, match="0, 1 or -1"):
        AllTrueJudge([Constant([1, 2])]).judge(["p", "q"], ["x", "y"])
    with pytest.raises(ValueError, match="returned 1 verdicts for 2 prompts"):
        AllTrueJudge([Constant([1])]).judge(["p", "q"], ["x", "y"])


# ---------------------------------------------------------------------------------------------------------------------
# Shuffle mapping


class MarkerJudge(BasePairwiseJudge):
    """A test fixture: prefers the completion containing MARK (-1 when neither does); records what it was shown."""

    def __init__(self):
        self.shown = []

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        self.check_pairs(prompts, completions)
        pairs, flipped = self.shuffle_pairs(completions, shuffle_order)
        self.shown.append(pairs)
        if return_scores:
            return self.unshuffle([0.9 if MARK in p[0] else 0.1 for p in pairs], flipped, scores=True)
        return self.unshuffle([0 if MARK in p[0] else 1 if MARK in p[1] else -1 for p in pairs], flipped)


def test_shuffle_swaps_pairs_and_maps_answers_back():
    rng = np.random.default_rng(0)
    pairs = [[f"x{i} {MARK}", f"y{i}"] if rng.random() < 0.5 else [f"x{i}", f"y{i} {MARK}"] for i in range(64)]
    pairs += [["no", "marker"]] * 4
    prompts = [f"p{i}" for i in range(len(pairs))]
    expected = [0 if MARK in p[0] else 1 if MARK in p[1] else -1 for p in pairs]
    judge = MarkerJudge()
    np.random.seed(1)
    assert judge.judge(prompts, pairs, shuffle_order=True) == expected
    swapped = [shown != list(pair) for shown, pair in zip(judge.shown[-1], pairs[:64])]
    assert 16 < sum(swapped) < 48  # pairs really were presented in swapped order, about half of them
    assert judge.judge(prompts, pairs, shuffle_order=False) == expected
    assert judge.shown[-1] == [list(p) for p in pairs]
    scores = judge.judge(prompts[:64], pairs[:64], shuffle_order=True, return_scores=True)
    assert scores == pytest.approx([0.9 if e == 0 else 0.1 for e in expected[:64]], abs=1e-12)
    np.random.seed(1)
    first = judge.judge(prompts, pairs)
    np.random.seed(1)
    assert judge.judge(prompts, pairs) == first and judge.shown[-1] == judge.shown[-2]  # seeded: reproducible


def test_pairs_are_checked():
    with pytest.raises(ValueError, match="exactly 2 completions"):
        MarkerJudge().judge(["p"], [["a", "b", "c"]])
    with pytest.raises(ValueError, match="2 prompts but 1 completion pairs"):
        MarkerJudge().judge(["p", "q"], [["a", "b"]])


# ---------------------------------------------------------------------------------------------------------------------
# PairRMJudge with a local sequence-classification reward model


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory) -> str:
    from llm_trainer.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-rm"), task="sequence-classification", seed=3)


def _own_rewards(model, tokenizer, prompts, completions) -> list[float]:
    """The reward model's score of each (prompt, completion), one unpadded sequence at a time."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            scores.append(model(**ids).logits[0, 0].item())
    return scores


def test_pair_rm_judge_follows_the_reward_model(reward_model_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_path)
    r0 = _own_rewards(model, tokenizer, PROMPTS, [p[0] for p in PAIRS])
    r1 = _own_rewards(model, tokenizer, PROMPTS, [p[1] for p in PAIRS])
    margins = [a - b for a, b in zip(r0, r1)]
    assert min(abs(m) for m in margins) > 1e-4  # the verdicts below are not decided by rounding
    expected_index = [0 if m > 0 else 1 for m in margins]
    expected_prob = [1 / (1 + math.exp(-m)) for m in margins]

    for judge in (PairRMJudge(reward_model_path, device="cpu", batch_size=3), PairRMJudge(model, tokenizer)):
        for shuffle in (False, True):
            assert judge.judge(PROMPTS, PAIRS, shuffle_order=shuffle) == expected_index
            probs = judge.judge(PROMPTS, PAIRS, shuffle_order=shuffle, return_scores=True)
            # batched (padded) vs one-by-one forward passes: float32 rounding of scores of size ~0.1-1
            assert probs == pytest.approx(expected_prob, abs=1e-5)
        hot = judge.judge(PROMPTS, PAIRS, shuffle_order=False, return_scores=True, temperature=0.5)
        assert hot == pytest.approx([1 / (1 + math.exp(-2 * m)) for m in margins], abs=1e-5)


def test_pair_rm_judge_errors(reward_model_path, tiny_model_path, monkeypatch):
    import llm_trainer.import_utils as import_utils

    monkeypatch.setattr(
        import_utils, "_is_package_available", lambda name, *a, **k: False if name == "llm_blender" else True
    )
    with pytest.raises(ImportError, match="pip install llm-blender"):
        PairRMJudge()
    from transformers import AutoModelForSequenceClassification

    two_labels = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        PairRMJudge(two_labels, tokenizer=reward_model_path)
    with pytest.raises(ValueError, match="temperature"):
        PairRMJudge(reward_model_path).judge(PROMPTS, PAIRS, return_scores=True, temperature=0)


# ---------------------------------------------------------------------------------------------------------------------
# HfPairwiseJudge with a local causal LM


def _own_choice_logits(model, tokenizer, judge, prompt, pair) -> tuple[float, float]:
    """The causal LM's next-token logits of '0' and '1' after the judge's question, unbatched."""
    messages = [{"role": "user", "content": judge.question(prompt, pair)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"]).logits[0, -1]
    zero, one = (tokenizer.encode(d, add_special_tokens=False)[0] for d in "01")
    return logits[zero].item(), logits[one].item()


def test_hf_pairwise_judge_reads_the_answer_logits(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    judge = HfPairwiseJudge(tiny_model_path, device="cpu", batch_size=2)  # batches of different-length questions
    assert judge.client is None
    own = [_own_choice_logits(model, tokenizer, judge, p, pair) for p, pair in zip(PROMPTS, PAIRS)]
    margins = [a - b for a, b in own]
    assert min(abs(m) for m in margins) > 1e-5
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=False) == [0 if m > 0 else 1 for m in margins]
    probs = judge.judge(PROMPTS, PAIRS, shuffle_order=False, return_scores=True)
    # left-padded batches vs unpadded passes; logits of size ~0.1-1 in float32
    assert probs == pytest.approx([1 / (1 + math.exp(-m)) for m in margins], abs=1e-5)

    # Shuffled: each pair is asked in one order or the other, and the answer maps back to the caller's order.
    swapped = [_own_choice_logits(model, tokenizer, judge, p, pair[::-1]) for p, pair in zip(PROMPTS, PAIRS)]
    as_swapped = [1 if a > b else 0 for a, b in swapped]
    np.random.seed(0)
    answers = HfPairwiseJudge(model, tokenizer=tokenizer).judge(PROMPTS * 4, PAIRS * 4, shuffle_order=True)
    for i, answer in enumerate(answers):
        assert answer in ({0 if margins[i % 5] > 0 else 1} | {as_swapped[i % 5]})


def test_hf_pairwise_judge_checks_its_prompt(tiny_model_path):
    with pytest.raises(ValueError, match=r"\{response1\}"):
        HfPairwiseJudge(tiny_model_path, system_prompt="{prompt} {response0}")
    with pytest.raises(ValueError, match="placeholders"):
        HfPairwiseJudge(tiny_model_path, system_prompt="{prompt} {response0} {response1} {other}")


# ---------------------------------------------------------------------------------------------------------------------
# A tiny OpenAI-shaped server


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state["lock"]:
            state["requests"].append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            scripted = state["script"].pop(0) if state["script"] else None
        try:
            time.sleep(state["delay"])
            if scripted is not None:
                status, payload, headers = scripted
                return self._send(status, payload, headers)
            if state["require_key"] and self.headers.get("Authorization") != f"Bearer {state['require_key']}":
                return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request"}})
            if not self.path.endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            question = body["messages"][-1]["content"]
            match = re.search(r"A0=\[(.*)\] A1=\[(.*)\]", question, re.S)
            answer = state["answer"] or ("0" if MARK in match.group(1) else "1" if MARK in match.group(2) else "?")
            reply = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                ],
            }
            self._send(200, reply)
        finally:
            with state["lock"]:
                state["in_flight"] -= 1

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.state = {
        "lock": threading.Lock(),
        "requests": [],
        "script": [],  # (status, payload, headers) answered before the normal behaviour
        "answer": None,  # a fixed reply instead of judging
        "delay": 0.0,
        "in_flight": 0,
        "max_in_flight": 0,
        "require_key": None,
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _openai_judge(server, **kwargs) -> OpenAIPairwiseJudge:
    kwargs.setdefault("system_prompt", TEST_SYSTEM_PROMPT)
    kwargs.setdefault("retry_backoff", 0.01)
    return OpenAIPairwiseJudge(model="judge-model", base_url=f"http://127.0.0.1:{server.server_port}/v1", **kwargs)


def test_openai_judge_asks_the_endpoint(judge_server):
    judge = _openai_judge(judge_server, api_key="sk-test", max_workers=4)
    np.random.seed(0)
    assert judge.judge(PROMPTS * 4, PAIRS * 4) == EXPECTED * 4  # shuffled, answered by reading the question
    requests = judge_server.state["requests"]
    assert len(requests) == 20 and judge.num_requests == 20
    shown_first = [
        MARK in re.search(r"A0=\[(.*)\] A1", r["body"]["messages"][0]["content"]).group(1) for r in requests
    ]
    assert 0 < sum(shown_first) < 20  # the marked answer reached the server in both positions
    first = requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-model" and first["body"]["max_tokens"] == 1
    assert first["body"]["messages"][0]["role"] == "user"
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=False) == EXPECTED


@pytest.mark.parametrize(("reply", "index"), [("0", 0), ("1", 1), (" 1\n", 1), ("0.", 0), ("10", -1), ("B", -1)])
def test_openai_judge_parses_answers(judge_server, reply, index):
    judge_server.state["answer"] = reply
    assert _openai_judge(judge_server).judge(["p"], [["a", "b"]], shuffle_order=False) == [index]


def test_openai_judge_runs_requests_concurrently(judge_server):
    judge_server.state["delay"] = 0.2
    judge = _openai_judge(judge_server, max_workers=4)
    start = time.monotonic()
    assert judge.judge(PROMPTS[:4], PAIRS[:4], shuffle_order=False) == EXPECTED[:4]
    assert judge_server.state["max_in_flight"] >= 2 and time.monotonic() - start < 0.75


def test_openai_judge_retries_server_errors(judge_server):
    state = judge_server.state
    state["script"] = [(500, {"error": {"message": "overloaded"}}, None), (429, {}, {"Retry-After": "0"})]
    assert _openai_judge(judge_server, max_workers=1).judge(["p"], [PAIRS[0]], shuffle_order=False) == [1]
    assert len(state["requests"]) == 3  # 500, then 429, then the answer

    state["script"] = [(503, {"error": {"message": "down"}}, None)] * 3
    with pytest.raises(JudgeRequestError, match=r"kept failing after 3 attempts.*HTTP 503 \(down\)") as info:
        _openai_judge(judge_server, max_retries=2).judge(["p"], [PAIRS[0]])
    assert info.value.status == 503


def test_openai_judge_bad_key_is_a_clear_error(judge_server):
    judge_server.state["require_key"] = "sk-right"
    with pytest.raises(JudgeRequestError, match=r"rejected the API key \(HTTP 401: Incorrect API key") as info:
        _openai_judge(judge_server, api_key="sk-wrong").judge(["p"], [PAIRS[0]])
    assert info.value.status == 401 and len(judge_server.state["requests"]) == 1  # not retried
    assert _openai_judge(judge_server, api_key="sk-right").judge(["p"], [PAIRS[0]], shuffle_order=False) == [1]
    judge_server.state["script"] = [(404, {"error": {"message": "model judge-model not found"}}, None)]
    with pytest.raises(JudgeRequestError, match=r"HTTP 404\): model judge-model not found"):
        _openai_judge(judge_server).judge(["p"], [PAIRS[0]])


def test_openai_judge_unreachable_host_is_a_clear_error():
    port = free_port()  # nothing listens there
    judge = OpenAIPairwiseJudge(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, retry_backoff=0.01)
    with pytest.raises(ConnectionError, match=rf"Could not reach the judge endpoint http://127.0.0.1:{port}/v1/chat"):
        judge.judge(["p"], [PAIRS[0]])


def test_openai_judge_request_budget(judge_server, caplog):
    judge = _openai_judge(judge_server, max_requests=3)
    with caplog.at_level(logging.WARNING, logger="llm_trainer.judges"):
        assert judge.judge(PROMPTS, PAIRS, shuffle_order=False) == EXPECTED[:3] + [-1, -1]
        assert judge.judge(PROMPTS[:2], PAIRS[:2]) == [-1, -1]
    assert len(judge_server.state["requests"]) == 3 == judge.num_requests
    assert sum("max_requests=3" in r.message for r in caplog.records) == 1


def test_openai_judge_configuration(judge_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="needs an API key for api.openai.com"):
        OpenAIPairwiseJudge()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{judge_server.server_port}/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    judge = OpenAIPairwiseJudge(
        system_prompt=TEST_SYSTEM_PROMPT, request_kwargs={"temperature": 0, "max_tokens": None}
    )
    assert judge.url == f"http://127.0.0.1:{judge_server.server_port}/v1/chat/completions"
    assert judge.judge(["p"], [PAIRS[0]], shuffle_order=False) == [1]
    sent = judge_server.state["requests"][-1]
    assert sent["auth"] == "Bearer sk-env" and sent["body"]["temperature"] == 0 and "max_tokens" not in sent["body"]
    with pytest.raises(ValueError, match="return_scores"):
        judge.judge(["p"], [PAIRS[0]], return_scores=True)
    with pytest.raises(ValueError, match="http"):
        OpenAIPairwiseJudge(base_url="localhost:8000")


# ---------------------------------------------------------------------------------------------------------------------
# HfPairwiseJudge through huggingface_hub's InferenceClient


def test_hf_pairwise_judge_inference_endpoint(judge_server, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this is local
    url = f"http://127.0.0.1:{judge_server.server_port}"
    judge = HfPairwiseJudge(url, system_prompt=TEST_SYSTEM_PROMPT)
    assert judge.model is None and judge.client is not None
    np.random.seed(0)
    assert judge.judge(PROMPTS, PAIRS) == EXPECTED
    assert judge_server.state["requests"][0]["body"]["max_tokens"] == 1
    judge_server.state["require_key"] = "hf_right"
    with pytest.raises(JudgeRequestError, match="inference endpoint"):
        judge.judge(["p"], [PAIRS[0]])
