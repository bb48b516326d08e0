"""XPO and Nash-MD against TRL 1.13 (the last release that had them): same tiny model, reward model, prompts and
seed; per-step loss and metric names compared.

TRL 1.13 must live in a separate environment (never in this venv). One way, layered over this venv's packages:

    python -m venv /tmp/trl113env
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/trl113env/lib/python3.11/site-packages/zz_main.pth
    /tmp/trl113env/bin/pip install --no-deps trl==1.13.0 requests urllib3 idna certifi charset-normalizer
    TRL_1_13_PYTHON=/tmp/trl113env/bin/python python benchmarks/xpo_nash_md_parity.py

Sampling runs at a very low temperature so both libraries draw the same (argmax) completions from the same weights;
the comparison is then deterministic. The llm_trainer side scores with a reward function that applies TRL 1.13's
convention (the reward model reads the prompt ids plus the generated ids); given the reward model itself, llm_trainer
scores decoded text re-tokenized, as TRL 1.16's Online DPO does, which differs on random tiny-model output. TRL 1.13's XPO/Nash-MD call `get_reward` on `self.reward_funcs`, which its
Online DPO base turned into a list, so the TRL side unwraps the single reward model after construction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["The cat", "A dog", "Once upon", "In the", "Red and", "Three small", "My friend", "The sea"]
SETTINGS = dict(
    max_steps=3,
    per_device_train_batch_size=4,
    max_new_tokens=8,
    temperature=1e-4,
    learning_rate=1e-3,
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=0,
    beta=[0.1],
)
EXTRA = {"xpo": {"alpha": [0.05]}, "nash_md": {"mixture_coef": [0.5]}}


def id_reward(reward_model, tokenizer):
    """TRL 1.13's reward convention as an llm_trainer reward function: the sequence-classification model scores the
    prompt's token ids followed by the generated ids (its last token), not re-tokenized text."""
    import torch

    def score(prompts, completions, completion_ids, **kwargs) -> list[float]:
        scores = []
        for prompt, ids in zip(prompts, completion_ids):
            pad = tokenizer.pad_token_id
            ids = [int(t) for t in ids]
            if pad in ids:  # TRL 1.13 scores the token before the first pad (eos when pad == eos)
                ids = ids[: ids.index(pad)]
            sequence = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] + ids])
            with torch.no_grad():
                scores.append(reward_model(input_ids=sequence).logits[0, -1].item())
        return scores

    return score


def run(side: str, algorithm: str, model: str, reward: str, ref: str, out: str) -> None:
    """Train with `side` ("trl" or "ours") and write the log history to `out`."""
    from datasets import Dataset

    if side == "trl":
        if algorithm == "xpo":
            from trl.experimental.xpo import XPOConfig as Config
            from trl.experimental.xpo import XPOTrainer as Trainer
        else:
            from trl.experimental.nash_md import NashMDConfig as Config
            from trl.experimental.nash_md import NashMDTrainer as Trainer
    elif algorithm == "xpo":
        from llm_trainer import XPOConfig as Config
        from llm_trainer import XPOTrainer as Trainer
    else:
        from llm_trainer import NashMDConfig as Config
        from llm_trainer import NashMDTrainer as Trainer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    args = Config(output_dir=tempfile.mkdtemp(), **SETTINGS, **EXTRA[algorithm])
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        ref_model=AutoModelForCausalLM.from_pretrained(ref),
        reward_funcs=reward_model if side == "trl" else id_reward(reward_model, tokenizer),
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    if side == "trl" and isinstance(trainer.reward_funcs, list):
        trainer.reward_funcs = trainer.reward_funcs[0]
    trainer.train()
    Path(out).write_text(json.dumps([e for e in trainer.state.log_history if "loss" in e]))


def compare(algorithm: str, trl_python: str, workdir: Path) -> dict:
    from llm_trainer.testing import make_tiny_model

    model = make_tiny_model(workdir / "policy")
    reward = make_tiny_model(workdir / "reward", task="sequence-classification", seed=1)
    ref = make_tiny_model(workdir / "ref", seed=2)  # a reference unlike the policy: the mixture differs from it
    logs = {}
    for side, python in (("trl", trl_python), ("ours", sys.executable)):
        out = workdir / f"{algorithm}_{side}.json"
        command = [python, __file__, "--side", side, "--algorithm", algorithm, "--model", model]
        command += ["--reward", reward, "--ref", ref, "--out", str(out)]
        env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
        subprocess.run(command, check=True, env=env)
        logs[side] = json.loads(out.read_text())
    trl_loss = [e["loss"] for e in logs["trl"]]
    our_loss = [e["loss"] for e in logs["ours"]]
    rel = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(trl_loss, our_loss)]
    names_trl = set(logs["trl"][0]) - {"epoch", "grad_norm", "learning_rate", "step"}
    names_ours = set(logs["ours"][0]) - {"epoch", "grad_norm", "learning_rate", "step"}
    shared = sorted((names_trl & names_ours) - {"loss"})
    metric_rel = {
        name: max(abs(a[name] - b[name]) / max(abs(a[name]), 1e-6) for a, b in zip(logs["trl"], logs["ours"]))
        for name in shared
    }
    return {
        "algorithm": algorithm,
        "metric_max_rel_diff": metric_rel,
        "trl_loss": trl_loss,
        "our_loss": our_loss,
        "max_rel_diff": max(rel) if rel else None,
        "metrics_only_in_trl": sorted(names_trl - names_ours),
        "metrics_only_in_ours": sorted(names_ours - names_trl),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["trl", "ours"])
    parser.add_argument("--algorithm", choices=["xpo", "nash_md"], nargs="?")
    parser.add_argument("--model")
    parser.add_argument("--reward")
    parser.add_argument("--ref")
    parser.add_argument("--save", help="also write the results (JSON) here")
    parser.add_argument("--out")
    options = parser.parse_args()
    if options.side:
        run(options.side, options.algorithm, options.model, options.reward, options.ref, options.out)
        return
    trl_python = os.environ.get("TRL_1_13_PYTHON")
    if not trl_python:
        raise SystemExit("Set TRL_1_13_PYTHON to the python of an environment with trl==1.13.0 (see the docstring).")
    with tempfile.TemporaryDirectory() as tmp:
        algorithms = [options.algorithm] if options.algorithm else ["xpo", "nash_md"]
        results = [compare(name, trl_python, Path(tmp)) for name in algorithms]
    print(json.dumps(results, indent=2))
    if options.save:
        Path(options.save).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
