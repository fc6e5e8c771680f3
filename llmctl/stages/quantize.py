"""`llmctl quantize`: post-training quantization under an accuracy criterion.

Setup (tokenizer, fp model, held-out metric, calibration data) -> measure the fp model -> try
the backend's settings in order, most aggressive first, until one is within
``tolerable_loss`` of the fp model (INC's accuracy-driven tuning: a relative loss bound and a
trial budget) -> save the accepted model with its tokenizer. Every trial is recorded in
``trials.json``; when none meets the bound the stage fails and publishes nothing.
"""

from __future__ import annotations

import json
import shutil

from llmctl import quantization
from llmctl.data import heldout_blocks, token_blocks
from llmctl.errors import StageFailed, UserError
from llmctl.evaluation import check_tasks, lm_eval_tasks, perplexity
from llmctl.progress import console, stage_header
from llmctl.quantization import QuantizeConfig, describe
from llmctl.recipe import Recipe
from llmctl.stages import StageContext


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs

    # -- setup ------------------------------------------------------------------------------
    model, tokenizer = quantization.fp_model(inputs["model"], recipe.model)  # adapters merged
    score, metric_name, higher_is_better = metric_function(recipe, cfg, tokenizer)
    calibration = calibration_blocks(recipe, cfg, tokenizer)
    trials = quantization.trial_settings(cfg, model)
    stage_header("quantize", f"{describe(cfg.settings())} on {inputs['model']}: "
                             f"{metric_name} within {cfg.tolerable_loss:.1%}, "
                             f"at most {len(trials)} trial(s)")

    stage = ctx.start()
    source_dir = quantization.source_dir(inputs["model"], model, tokenizer, stage.path("fp_model"))

    # -- measure, then try settings until one is good enough -------------------------------
    before = score(model)
    console.print(f"  fp model: {metric_name} {before:.4f}")
    records, accepted = [], None
    for index, settings in enumerate(trials, 1):
        qmodel = quantization.quantize(model, source_dir, settings, calibration)
        after = score(qmodel)
        loss = relative_loss(before, after, higher_is_better)
        ok = loss <= cfg.tolerable_loss
        scored_by = getattr(qmodel, "llmctl_scored_by", None)  # where a backend has a choice
        records.append({"trial": index, "settings": settings, "metric": after,
                        "relative_loss": loss, "accepted": ok,
                        **({"scored_by": scored_by} if scored_by else {})})
        console.print(f"  trial {index}/{len(trials)}: {describe(settings)}: {metric_name} "
                      f"{after:.4f}{f' ({scored_by})' if scored_by else ''}, relative loss "
                      f"{loss:+.2%} {'[green]accepted[/]' if ok else '[red]rejected[/]'}")
        if ok:
            accepted = (settings, qmodel, after, loss)
            break
        del qmodel
    stage.path("trials.json").write_text(json.dumps(
        {"metric": metric_name, "metric_before": before, "tolerable_loss": cfg.tolerable_loss,
         "trials": records}, indent=2) + "\n")
    if accepted is None:
        best = min(records, key=lambda r: r["relative_loss"])
        raise StageFailed(
            f"quantize: no setting kept {metric_name} within tolerable_loss={cfg.tolerable_loss} "
            f"in {len(records)} trial(s); the best lost {best['relative_loss']:.2%} "
            f"({describe(best['settings'])}); trials in {stage.path('trials.json')}")

    # -- save -------------------------------------------------------------------------------
    settings, qmodel, after, loss = accepted
    quantization.save(qmodel, settings, stage.path("model"), tokenizer)
    if source_dir != inputs["model"]:
        shutil.rmtree(source_dir)
    metrics = {
        "size_bytes_before": quantization.tensor_bytes(model),
        "size_bytes_after": quantization.weight_bytes(stage.path("model")),
        "metric_before": before,
        "metric_after": after,
        "relative_loss": loss,
        "tolerable_loss": cfg.tolerable_loss,
        "accepted": 1,
        "trials": len(records),
    }
    metrics["compression"] = metrics["size_bytes_before"] / metrics["size_bytes_after"]
    final = stage.finish(metrics, {"model": "model", "trials": "trials.json"},
                         extra={"metric": metric_name, "settings": settings})
    console.print(f"  {metrics['size_bytes_before'] / 2**20:.1f} MiB -> "
                  f"{metrics['size_bytes_after'] / 2**20:.1f} MiB, {metric_name} {before:.4f} -> "
                  f"{after:.4f} ({loss:+.2%}) -> {final}")
    return metrics


def metric_function(recipe: Recipe, cfg: QuantizeConfig, tokenizer):
    """(score(model) -> float, metric name, higher is better) for the accuracy criterion."""
    if cfg.metric == "perplexity":
        if not cfg.data:
            raise UserError(f"{recipe.source}: quantize.data: missing (name the [data.<name>] "
                            f"source whose eval split measures perplexity)")
        source = recipe.data_source("quantize", cfg.data)
        blocks = heldout_blocks(source, cfg.data, tokenizer, cfg)
        return (lambda model: perplexity(model, blocks, cfg.eval_batch_size)), "perplexity", False

    check_tasks([cfg.task], cfg.task_path, "quantize.task")

    def task_score(model) -> float:
        results = lm_eval_tasks(model, tokenizer, [cfg.task], cfg.task_path, limit=cfg.limit,
                                batch_size=cfg.eval_batch_size,
                                apply_chat_template=cfg.apply_chat_template)
        if cfg.task_metric not in results[cfg.task]:
            raise UserError(f"quantize.task_metric: {cfg.task} reports no {cfg.task_metric!r} "
                            f"(it has {', '.join(sorted(results[cfg.task]))})")
        return results[cfg.task][cfg.task_metric]

    return task_score, f"{cfg.task}.{cfg.task_metric}", True


def calibration_blocks(recipe: Recipe, cfg: QuantizeConfig, tokenizer):
    """GPTQ, AWQ and static INT8 see ``calibration_samples`` blocks of the calibration source's
    train split."""
    if not quantization.calibrates(cfg.settings()):
        return None
    name = cfg.calibration or cfg.data
    if not name:
        raise UserError(f"{recipe.source}: quantize.calibration: missing ({cfg.method} needs "
                        f"calibration data: name a [data.<name>] source)")
    source = recipe.data_source("quantize", name)
    blocks = token_blocks(source, f"data.{name}", "train", tokenizer, cfg.seq_len,
                          cfg.calibration_samples)
    return quantization.Calibration([block["input_ids"] for block in blocks])


def relative_loss(before: float, after: float, higher_is_better: bool) -> float:
    """How much worse, as a fraction of the fp model's figure (negative: better)."""
    if higher_is_better:
        return (before - after) / abs(before) if before else float(after < before)
    return (after - before) / abs(before)
