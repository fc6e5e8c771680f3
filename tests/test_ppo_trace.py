"""llmctl's PPO is trl 1.12's: fed what trl's PPOTrainer sampled (tests/data/ppo_trace, recorded
by scripts/ppo_trace.py with trl 1.12.0 as llmctl's ppo stage drove it), it logs the same
metrics at every step and ends with the same weights. Also: the adaptive KL controller, and a
run resumed from a checkpoint equals one that never stopped.

Tolerance: trl's rollout log-probs came from generate's incremental (KV-cached) forward passes
and its training logits from the LM head on every position (transformers 4.57); here they come
from one forward pass with the head on the response positions only (on whichever transformers
is installed). The same fp32 arithmetic in another order: the metrics agree to 2e-6 absolute
(1e-7 relative) over the 6 steps, the weights likewise. ``RTOL`` / ``ATOL`` = 1e-5 leave a
decade above that; a changed algorithm (GAE's lambda, whitening, a clip range, the KL
estimator) moves the metrics by 1e-3 or more (test_a_changed_algorithm_is_caught).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TRACE = Path(__file__).parent / "data" / "ppo_trace"
RTOL, ATOL = 1e-5, 1e-5
CHECKED = ["objective/scores", "objective/kl", "objective/non_score_reward", "objective/entropy",
           "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg", "policy/entropy_avg",
           "policy/clipfrac_avg", "policy/approxkl_avg", "val/clipfrac_avg", "val/ratio"]


@pytest.fixture(scope="module")
def trace() -> dict:
    return json.loads((TRACE / "trace.json").read_text())


def trainer_for(trace: dict, name: str, checkpoint_dir=None, stop_after: int | None = None):
    """llmctl's PPOTrainer on the trace's models and settings; its sampler, its prompt batches
    and its mini-batch shuffle replay what trl drew. Returns the trainer and the recorded run."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM, \
        AutoTokenizer

    from llmctl.schema import PpoConfig
    from llmctl.trainers.ppo import PPOTrainer, RewardInput, SharedReward, TextReward, \
        response_logits, token_logprobs

    run = trace["runs"][name]
    s = run["settings"]
    tokenizer = AutoTokenizer.from_pretrained(str(TRACE / "tokenizer"), padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(str(TRACE / "policy"))
    value = AutoModelForSequenceClassification.from_pretrained(str(TRACE / "policy"),
                                                               num_labels=1)
    value.score.load_state_dict(load_file(str(TRACE / "value_score.safetensors")))
    value.config.pad_token_id = tokenizer.pad_token_id
    reward_dir = TRACE / f"reward_{s['reward']}"
    reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).eval()
    if s["reward"] == "bert":
        reward = TextReward(reward_model, AutoTokenizer.from_pretrained(str(reward_dir)),
                            RewardInput(tokenizer, None, []), 400, 16)
    else:
        reward = SharedReward(reward_model)
    lora = trace["lora"]
    policy = get_peft_model(policy, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    set_peft_model_state_dict(policy, load_file(str(TRACE / f"{name}_lora_init.safetensors")))
    cfg = PpoConfig(**{k: s[k] for k in (
        "steps", "batch_size", "mini_batches", "grad_accum", "ppo_epochs", "lr",
        "response_length", "temperature", "kl_coef", "kl_target", "kl_horizon", "kl_estimator",
        "cliprange", "vf_coef", "missing_eos_penalty")}, save_steps=2)
    steps = run["steps"]
    recorded = [torch.tensor(st["query_responses"]) for st in steps]
    permutations = iter([p for st in steps for p in st["permutations"]])

    def replay_sampler(queries):
        step = trainer.step
        query_responses = recorded[step]
        context = steps[step]["context_length"]
        assert torch.equal(queries, query_responses[:, :context])
        with torch.no_grad():  # the sampling distribution's log-probs, by teacher forcing
            logits = response_logits(policy, query_responses, tokenizer.pad_token_id, context,
                                     s["temperature"])
        return query_responses, token_logprobs(logits, query_responses[:, context:])

    trainer = PPOTrainer(cfg, policy, value, reward, tokenizer,
                         [q for st in steps for q in st["query_responses"]], trace["seed"],
                         sampler=replay_sampler, permutation=lambda n: next(permutations))
    trainer.batch_queries = lambda step: recorded[step][:, :steps[step]["context_length"]]
    return trainer, run, permutations


def assert_matches(logged: list[dict], run: dict, rtol=RTOL, atol=ATOL) -> None:
    for i, (ours, step) in enumerate(zip(logged, run["steps"], strict=True)):
        assert ours["kl_coef"] == pytest.approx(step["kl_coef"], rel=1e-6), f"step {i + 1}"
        for key in CHECKED:
            assert ours[key] == pytest.approx(step["metrics"][key], rel=rtol, abs=atol), \
                f"step {i + 1}: {key} {ours[key]} vs trl's {step['metrics'][key]}"


@pytest.mark.parametrize("name", ["text", "shared"])
def test_ppo_matches_trl_step_by_step(trace, name):
    """``text``: the demo's setting (reward model with its own tokenizer, k1, fixed KL
    coefficient, missing-eos penalty, temperature 0.7, 2 mini-batches x 2 epochs). ``shared``:
    the reward model reads the policy's ids, k3, the adaptive KL controller, 2 micro-batches of
    gradient accumulation."""
    from safetensors.torch import load_file

    trainer, run, _ = trainer_for(trace, name)
    logged = trainer.train()
    assert_matches(logged, run)
    # and the weights after 6 steps: the adapter and the whole value model
    from peft import get_peft_model_state_dict

    final = load_file(str(TRACE / f"{name}_final.safetensors"))
    ours = {f"policy.{k}": v for k, v in get_peft_model_state_dict(trainer.policy).items()}
    ours.update({f"value.{k}": v for k, v in trainer.value_model.state_dict().items()})
    assert set(ours) == set(final)
    for key, value in final.items():
        if key.endswith("k_proj.bias"):
            # A key bias shifts every attention score of a query by the same amount, which the
            # softmax ignores: its gradient is rounding noise, which Adam scales to full steps.
            continue
        torch.testing.assert_close(ours[key], value, rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("change", ["lam", "whiten", "cliprange", "cliprange_value", "k3"])
def test_a_changed_algorithm_is_caught(trace, monkeypatch, change):
    """The tolerance is tight enough to notice a changed part of the algorithm."""
    from llmctl.trainers import ppo

    if change == "lam":
        monkeypatch.setattr(ppo, "LAM", 0.9)
    elif change == "whiten":
        monkeypatch.setattr(ppo, "masked_whiten", lambda values, mask: values)
    elif change == "cliprange_value":
        monkeypatch.setattr(ppo, "CLIPRANGE_VALUE", 0.3)
    trainer, run, _ = trainer_for(trace, "text")
    if change == "cliprange":
        trainer.cfg = trainer.cfg.model_copy(update={"cliprange": 0.3})
    elif change == "k3":
        trainer.cfg = trainer.cfg.model_copy(update={"kl_estimator": "k3"})
    logged = trainer.train()
    with pytest.raises(AssertionError):
        assert_matches(logged, run)


def test_adaptive_kl_follows_ziegler():
    """kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon, after each step."""
    from llmctl.trainers.ppo import KLController

    kl = KLController(0.2, target=0.1, horizon=100, batch_size=10)
    kl.update(0.11)  # 10% over the target
    assert kl.coef == pytest.approx(0.2 * (1 + 0.1 * 10 / 100))
    kl.update(5.0)  # far over: clipped at +20%
    assert kl.coef == pytest.approx(0.2 * 1.01 * 1.02)
    before = kl.coef
    kl.update(0.0)  # below: clipped at -20%
    assert kl.coef == pytest.approx(before * 0.98)
    fixed = KLController(0.3)
    fixed.update(7.0)
    assert fixed.coef == 0.3


def test_resumed_run_equals_an_uninterrupted_one(trace, tmp_path):
    """6 steps straight == 4 steps, a fresh trainer from checkpoint-4, 2 more: the same logs
    and weights, bit for bit (the KL coefficient, optimizer, schedule and step come back)."""
    from peft import get_peft_model_state_dict

    straight, _, _ = trainer_for(trace, "shared")
    logged = straight.train()
    first, _, _ = trainer_for(trace, "shared")  # checkpoints every 2 steps
    first.train(tmp_path, until=4)  # then killed
    steps = first.cfg.steps
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").exists()
    resumed, _, permutations = trainer_for(trace, "shared")
    for _ in range(4 * resumed.cfg.ppo_epochs):  # what trl drew for the first 4 steps
        next(permutations)
    again = resumed.train(tmp_path, str(tmp_path / "checkpoint-4"))
    assert resumed.step == steps
    assert [h["step"] for h in again] == list(range(1, steps + 1))
    for a, b in zip(logged, again):
        assert {k: v for k, v in a.items() if k != "seconds"} == \
            {k: v for k, v in b.items() if k != "seconds"}
    ours = get_peft_model_state_dict(resumed.policy)
    for key, value in get_peft_model_state_dict(straight.policy).items():
        assert torch.equal(ours[key], value), key
    for key, value in straight.value_model.state_dict().items():
        assert torch.equal(resumed.value_model.state_dict()[key], value), key
