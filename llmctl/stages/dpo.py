"""`llmctl dpo`: direct preference optimisation of the SFT model with trl's DPOTrainer.

The simpler alternative to reward + PPO: no reward model, no sampling; the policy learns from
chosen/rejected pairs directly, regularised towards the reference model by ``beta``. With LoRA
the reference is the same model with the adapter switched off. A chat source (``template =
"chat"``) gives the prompt as a user turn and the answers as assistant turns. Setup -> score the
label task before (when the chosen answers are a few labels) -> train -> evaluate
(rewards/accuracies: how often the implicit reward ranks chosen above rejected) -> score after
-> save. No evaluation before training: the policy starts as the reference, so every implicit
reward is 0 and the ranking accuracy 0% (it was measured so, at 2.7 min of the real run's DPO).
"""

from __future__ import annotations


from trl import DPOConfig as TrlDPOConfig
from trl import DPOTrainer

from llmctl import distributed
from llmctl.data import hf_dataset, preference_split, preference_template
from llmctl.errors import UserError
from llmctl.evaluation import candidate_labels, label_hits, task_accuracy_metrics
from llmctl.models import count_params, load_causal_lm, load_tokenizer, lora_config
from llmctl.progress import console, stage_header
from llmctl.stages import StageContext
from llmctl.training import capped_eval, finish_training, show_progress, train, training_args


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs

    source = recipe.data_source("dpo", cfg.data)
    key = f"data.{cfg.data}"
    train_split = preference_split(source, "train", key)
    if "prompt" not in train_split.columns:
        raise UserError(f"{key}.columns: DPO needs a prompt column next to chosen/rejected "
                        f"(map one with columns = {{ prompt = \"...\" }})")

    tokenizer = load_tokenizer(inputs["model"], recipe.model)
    model = load_causal_lm(inputs["model"], recipe.model)
    peft_config = lora_config(cfg.lora, model, "dpo.lora") if cfg.method == "lora" else None
    stage_header("dpo", f"{cfg.method} on {inputs['model']}: {len(train_split):,} pairs, "
                        f"beta {cfg.beta}, loss {cfg.loss_type}")
    # Pairs whose answers are a few labels (right over wrong) are also a task: how often the
    # right label is the model's most likely answer, before and after.
    template = preference_template(source, tokenizer)
    eval_rows = preference_split(source, "eval", key).rows()[:cfg.eval_task_rows]
    labels = candidate_labels(eval_rows, template)
    hits_before = label_hits(model, tokenizer, eval_rows, template, labels) if labels else None

    stage = ctx.start()
    cache = str(stage.cache_dir)
    args = training_args(cfg, stage, recipe, args_cls=TrlDPOConfig, **dpo_settings(cfg))
    with distributed.main_process_first():  # one process writes the Arrow cache
        train_ds = hf_dataset(source, "train", key, "preference", cache)
        eval_ds = capped_eval(hf_dataset(source, "eval", key, "preference", cache), cfg)
    # trl >= 1.13 applies the LM head only where the loss reads it (the completion positions)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=train_ds, eval_dataset=eval_ds, peft_config=peft_config)
    show_progress(trainer, "dpo")
    train(trainer, stage)
    after = trainer.evaluate()
    hits_after = label_hits(trainer.model, tokenizer, eval_rows, template, labels) if labels else None
    console.print(f"  held-out pairs ranked right by the implicit reward: "
                  f"{after['eval_rewards/accuracies']:.1%} (0% before: every reward is 0)")

    metrics = {
        "eval_rewards_accuracy": float(after["eval_rewards/accuracies"]),
        "eval_rewards_margin": float(after["eval_rewards/margins"]),
        "eval_loss": float(after["eval_loss"]),
        "eval_pairs": len(eval_ds),
        "trainable_params": count_params(trainer.model, trainable_only=True),
    }
    if labels:
        metrics.update(task_accuracy_metrics(hits_before, hits_after, len(labels)))
    return finish_training(trainer, stage, cfg, tokenizer, ctx.model_output(), metrics)


def dpo_settings(cfg) -> dict:
    """trl's DPOConfig fields from the recipe's [dpo] table, on top of the Trainer's: beta, the
    length of a pair, and the loss (the recipe's, plus the chosen answers' NLL with RPO)."""
    if cfg.rpo_alpha is None:
        loss = {"loss_type": [cfg.loss_type]}
    else:
        loss = {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.rpo_alpha]}
    return {"beta": cfg.beta, "max_length": cfg.max_length, **loss}
