"""`llmctl pretrain`: train a causal LM from a config (or continue a checkpoint) on streamed text.

Setup (tokenizer, model, data) -> train with the HF Trainer -> evaluate -> save model, tokenizer,
loss curve and metrics. Reads rows from Deep Lake chunk by chunk and packs them into
``seq_len`` blocks, so the corpus never has to fit in memory.
"""

from __future__ import annotations

import math

from transformers import Trainer, default_data_collator

from llmctl import distributed
from llmctl.data import TokenBlocks, make_template, open_split, token_blocks
from llmctl.errors import UserError
from llmctl.models import build_causal_lm, count_params, human_count, load_causal_lm, load_tokenizer
from llmctl.progress import console, stage_header
from llmctl.stages import StageContext
from llmctl.training import LossOnlyForward, ThroughputMeter, eval_cap, finish_training, \
    show_progress, train, training_args


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs

    # -- setup ------------------------------------------------------------------------------
    tokenizer_path = inputs.get("tokenizer") or inputs.get("model") \
        or recipe.model.name_or_path
    if not tokenizer_path:
        raise UserError(f"{recipe.source}: pretrain.tokenizer: missing (and no model.tokenizer "
                        f"or model.name_or_path to take it from)")
    tokenizer = load_tokenizer(tokenizer_path, recipe.model)
    if cfg.init == "config":
        model = build_causal_lm(cfg.architecture, cfg.config, tokenizer, cfg.seq_len)
        origin = f"new {cfg.architecture} from config"
    else:
        model = load_causal_lm(inputs["model"], recipe.model)
        origin = f"continuing {inputs['model']}"
    num_params = count_params(model)
    stage_header("pretrain", f"{origin}: {num_params:,} parameters ({human_count(num_params)})")

    source = recipe.data_source("pretrain", cfg.data)
    template = make_template(source, tokenizer)
    key = f"data.{cfg.data}"
    train_split = open_split(source, template.fields, "train", key)
    train_blocks = TokenBlocks(train_split, template, tokenizer, cfg.seq_len, cfg.pack, repeat=True)
    eval_blocks = token_blocks(source, key, "eval", tokenizer, cfg.seq_len, eval_cap(cfg), cfg.pack)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * distributed.world_size() * cfg.seq_len
    max_steps = cfg.max_steps
    if max_steps <= 0:
        # The stream repeats forever, so epochs become a step count: one counting pass.
        n_blocks = TokenBlocks(train_split, template, tokenizer, cfg.seq_len, cfg.pack).count()
        max_steps = max(1, math.ceil(cfg.epochs * n_blocks / (cfg.batch_size * cfg.grad_accum)))
    console.print(f"  data: {len(train_split):,} train rows, {len(eval_blocks):,} eval blocks of "
                  f"{cfg.seq_len} tokens; {max_steps:,} steps of {tokens_per_step:,} tokens")

    stage = ctx.start()
    args = training_args(cfg, stage, recipe,
                         max_steps=max_steps)
    trainer = Trainer(model=model, args=args, train_dataset=train_blocks,
                      eval_dataset=eval_blocks, data_collator=default_data_collator)
    show_progress(trainer, "pretrain", tokens_per_step)
    meter = ThroughputMeter()
    trainer.add_callback(meter)
    trainer.add_callback(LossOnlyForward())

    # -- train ------------------------------------------------------------------------------
    result, start_step = train(trainer, stage)
    eval_loss = float(trainer.evaluate()["eval_loss"])

    # -- save -------------------------------------------------------------------------------
    steps_run = trainer.state.global_step - start_step
    metrics = {
        "num_params": num_params,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "tokens_per_second": tokens_per_step * max(steps_run, 1) / result.metrics["train_runtime"],
        "train_tokens": tokens_per_step * trainer.state.global_step,
    }
    if meter.steps_per_second():
        metrics["tokens_per_second_steady"] = tokens_per_step * meter.steps_per_second()
    metrics = finish_training(trainer, stage, cfg, tokenizer, "model", metrics)
    console.print(f"  loss {metrics['train_loss_first']:.3f} -> {metrics['train_loss_last']:.3f}, "
                  f"eval perplexity {metrics['eval_perplexity']:.2f}, "
                  f"{metrics['tokens_per_second']:,.0f} tokens/s -> {stage.final_dir}")
    return metrics

