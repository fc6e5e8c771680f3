"""`llmctl sft`: supervised fine-tuning with trl's SFTTrainer, LoRA / QLoRA (peft) or full.

Setup (tokenizer, model with the course's stability switches, adapter, data through the recipe's
template) -> score the label task before -> train -> evaluate -> score after -> save the adapter
(or the full model), tokenizer, loss curve and metrics.
"""

from __future__ import annotations

import math

import torch
from trl import SFTConfig, SFTTrainer

from llmctl import distributed
from llmctl.data import hf_dataset, make_template, open_split
from llmctl.errors import UserError
from llmctl.evaluation import candidate_labels, label_hits, task_accuracy_metrics
from llmctl.models import count_params, load_causal_lm, load_tokenizer, lora_config, \
    max_positions
from llmctl.progress import console, stage_header
from llmctl.recipe import Recipe
from llmctl.schema import SftConfig
from llmctl.stages import StageContext
from llmctl.training import ThroughputMeter, capped_eval, finish_training, show_progress, train, \
    training_args


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs
    if cfg.method == "qlora":
        require_qlora_support()

    # -- data -------------------------------------------------------------------------------
    tokenizer = load_tokenizer(inputs["model"], recipe.model)
    source = recipe.data_source("sft", cfg.data)
    template = make_template(source, tokenizer)  # "chat": the model's own chat template
    key = f"data.{cfg.data}"
    train_split = open_split(source, template.fields, "train", key)
    eval_split = open_split(source, template.fields, "eval", key)

    # -- model ------------------------------------------------------------------------------
    model = load_base_model(inputs["model"], recipe, cfg)
    positions = max_positions(model)
    if cfg.packing and positions is not None and cfg.seq_len > positions:
        raise UserError(f"{recipe.source}: sft.seq_len: {cfg.seq_len} exceeds the model's "
                        f"{positions} positions (packing fills every block to seq_len)")
    peft_config = lora_config(cfg.lora, model, "sft.lora") if cfg.method != "full" else None
    stage_header("sft", f"{cfg.method} on {inputs['model']}: {len(train_split):,} train rows, "
                        f"{len(eval_split):,} eval rows")

    eval_rows = eval_split.rows()[:cfg.eval_task_rows]
    labels = candidate_labels(eval_rows, template) if cfg.eval_task else None
    hits_before = label_hits(model, tokenizer, eval_rows, template, labels) if labels else None

    stage = ctx.start()
    cache = str(stage.cache_dir)
    # A chat model learns its assistant turns only, as trl's conversational format does.
    completion_only = cfg.completion_only_loss or source.template == "chat"
    layout = "prompt_completion" if completion_only else "text"
    with distributed.main_process_first():  # one process writes the Arrow cache
        train_ds = hf_dataset(source, "train", key, layout, cache)
        eval_ds = capped_eval(hf_dataset(source, "eval", key, layout, cache), cfg)
    args = training_args(
        cfg, stage, recipe, args_cls=SFTConfig,
        max_length=cfg.seq_len,
        packing=cfg.packing,
        packing_strategy="wrapped",  # the course's ConstantLengthDataset: fill every block
        completion_only_loss=completion_only,
        dataset_text_field="text",
        dataset_kwargs={"skip_prepare_dataset": False},
        eval_packing=cfg.packing,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)
    # trl drops a completion-only row whose prompt alone fills max_length (nothing to learn)
    dropped = 0 if cfg.packing else len(train_ds) - len(trainer.train_dataset)
    if dropped == len(train_ds):
        raise UserError(f"{recipe.source}: sft.seq_len: every {key} training row's prompt fills "
                        f"{cfg.seq_len} tokens, leaving no answer token to learn; raise it")
    if dropped:
        console.print(f"  [yellow]{dropped:,} of {len(train_ds):,} training rows dropped: their "
                      f"prompt fills sft.seq_len ({cfg.seq_len} tokens)[/yellow]")
    if cfg.fp32_norms_and_head:
        keep_head_output_fp32(trainer.model)
    show_progress(trainer, "sft", cfg.batch_size * cfg.grad_accum * cfg.seq_len)
    meter = ThroughputMeter()
    trainer.add_callback(meter)
    trainable, total = count_params(trainer.model, trainable_only=True), count_params(trainer.model)
    console.print(f"  trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")

    # -- train ------------------------------------------------------------------------------
    result, start_step = train(trainer, stage)
    eval_loss = float(trainer.evaluate()["eval_loss"])
    hits_after = label_hits(trainer.model, tokenizer, eval_rows, template, labels) \
        if labels else None

    # -- save -------------------------------------------------------------------------------
    metrics = {
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100 * trainable / total,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "steps_per_second": max(trainer.state.global_step - start_step, 1)
        / result.metrics["train_runtime"],
    }
    if meter.steps_per_second():  # after warm-up, as pretrain's tokens_per_second_steady
        metrics["steps_per_second_steady"] = meter.steps_per_second()
    if labels:
        metrics.update(task_accuracy_metrics(hits_before, hits_after, len(labels)))
    return finish_training(trainer, stage, cfg, tokenizer, ctx.model_output(), metrics)


def require_qlora_support() -> None:
    if not torch.cuda.is_available():
        raise UserError("sft.method: \"qlora\" needs a CUDA GPU (bitsandbytes 4-bit NF4); "
                        "on CPU use method = \"lora\" (bf16 with AMX) or \"full\"")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("sft.method: \"qlora\" needs bitsandbytes: pip install 'llmctl[cuda]'") from None


def load_base_model(path: str, recipe: Recipe, cfg: SftConfig):
    kwargs = {}
    dtype = "bfloat16" if cfg.load_in_bf16 else None
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        dtype = "bfloat16"
    model = load_causal_lm(path, recipe.model, dtype=dtype, **kwargs)
    if cfg.fp32_norms_and_head:
        # The course's stability measure: norms and biases (1-D) in fp32 while weights are bf16.
        for param in model.parameters():
            if param.ndim == 1:
                param.data = param.data.float()
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing and cfg.method == "lora":
        model.enable_input_require_grads()  # adapters need grads flowing into checkpointed blocks
    return model


def keep_head_output_fp32(model) -> None:
    """Cast the LM head's output to fp32 (a hook, so saved weights keep their names)."""
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: output.float())
