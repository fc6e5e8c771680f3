"""`llmctl ppo`: RLHF of the SFT policy against a reward model with llmctl's PPO
(llmctl/trainers/ppo.py: trl 1.12's "v2" PPO, which trl has since dropped, step for step).

Setup: the policy (upstream merge/sft model) gets a LoRA adapter, the reference policy is the
same model with the adapter switched off, the value model is the policy's weights with a scalar
head, and the reward model comes from the reward stage. A reward model that shares the
policy's tokenizer reads the policy's token ids (``SharedReward``); one with its own vocabulary
(the course's OPT policy + DeBERTa reward) reads text (``TextReward``): the policy's
query+response decoded, or with ``ppo.reward_text`` a format string over the prompt row and the
answer, such as "{response}: {text}" for an encoder trained on "label: tweet", re-tokenized.
Then: score held-out prompts before -> train -> score after -> save the adapter (and, with
``merge = true``, a merged standalone model). Checkpoints every ``save_steps`` batches let a
killed run resume where it stopped.
"""

from __future__ import annotations

import json
import math
from statistics import mean

from types import SimpleNamespace

import torch

from peft import get_peft_model
from transformers import GenerationConfig

from llmctl import distributed
from llmctl.data import ChatTemplate, Template, make_template, open_split
from llmctl.errors import StageFailed, UserError
from llmctl.evaluation import paired_sem
from llmctl.models import device, load_causal_lm, load_classifier, load_tokenizer, lora_config, \
    resolve_precision, save_model
from llmctl.progress import RichProgress, console, save_loss_curve, stage_header
from llmctl.schema import PpoConfig
from llmctl.stages import StageContext
from llmctl.trainers.ppo import PPOTrainer, RewardInput, SharedReward, TextReward
from llmctl.training import require_tracker, tracker_run


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs

    # -- models -----------------------------------------------------------------------------
    tokenizer = load_tokenizer(inputs["model"], recipe.model, padding_side="left")
    policy = load_causal_lm(inputs["model"], recipe.model)
    value_model = load_classifier(inputs["model"], recipe.model)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    reward_tokenizer = load_tokenizer(inputs["reward_model"], recipe.model)
    reward_model = load_classifier(inputs["reward_model"], recipe.model).eval()
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id

    # -- prompts ----------------------------------------------------------------------------
    source = recipe.data_source("ppo", cfg.data)
    template = make_template(source, tokenizer)
    fields = template.prompt_fields
    key = f"data.{cfg.data}"
    train_rows = open_split(source, fields, "train", key).rows()
    eval_rows = open_split(source, fields, "eval", key).rows()[:cfg.eval_prompts]
    train_ids = query_ids(train_rows, template, tokenizer, cfg.query_max_length)
    eval_ids = query_ids(eval_rows, template, tokenizer, cfg.query_max_length)
    use_distinct_pad(tokenizer, [*train_ids, *eval_ids], policy, value_model)

    reward_input = RewardInput(tokenizer, cfg.reward_text,
                               [*zip(train_ids, train_rows), *zip(eval_ids, eval_rows)])
    text_reward = TextReward(reward_model, reward_tokenizer, reward_input, cfg.reward_max_length,
                             cfg.reward_batch_size)
    shared = shares_tokenizer(tokenizer, reward_tokenizer) and hasattr(reward_model, "score") \
        and not cfg.reward_text
    stage_header("ppo", f"policy {inputs['model']}, reward {inputs['reward_model']} "
                        f"({'shared tokenizer' if shared else 'own tokenizer: re-tokenized text'})")

    rewards_before = sampled_rewards(policy, tokenizer, eval_ids, text_reward, cfg, recipe.run.seed)
    stage = ctx.start()
    precision = resolve_precision(cfg.precision)
    require_tracker(cfg.report_to)
    run_device = device()
    policy = get_peft_model(policy, lora_config(cfg.lora, policy, "ppo.lora")).to(run_device)
    trainer = PPOTrainer(cfg, policy, value_model.to(run_device),
                         SharedReward(reward_model.to(run_device)) if shared else text_reward,
                         tokenizer, train_ids, recipe.run.seed, precision)

    # -- train ------------------------------------------------------------------------------
    checkpoint = stage.last_checkpoint()
    if checkpoint:
        console.print(f"  resuming from {checkpoint}")
    progress = RichProgress("ppo")
    state = SimpleNamespace(is_world_process_zero=stage.is_main_process, max_steps=cfg.steps,
                            global_step=0)

    def on_log(metrics: dict) -> None:
        state.global_step = metrics["step"]
        progress.on_log(None, state, None, logs=metrics)
        progress.on_step_end(None, state, None)

    if checkpoint:
        state.global_step = int(checkpoint.rsplit("-", 1)[-1])
    progress.on_train_begin(None, state, None)
    try:
        log_history = trainer.train(stage.checkpoint_dir, checkpoint, on_log,
                                    on_save=stage.discard_superseded)
    finally:
        progress.on_train_end(None, state, None)
    rewards_after = sampled_rewards(policy, tokenizer, eval_ids, text_reward, cfg,
                                    recipe.run.seed)
    reward_before, reward_after = mean(rewards_before), mean(rewards_after)
    # Over prompts, not draws: a prompt's samples are alike, so counting them as independent
    # would understate the error.
    gain_sem = paired_sem(prompt_means(rewards_before), prompt_means(rewards_after))
    logs = [h for h in log_history if "objective/scores" in h]
    kl_last = float(logs[-1]["objective/kl"])
    console.print(f"  held-out prompts: mean reward {reward_before:.3f} before -> "
                  f"{reward_after:.3f} after (gain {reward_after - reward_before:+.3f} "
                  f"± {gain_sem:.3f}); KL to the reference {kl_last:.3f}")
    if cfg.max_kl is not None and kl_last > cfg.max_kl:
        raise StageFailed(f"ppo: final KL {kl_last:.3f} exceeds ppo.max_kl {cfg.max_kl}; "
                          f"lower ppo.lr or raise ppo.kl_coef")

    # -- save -------------------------------------------------------------------------------
    outputs = {"adapter": "adapter", "loss_curve": "reward_curve.png",
               "log_history": "log_history.json"}
    if cfg.merge:
        outputs["model"] = "model"
    if stage.is_main_process:  # under several processes, rank 0 writes
        save_model(policy, tokenizer, stage.path("adapter"))
        if cfg.merge:
            save_model(policy.merge_and_unload(), tokenizer, stage.path("model"))
        save_loss_curve([{"step": h["step"], "loss": h["objective/scores"]} for h in logs],
                        stage.path("reward_curve.png"), "ppo: mean reward per batch")
        stage.path("log_history.json").write_text(json.dumps(log_history, indent=1))
    track(cfg.report_to, stage, recipe, log_history)
    metrics = {
        "reward_mean_first": float(logs[0]["objective/scores"]),
        "reward_mean_last": float(logs[-1]["objective/scores"]),
        "kl_last": kl_last,
        "kl_coef_last": float(trainer.kl.coef),
        "reward_mean_before": reward_before,
        "reward_mean_after": reward_after,
        "reward_gain": reward_after - reward_before,
        "reward_gain_sem": gain_sem,
        "policy_loss_last": float(logs[-1]["loss/policy_avg"]),
        "value_loss_last": float(logs[-1]["loss/value_avg"]),
        "global_step": trainer.step,
        "world_size": distributed.world_size(),
        "effective_batch_size": cfg.batch_size * distributed.world_size(),
    }
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    stage.finish(metrics, outputs, extra={"reward_tokenizer_shared": shared})
    return metrics


def track(report_to: str, stage, recipe, log_history: list[dict]) -> None:
    """The per-step metrics to the recipe's tracker (rank 0), its files in the stage directory,
    as the Trainer stages do."""
    if report_to == "none" or not stage.is_main_process:
        return
    stage.tracking = tracker_run(report_to, stage, recipe)
    run_name, files = stage.tracking["run_name"], str(stage.work_dir / stage.tracking["dir"])
    if report_to == "wandb":
        import wandb

        run = wandb.init(name=run_name, dir=str(stage.work_dir))
        for h in log_history:
            run.log({k: v for k, v in h.items() if k != "step"}, step=h["step"])
        run.finish()
    elif report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(files)
        for h in log_history:
            for k, v in h.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, h["step"])
        writer.close()


def shares_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id


def query_ids(rows: list[dict], template: Template | ChatTemplate, tokenizer,
              max_length: int) -> list[list[int]]:
    """Each prompt row as the token ids PPO continues (the template's context, truncated)."""
    texts = [template.context(row) for row in rows]
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def use_distinct_pad(tokenizer, queries: list[list[int]], *models) -> None:
    """A pad token that no query contains. PPO masks every pad token out of attention (trl's
    rule, kept), and chat models often pad with their end-of-turn token, which chat prompts are
    full of (SmolLM2 pads with <|im_end|>): the policy would be trained on prompts it cannot
    see."""
    used = {t for ids in queries for t in ids}
    if tokenizer.pad_token_id not in used:
        return
    special = {**dict(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens)),
               **{i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}}
    for token_id, token in sorted(special.items()):
        if token_id not in used and token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            for model in models:
                model.config.pad_token_id = token_id
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.pad_token_id = token_id
            return
    raise UserError(f"ppo: the pad token {tokenizer.pad_token!r} occurs in the prompts and the "
                    f"tokenizer has no other special token to pad with")


HELD_OUT_SAMPLES = 4  # responses sampled per held-out prompt


def prompt_means(rewards: list[float], samples: int = HELD_OUT_SAMPLES) -> list[float]:
    """Each held-out prompt's mean reward (``sampled_rewards`` lists a prompt's samples
    together)."""
    return [mean(rewards[i:i + samples]) for i in range(0, len(rewards), samples)]


@torch.inference_mode()
def sampled_rewards(policy, tokenizer, prompts: list[list[int]], reward: TextReward,
                    cfg: PpoConfig, seed: int, samples: int = HELD_OUT_SAMPLES) -> list[float]:
    """Rewards of responses to held-out prompts (token ids), sampled as PPO samples them
    (temperature, no top-k/top-p), several per prompt, from a fixed seed: the quantity PPO
    maximises. The same seed before and after training pairs the draws, which makes the gain's
    error small."""
    policy.eval()
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    gen = GenerationConfig(max_new_tokens=cfg.response_length, do_sample=True, top_k=0, top_p=1.0,
                           temperature=cfg.temperature, pad_token_id=pad,
                           eos_token_id=tokenizer.eos_token_id)
    sequences = []
    for i in range(0, len(prompts), 8):
        batch = tokenizer.pad({"input_ids": prompts[i:i + 8]}, return_tensors="pt").to(device())
        out = generate_samples(policy, batch["input_ids"], batch["attention_mask"], gen, samples)
        sequences += [[t for t in row if t != pad] for row in out.tolist()]
    return reward.score_ids(sequences)


def generate_samples(model, input_ids, attention_mask, gen: GenerationConfig, samples: int):
    """``samples`` sampled continuations of each (left-padded) prompt, the prompt run once.

    ``generate(num_return_sequences=n)`` copies each prompt n times before the first forward
    pass, so a 90-token chat prompt cost n prefills for a 3-token answer: most of PPO's
    held-out evaluation. Here the prompt but its last token runs once and each sample reads a
    copy of that KV cache. Returns the prompts' ids with the continuations, n rows a prompt."""
    if input_ids.shape[1] < 2:  # nothing to share before the last token
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              generation_config=gen, num_return_sequences=samples)
    head, mask = input_ids[:, :-1], attention_mask[:, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded positions
    cache = model(input_ids=head, attention_mask=mask, position_ids=positions,
                  use_cache=True).past_key_values
    cache.batch_repeat_interleave(samples)
    return model.generate(input_ids=input_ids.repeat_interleave(samples, dim=0),
                          attention_mask=attention_mask.repeat_interleave(samples, dim=0),
                          past_key_values=cache, generation_config=gen)
