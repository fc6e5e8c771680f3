"""`llmctl reward`: train a scalar reward model on chosen/rejected pairs with trl's RewardTrainer.

The backbone is either the upstream SFT model with a fresh one-label head (the InstructGPT way)
or an encoder of the BERT/DeBERTa family, pretrained or built from a config with its own
tokenizer (the course pairs an OPT policy with a DeBERTa reward model). Setup -> train ->
score held-out pairs (accuracy, mean margin) -> save a standalone model + its tokenizer.
"""

from __future__ import annotations

from trl import RewardConfig as TrlRewardConfig

from llmctl import distributed
from llmctl.data import hf_dataset, preference_split
from llmctl.evaluation import preference_accuracy
from llmctl.models import build_classifier, count_params, human_count, load_classifier, \
    load_tokenizer, lora_config
from llmctl.progress import console, stage_header
from llmctl.stages import StageContext
from llmctl.trainers.reward import EncoderFriendlyRewardTrainer
from llmctl.training import capped_eval, finish_training, show_progress, train, training_args

EVAL_PAIRS = 200  # held-out pairs scored for eval_accuracy


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs

    # -- data -------------------------------------------------------------------------------
    source = recipe.data_source("reward", cfg.data)
    key = f"data.{cfg.data}"
    train_split = preference_split(source, "train", key)
    eval_rows = preference_split(source, "eval", key).rows()[:EVAL_PAIRS]

    # -- model ------------------------------------------------------------------------------
    if cfg.init == "config":
        tokenizer = load_tokenizer(inputs["tokenizer"], recipe.model)
        model = build_classifier(cfg.architecture, cfg.config, tokenizer, "reward.config")
        origin = f"new {cfg.architecture} from config, tokenizer {inputs['tokenizer']}"
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or inputs["model"], recipe.model)
        model = load_classifier(inputs["model"], recipe.model)
        origin = inputs["model"]
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders find the last token by it
    peft_config = lora_config(cfg.lora, model, "reward.lora", task_type="SEQ_CLS") \
        if cfg.method == "lora" else None
    stage_header("reward", f"{origin} ({human_count(count_params(model))} params), "
                           f"{len(train_split):,} pairs")

    stage = ctx.start()
    cache = str(stage.cache_dir)
    with distributed.main_process_first():  # one process writes the Arrow cache
        train_ds = tokenize_pairs(hf_dataset(source, "train", key, "preference", cache),
                                  tokenizer, cfg.max_length)
        eval_ds = tokenize_pairs(capped_eval(hf_dataset(source, "eval", key, "preference", cache),
                                             cfg), tokenizer, cfg.max_length)
    args = training_args(cfg, stage, recipe,
                         args_cls=TrlRewardConfig, max_length=cfg.max_length,
                         disable_dropout=True)
    trainer = EncoderFriendlyRewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, peft_config=peft_config)
    show_progress(trainer, "reward")

    # -- train ------------------------------------------------------------------------------
    train(trainer, stage)
    eval_loss = float(trainer.evaluate()["eval_loss"])
    trained = trainer.model.merge_and_unload() if cfg.method == "lora" else trainer.model
    accuracy, margin = preference_accuracy(trained, tokenizer, eval_rows, cfg.max_length)
    console.print(f"  held-out pairs: chosen scored above rejected in {accuracy:.1%} "
                  f"(mean margin {margin:.3f})")

    # -- save -------------------------------------------------------------------------------
    metrics = {"eval_accuracy": accuracy, "eval_reward_margin": margin, "eval_loss": eval_loss,
               "eval_pairs": len(eval_rows), "num_params": count_params(trained)}
    return finish_training(trainer, stage, cfg, tokenizer, "model", metrics, model=trained)


def tokenize_pairs(dataset, tokenizer, max_length: int):
    """chosen_ids / rejected_ids with the reward tokenizer's own special tokens ([CLS] ... [SEP]
    for an encoder), truncated to max_length; trl then skips its eos-appending preprocessing."""

    def encode(row):
        prompt = row.get("prompt") or ""
        chosen = tokenizer(prompt + row["chosen"], truncation=True, max_length=max_length)
        rejected = tokenizer(prompt + row["rejected"], truncation=True, max_length=max_length)
        return {"chosen_ids": chosen["input_ids"], "rejected_ids": rejected["input_ids"]}

    return dataset.map(encode, remove_columns=dataset.column_names)
