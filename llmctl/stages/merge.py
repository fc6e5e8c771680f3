"""`llmctl merge`: fold a LoRA adapter into its base model and save a standalone model.

Load base + adapter -> logits on a probe batch -> merge_and_unload -> logits again -> fail if
they differ by more than the tolerance -> save in the recipe's dtype with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from llmctl.errors import StageFailed, UserError
from llmctl.paths import adapter_base
from llmctl.models import check_adapter_base, count_params, load_causal_lm, \
    load_tokenizer, save_model, torch_dtype
from llmctl.progress import console, stage_header
from llmctl.rundir import require_input
from llmctl.stages import StageContext

PROBE_TEXTS = [
    "Question: What is the capital of France?\n\nAnswer: ",
    "The house prices dropped down",
    "def merge(a, b):\n    return",
    "Shares of the company rose 12% after it beat expectations.",
]


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs
    adapter = inputs["adapter"]  # preflight checked it is an adapter directory
    base_path = cfg.base or adapter_base(adapter)
    require_input(base_path, "merge.base" if cfg.base else f"{adapter}/adapter_config.json: "
                                                            f"base_model_name_or_path")
    check_adapter_base(adapter, base_path, "merge.base" if cfg.base else
                       f"{adapter}/adapter_config.json: base_model_name_or_path",
                       cfg.allow_other_base)
    inputs["base"] = base_path
    stage_header("merge", f"{adapter} into {base_path}")

    # Merge in fp32 so the check measures the merge, not rounding; cast when saving.
    base = load_causal_lm(base_path, recipe.model, dtype="float32")
    tokenizer = load_tokenizer(adapter if (Path(adapter) / "tokenizer_config.json").exists()
                               else base_path, recipe.model)
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"merge.adapter: {adapter} does not fit base {base_path} "
                        f"({' '.join(str(err).split())[:200]})") from None
    model.eval()
    probe = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.inference_mode():
        logits_adapter = model(**probe).logits
        merged = model.merge_and_unload()
        logits_merged = merged(**probe).logits
    mask = probe["attention_mask"].bool()
    max_diff = float((logits_adapter - logits_merged).abs()[mask].max())
    console.print(f"  max |logit difference| merged vs base+adapter: {max_diff:.2e} "
                  f"(tolerance {cfg.tolerance:g})")
    if not max_diff <= cfg.tolerance:
        raise StageFailed(f"merge: merged model differs from base+adapter by {max_diff:.3g} "
                          f"> merge.tolerance {cfg.tolerance:g}; nothing was saved")

    stage = ctx.start()
    dtype = torch_dtype(cfg.dtype if cfg.dtype != "auto" else recipe.model.dtype)
    if dtype != "auto":
        merged = merged.to(dtype)
    save_model(merged, tokenizer, stage.path("model"))
    metrics = {"max_abs_logit_diff": max_diff, "num_params": count_params(merged)}
    stage.finish(metrics, {"model": "model"})
    return metrics
