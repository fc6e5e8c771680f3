"""Record trl 1.12's PPO, as llmctl's ppo stage drove it, so llmctl's own PPO can be checked
against it after trl dropped PPO (trl 1.13+). Needs trl <= 1.12 (``trl.experimental.ppo``) and
the llmctl of that time (commit 830bd9d: ``llmctl.trainers.ppo`` with ``resumable``,
``TextReward``, ``AdaptiveKL``). Run it so that this llmctl is the one imported, e.g.

    cd /tmp && PYTHONPATH=/work/ppo-old /work/venv-old/bin/python /work/main/scripts/ppo_trace.py

It writes tests/data/ppo_trace/ (next to this script's repository), about 1 MB:

- ``tokenizer/``: a byte-level BPE (the demo's scheme, 512 tokens, one special token that is
  bos, eos, unk *and pad*, as the demo's) trained on the demo's sentiment rows;
  ``reward_tokenizer/``: the demo's WordPiece scheme over the same texts;
- ``policy/``: a tiny OPT (the demo's architecture) from a fixed seed, its final layer norm's
  bias turned towards the eos embedding so that about one position in six samples eos (the
  truncation, padding and missing-eos code runs); no dropout in the model itself: trl switched
  off ``nn.Dropout`` modules only, and OPT drops out functionally from ``config.dropout``, which
  trl therefore left on (in train mode, even while sampling): random, so not replayable. The
  LoRA adapter has dropout 0.1 (``nn.Dropout``, which PPO must switch off);
- ``value_score.safetensors``: the value model's score head (the value model is
  AutoModelForSequenceClassification, num_labels=1, from the policy's weights plus this head);
- ``reward_bert/``: an encoder reward model with its own tokenizer (the demo's case: trl gets
  llmctl's ``TextReward``); ``reward_opt/``: a decoder reward model on the policy's tokenizer
  (the shared-tokenizer case: trl gets the model itself);
- ``<run>_lora_init.safetensors``: the policy's LoRA adapter as peft initialised it;
  ``<run>_final.safetensors``: the adapter (``policy.*``) and value model (``value.*``) after
  the last step;
- ``trace.json``: the prompts, and for each run its settings and, per PPO step (batch), the
  KL coefficient used, the query_responses trl sampled (token ids, captured by wrapping
  ``ppo_trainer.batch_generation``), the context length, the mini-batch permutations trl drew
  (``np.random.permutation``, one per PPO epoch) and every metric trl logged (objective/scores,
  objective/kl, objective/non_score_reward, objective/entropy, loss/policy_avg,
  loss/value_avg, policy/clipfrac_avg, policy/approxkl_avg, val/clipfrac_avg, ...).

Two runs: ``text`` (the demo's: reward model with its own tokenizer, k1, fixed kl_coef,
missing_eos_penalty, temperature 0.7, 2 mini-batches x 3 epochs) and ``shared`` (reward model
on the policy's ids, k3, the adaptive KL controller, gradient accumulation over 2
micro-batches, 2 epochs). Each runs 6 steps of 8 rollouts on CPU in a few seconds.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "ppo_trace"
SEED = 0
LORA = {"r": 4, "alpha": 8, "dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
# lr high enough that ratios leave the clip range within a step (clipfrac > 0)
COMMON = {"steps": 6, "batch_size": 8, "lr": 1e-2, "response_length": 6, "cliprange": 0.2,
          "vf_coef": 0.1, "query_max_length": 64}
RUNS = {
    "text": {**COMMON, "reward": "bert", "mini_batches": 2, "ppo_epochs": 3, "grad_accum": 1,
             "temperature": 0.7, "kl_coef": 0.5, "kl_estimator": "k1", "kl_target": None,
             "kl_horizon": 10000, "missing_eos_penalty": 1.0},
    "shared": {**COMMON, "reward": "opt", "mini_batches": 1, "ppo_epochs": 2, "grad_accum": 2,
               "temperature": 1.0, "kl_coef": 0.2, "kl_estimator": "k3", "kl_target": 0.02,
               "kl_horizon": 40, "missing_eos_penalty": None},
}
TRAIN_PROMPTS, EVAL_PROMPTS = 64, 8  # 6 x 8 < 64: one pass never ends (see the note in main)


def build_assets(out: Path) -> tuple[list[str], list[str]]:
    """Tokenizers and models from fixed seeds; returns the train and held-out query texts."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (BertConfig, BertForSequenceClassification, OPTConfig,
                              OPTForCausalLM, OPTForSequenceClassification,
                              PreTrainedTokenizerFast)

    from llmctl.data import Template
    from llmctl.demo.assets import (EOS, _instruction_texts, _rng, sentiment_records,
                                    train_wordpiece_tokenizer)

    train_rows, eval_rows = sentiment_records(_rng(SEED, "sentiment"), 150, 30)
    template = Template.get("sentiment")
    train = [template.context(r) for r in train_rows][:TRAIN_PROMPTS]
    held_out = [template.context(r) for r in eval_rows][:EVAL_PROMPTS]
    texts = list(_instruction_texts({"sentiment_train": train_rows}))

    bpe = ByteLevelBPETokenizer()  # the demo's train_tokenizer with a smaller vocabulary
    bpe.train_from_iterator(texts, vocab_size=512, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS,
                                        eos_token=EOS, unk_token=EOS, pad_token=EOS,
                                        model_max_length=1024,
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(str(out / "tokenizer"))
    train_wordpiece_tokenizer(out / "reward_tokenizer", texts)
    from transformers import AutoTokenizer
    reward_tokenizer = AutoTokenizer.from_pretrained(str(out / "reward_tokenizer"))

    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    opt = dict(vocab_size=len(tokenizer), num_hidden_layers=2, hidden_size=32, ffn_dim=64,
               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
               init_std=0.1, dropout=0.0, attention_dropout=0.0, **special)
    torch.manual_seed(SEED)
    policy = OPTForCausalLM(OPTConfig(**opt))
    with torch.no_grad():  # eos about 1 in 6 at each position: logit(eos) raised by ~ln(0.2 V)
        e = policy.get_output_embeddings().weight[tokenizer.eos_token_id]
        e.normal_(0, 0.1)  # eos is the pad token: its (tied) row starts at zero, padding_idx
        policy.model.decoder.final_layer_norm.bias += np.log(0.2 * len(tokenizer)) * e / e.dot(e)
    policy.save_pretrained(str(out / "policy"))
    torch.manual_seed(SEED + 1)
    OPTForSequenceClassification(OPTConfig(**opt, num_labels=1)).save_pretrained(
        str(out / "reward_opt"))
    tokenizer.save_pretrained(str(out / "reward_opt"))
    torch.manual_seed(SEED + 2)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(reward_tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128, num_labels=1,
        initializer_range=0.3, pad_token_id=reward_tokenizer.pad_token_id)).save_pretrained(
        str(out / "reward_bert"))
    reward_tokenizer.save_pretrained(str(out / "reward_bert"))
    torch.manual_seed(SEED + 3)
    value = OPTForSequenceClassification.from_pretrained(str(out / "policy"), num_labels=1)
    save_file({"weight": value.score.weight.detach().contiguous()},
              str(out / "value_score.safetensors"))
    return train, held_out


def record_run(name: str, s: dict, out: Path, train_texts: list[str]) -> dict:
    """trl's PPOTrainer built as llmctl's ppo stage built it (830bd9d), 6 steps, recorded."""
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, OPTForCausalLM
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from llmctl.trainers.ppo import AdaptiveKL, RewardInput, TextReward, resumable

    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"), padding_side="left")
    policy = OPTForCausalLM.from_pretrained(str(out / "policy"))
    value = AutoModelForSequenceClassification.from_pretrained(str(out / "policy"), num_labels=1)
    value.score.load_state_dict(load_file(str(out / "value_score.safetensors")))
    value.config.pad_token_id = tokenizer.pad_token_id
    reward_dir = out / f"reward_{s['reward']}"
    reward_tokenizer = AutoTokenizer.from_pretrained(str(reward_dir))
    reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).eval()
    train_ids = tokenizer(train_texts, truncation=True,
                          max_length=s["query_max_length"])["input_ids"]
    if s["reward"] == "bert":  # the stage's TextReward: decoded query + response, re-tokenized
        reward = TextReward(reward_model, reward_tokenizer, RewardInput(tokenizer, None, []),
                            400, 16)
    else:
        reward = reward_model

    tmp = Path(tempfile.mkdtemp())
    args = PPOConfig(
        output_dir=str(tmp), seed=SEED, data_seed=SEED, use_cpu=True, report_to=[],
        bf16=False, fp16=False,  # as the stage on CPU (precision "auto": fp32); trl's default: bf16
        disable_tqdm=True, save_strategy="no", logging_steps=1, logging_first_step=False,
        learning_rate=s["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0,  # the stage's default; trl's PPO loop never clips
        per_device_train_batch_size=s["batch_size"] // s["grad_accum"],
        gradient_accumulation_steps=s["grad_accum"],
        num_mini_batches=s["mini_batches"], num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["steps"] * s["batch_size"], response_length=s["response_length"],
        temperature=s["temperature"], kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"],
        cliprange=s["cliprange"], vf_coef=s["vf_coef"],
        missing_eos_penalty=s["missing_eos_penalty"], stop_token="eos",
        local_rollout_forward_batch_size=s["batch_size"], num_sample_generations=0)
    torch.manual_seed(SEED)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = resumable(PPOTrainer)(
        args=args, processing_class=tokenizer, model=policy, ref_model=None,
        reward_model=reward, value_model=value,
        train_dataset=Dataset.from_dict({"input_ids": train_ids}), peft_config=lora)
    if s["kl_target"] is not None:
        trainer.add_callback(AdaptiveKL(s["kl_target"], s["kl_horizon"], s["batch_size"]))
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    save_file({k: v.detach().contiguous() for k, v in
               get_peft_model_state_dict(wrapper.policy).items()},
              str(out / f"{name}_lora_init.safetensors"))

    steps: list[dict] = []
    generate, permutation = ppo_module.batch_generation, np.random.permutation

    def recording_generation(model, queries, *rest, **kwargs):
        query_responses, logits = generate(model, queries, *rest, **kwargs)
        steps.append({"kl_coef": trainer.args.kl_coef, "context_length": queries.shape[1],
                      "query_responses": query_responses.tolist(), "permutations": []})
        return query_responses, logits

    def recording_permutation(n):
        order = permutation(n)
        steps[-1]["permutations"].append(order.tolist())
        return order

    ppo_module.batch_generation, np.random.permutation = recording_generation, recording_permutation
    try:
        trainer.train()
    finally:
        ppo_module.batch_generation, np.random.permutation = generate, permutation
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    assert len(logs) == len(steps) == s["steps"]
    for step, log in zip(steps, logs):
        step["metrics"] = {k: v for k, v in log.items() if "/" in k}
    final = {f"policy.{k}": v for k, v in get_peft_model_state_dict(wrapper.policy).items()}
    final.update({f"value.{k}": v for k, v in wrapper.value_model.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in final.items()},
              str(out / f"{name}_final.safetensors"))
    shutil.rmtree(tmp, ignore_errors=True)
    eos = sum(tokenizer.eos_token_id in row[st["context_length"]:]
              for st in steps for row in st["query_responses"])
    print(f"{name}: scores {[round(st['metrics']['objective/scores'], 3) for st in steps]}\n"
          f"  kl {[round(st['metrics']['objective/kl'], 4) for st in steps]}\n"
          f"  clipfrac {[round(st['metrics']['policy/clipfrac_avg'], 3) for st in steps]}\n"
          f"  responses with eos {eos} of {s['steps'] * s['batch_size']}", file=sys.stderr)
    return {"settings": s, "steps": steps}


def main() -> None:
    import transformers
    import trl

    from llmctl.trainers import ppo as old_ppo  # noqa: F401 - the pre-1.13 llmctl must be here

    if not hasattr(old_ppo, "resumable"):
        sys.exit("error: needs the llmctl of trl 1.12's time (PYTHONPATH=<worktree of 830bd9d>)")
    random.seed(SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    train, held_out = build_assets(OUT)
    # Note: with grad_accum > 1, accelerate also steps the optimizer at every micro-batch of
    # the update in which a pass over the prompts ends (its end_of_dataloader rule); 48 rollouts
    # from 64 prompts never end a pass, as the stage's recipes do not in their first pass.
    trace = {"about": "trl 1.12.0 PPOTrainer driven by llmctl 830bd9d; scripts/ppo_trace.py",
             "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                          "torch": torch.__version__},
             "seed": SEED, "lora": LORA, "train_queries": train, "eval_queries": held_out,
             "runs": {name: record_run(name, s, OUT, train) for name, s in RUNS.items()}}
    (OUT / "trace.json").write_text(json.dumps(trace, indent=None, separators=(",", ":")))
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
