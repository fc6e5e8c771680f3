"""`llmctl grpo`: group relative policy optimisation with trl's GRPOTrainer, LoRA or full.

Prompts from the recipe's template (a chat model's own chat template) -> rewards from the
recipe (label match, regex, length band, reward models with their own tokenizers, your
function) -> score the held-out label task and the held-out reward before -> train -> score
after -> save the adapter (or the full model), tokenizer, loss curve and metrics.
"""

from __future__ import annotations

import math
from statistics import mean

import torch
from datasets import Dataset
from transformers import GenerationConfig
from trl import GRPOConfig as TrlGRPOConfig
from trl import GRPOTrainer

from llmctl.data import make_template, open_split
from llmctl.evaluation import candidate_labels, label_hits, paired_sem, task_accuracy_metrics
from llmctl.models import count_params, device, load_causal_lm, load_classifier, load_tokenizer, \
    lora_config
from llmctl.progress import console, stage_header
from llmctl.rewards import build_rewards, weighted_rewards
from llmctl.schema import LabelMatchReward
from llmctl.stages import StageContext, reward_model_inputs
from llmctl.training import finish_training, show_progress, train, training_args


def run(ctx: StageContext) -> dict:
    return run_group_rl(ctx, GRPOTrainer, TrlGRPOConfig, loss_type=ctx.cfg.loss_type)


def run_group_rl(ctx: StageContext, trainer_cls, args_cls, **trainer_args) -> dict:
    """GRPO, or another trl trainer of the same shape (RLOO: llmctl.stages.rloo): prompts,
    rewards, held-out scoring, training and outputs as described above; ``trainer_args`` are
    the trainer's own settings."""
    recipe, cfg, inputs, name = ctx.recipe, ctx.cfg, ctx.inputs, ctx.name

    # -- prompts ----------------------------------------------------------------------------
    tokenizer = load_tokenizer(inputs["model"], recipe.model, padding_side="left")
    source = recipe.data_source(name, cfg.data)
    template = make_template(source, tokenizer)
    key = f"data.{cfg.data}"
    # The prompt's fields, and the labels a label_match reward compares answers with.
    labelled = [r.field or template.response_field for r in cfg.rewards
                if isinstance(r, LabelMatchReward)]
    fields = list(dict.fromkeys([*template.prompt_fields, *labelled]))
    train_rows = open_split(source, fields, "train", key).rows()
    eval_rows = open_split(source, fields, "eval", key).rows()
    train_ds = prompt_dataset(train_rows, template)

    # -- policy and rewards -----------------------------------------------------------------
    model = load_causal_lm(inputs["model"], recipe.model)
    peft_config = lora_config(cfg.lora, model, f"{name}.lora") if cfg.method == "lora" else None
    reward_models = {i: (load_classifier(inputs[name], recipe.model).eval(),
                         load_tokenizer(inputs[name], recipe.model))
                     for i, name in reward_model_inputs(cfg.rewards).items()}
    funcs, weights = build_rewards(cfg.rewards, template.response_field, reward_models, name)
    stage_header(name, f"{cfg.method} on {inputs['model']}: {len(train_rows):,} prompts, "
                         f"{cfg.num_generations} completions each, rewards "
                         f"{', '.join(f'{f.__name__} x{w:g}' for f, w in zip(funcs, weights))}")

    # Held-out evidence: the label task (when the answers are a few labels) and the reward.
    task_rows = eval_rows[:cfg.eval_task_rows]
    labels = candidate_labels(task_rows, template) if template.response_field in fields else None
    hits_before = label_hits(model, tokenizer, task_rows, template, labels) if labels else None
    held_out = eval_rows[:cfg.eval_prompts]
    rewards_before = sampled_rewards(model, tokenizer, held_out, template, funcs, weights, cfg,
                                     recipe.run.seed)

    stage = ctx.start()
    args = training_args(
        cfg, stage, recipe, args_cls=args_cls,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        reward_weights=weights,
        eval_strategy="no",  # held-out reward and task accuracy are scored around training
        remove_unused_columns=False,  # the reward functions read the rows' fields
        **trainer_args,
    )
    trainer = trainer_cls(model=model, reward_funcs=funcs, args=args, train_dataset=train_ds,
                          processing_class=tokenizer, peft_config=peft_config)
    show_progress(trainer, name)
    trainable, total = count_params(trainer.model, trainable_only=True), count_params(trainer.model)
    console.print(f"  trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")

    # -- train ------------------------------------------------------------------------------
    train(trainer, stage)
    policy = trainer.model
    rewards_after = sampled_rewards(policy, tokenizer, held_out, template, funcs, weights, cfg,
                                    recipe.run.seed)
    hits_after = label_hits(policy, tokenizer, task_rows, template, labels) if labels else None

    # -- save -------------------------------------------------------------------------------
    logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    before, after = mean(rewards_before), mean(rewards_after)
    sem = paired_sem(rewards_before, rewards_after)
    console.print(f"  held-out reward over {len(held_out)} prompts: {before:.3f} -> {after:.3f} "
                  f"(gain {after - before:+.3f} ± {sem:.3f})")
    metrics = {
        "trainable_params": trainable,
        "all_params": total,
        "reward_mean_first": logged[0] if logged else math.nan,
        "reward_mean_last": logged[-1] if logged else math.nan,
        "eval_reward_before": before,
        "eval_reward_after": after,
        "eval_reward_gain": after - before,
        "eval_reward_gain_sem": sem,
    }
    if labels:
        metrics.update(task_accuracy_metrics(hits_before, hits_after, len(labels)))
    return finish_training(trainer, stage, cfg, tokenizer, ctx.model_output(), metrics,
                           model=policy)


def prompt_dataset(rows: list[dict], template) -> Dataset:
    """The prompts as trl's GRPO reads them: ``prompt`` (the template's rendering up to the
    answer, a chat model's generation prompt included) and the row's fields for the rewards."""
    columns = {"prompt": [template.context(row) for row in rows]}
    for name in rows[0] if rows else ():
        if name != "prompt":
            columns[name] = [row[name] for row in rows]
    return Dataset.from_dict(columns)


@torch.inference_mode()
def sampled_rewards(model, tokenizer, rows: list[dict], template, funcs, weights, cfg,
                    seed: int, batch_size: int = 16) -> list[float]:
    """The summed reward of one completion per held-out prompt, sampled as GRPO samples them
    (the recipe's temperature and length) from a fixed seed: the same seed before and after
    pairs the draws, so the gain gets a paired standard error."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    gen = GenerationConfig(max_new_tokens=cfg.max_completion_length, do_sample=True, top_k=0,
                           top_p=1.0, temperature=cfg.temperature,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompts = [template.context(row) for row in rows]
    completions, completion_ids = [], []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device())
        out = model.generate(**batch, generation_config=gen)[:, batch["input_ids"].shape[1]:]
        for ids in out.tolist():
            if tokenizer.eos_token_id in ids:  # trl's completions stop at (and keep) the eos
                ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
            ids = [t for t in ids if t != tokenizer.pad_token_id or t == tokenizer.eos_token_id]
            completion_ids.append(ids)
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    columns = {name: [row.get(name) for row in rows] for name in rows[0]} if rows else {}
    if was_training:
        model.train()
    return weighted_rewards(funcs, weights, prompts, completions, completion_ids, columns)
