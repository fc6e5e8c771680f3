"""What every Trainer-based stage shares: TrainingArguments from a recipe table, resume, losses."""

from __future__ import annotations

import json
import os
import time
from types import MethodType

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from llmctl import distributed
from llmctl.errors import UserError
from llmctl.models import resolve_precision, save_model
from llmctl.progress import RichProgress, console, save_loss_curve
from llmctl.recipe import Recipe
from llmctl.rundir import StageRun
from llmctl.schema import TrainConfig
from llmctl.trainers import cpu_resume, fused_head


def training_args(cfg: TrainConfig, stage: StageRun, recipe: Recipe,
                  args_cls: type[TrainingArguments] = TrainingArguments,
                  **overrides) -> TrainingArguments:
    """TrainingArguments (or a trl subclass such as SFTConfig) from a recipe's training table,
    with the recipe's multi-process strategy (DDP, FSDP, DeepSpeed) and tracker, writing the
    stage's checkpoints and tracker logs in its run directory."""
    require_tracker(cfg.report_to)
    stage.tracking = tracker_run(cfg.report_to, stage, recipe)
    run_name = stage.tracking["run_name"]
    # Credentials stay in the environment (wandb reads WANDB_API_KEY itself), never in files.
    if cfg.report_to == "wandb":
        os.environ["WANDB_DIR"] = str(stage.work_dir)
        os.environ["WANDB_NAME"] = run_name
    elif cfg.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(stage.work_dir / "logs")  # transformers 5
    return stage_arguments(cfg, recipe, str(stage.checkpoint_dir), args_cls, run_name=run_name,
                           **overrides)


def stage_arguments(cfg: TrainConfig, recipe: Recipe, output_dir: str,
                    args_cls: type[TrainingArguments] = TrainingArguments,
                    **overrides) -> TrainingArguments:
    """What :func:`training_args` builds, without a run directory or tracker: everything that
    decides what a training step computes, so that a benchmark times the stage's own step."""
    precision = resolve_precision(cfg.precision)
    fused_head.compact_on_cpu()
    seed = recipe.run.seed
    eval_every = cfg.eval_steps is not None and cfg.eval_steps > 0
    kwargs = dict(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,  # train_loss_first is the loss at step 1
        eval_strategy="steps" if eval_every else "no",
        eval_steps=cfg.eval_steps if eval_every else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        disable_tqdm=True,  # llmctl draws its own rich progress
        dataloader_drop_last=cfg.dataloader_drop_last,
        dataloader_num_workers=0,
    )
    kwargs.update(distributed.trainer_arguments(recipe.distributed))
    kwargs.update(overrides)
    # TrainingArguments keeps its precision in os.environ (ACCELERATE_MIXED_PRECISION), where a
    # later stage's arguments read it back as their default: after one bf16 stage, every later
    # fp32 stage of the same `llmctl run` (and every process it starts) silently trained in
    # bf16. Each stage's own recipe field decides, so it is set here, every time.
    os.environ["ACCELERATE_MIXED_PRECISION"] = {"bf16": "bf16", "fp16": "fp16"}.get(precision,
                                                                                    "no")
    return args_cls(**kwargs)


def tracker_run(report_to: str, stage: StageRun, recipe: Recipe) -> dict[str, str]:
    """What the manifest records of a stage's tracker run: it is named after the stage and keeps
    its files in the stage directory (``dir``); the tracker records the output directory, so
    each finds the other."""
    tracking = {"report_to": report_to, "run_name": f"{recipe.run.name}-{stage.stage}"}
    if report_to in TRACKER_DIRS:
        tracking["dir"] = TRACKER_DIRS[report_to]
    return tracking


TRACKER_DIRS = {"wandb": "wandb", "tensorboard": "logs"}


def train(trainer: Trainer, stage: StageRun) -> tuple[object, int]:
    """Train, resuming from the stage's last checkpoint when an earlier run was interrupted.

    Returns the TrainOutput and the step this run started from (0 unless resumed).
    """
    checkpoint = stage.last_checkpoint()
    start_step = int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0
    if checkpoint:
        console.print(f"  resuming from {checkpoint}")
        cpu_resume.accept_indexed_cpu()
    trainer.add_callback(DiscardSuperseded(stage))
    return trainer.train(resume_from_checkpoint=checkpoint), start_step


class LossOnlyForward(TrainerCallback):
    """While training a causal LM on its built-in loss, skip what the step never reads.

    Why: under bf16/fp16, accelerate wraps ``model.forward`` so that every half-precision
    output is copied to fp32; the loss is already fp32 (computed inside forward) and the
    Trainer reads nothing else, so the copy of the batch x seq x vocab logits is pure cost.
    The KV cache is likewise built and discarded every step (trl's SFTTrainer turns it off
    the same way). Both are restored at the end: evaluation and scoring see the usual model.
    """

    def __init__(self):
        self.wrapped = None
        self.use_cache = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            self.use_cache, config.use_cache = config.use_cache, False
        forward = model.__dict__.get("forward")
        upcast = getattr(getattr(forward, "__func__", None), "__wrapped__", None)
        if hasattr(upcast, "model_forward"):  # accelerate's ConvertOutputsToFp32
            self.wrapped = forward
            model.forward = MethodType(upcast.model_forward, model)  # autocast stays

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.wrapped is not None:
            model.forward, self.wrapped = self.wrapped, None
        if self.use_cache is not None:
            model.config.use_cache, self.use_cache = self.use_cache, None


class DiscardSuperseded(TrainerCallback):
    """Once this run has saved a checkpoint, an interrupted run's checkpoints with another
    config (kept aside by ``StageRun.begin``) are no longer the only way to resume."""

    def __init__(self, stage: StageRun):
        self.stage = stage

    def on_save(self, args, state, control, **kwargs):
        self.stage.discard_superseded()


def loss_first_last(log_history: list[dict]) -> tuple[float, float]:
    losses = [h["loss"] for h in log_history if "loss" in h]
    if not losses:
        raise RuntimeError("training logged no loss")
    return float(losses[0]), float(losses[-1])


def show_progress(trainer: Trainer, description: str, tokens_per_step: int | None = None) -> Trainer:
    """Replace the Trainer's dict-printing logger with llmctl's rich progress bar."""
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(RichProgress(description, tokens_per_step))
    return trainer


class ThroughputMeter(TrainerCallback):
    """Steady-state optimizer steps per second: the clock starts after the first ``skip`` steps,
    so one-off costs (lazy init, first data fetch, allocator warm-up) are reported apart."""

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), state.global_step)
        if self.start is None:
            self.skip -= 1
            if self.skip <= 0:
                self.start = now
        else:
            self.end = now

    def steps_per_second(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return (self.end[1] - self.start[1]) / (self.end[0] - self.start[0])


TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


def require_tracker(report_to: str) -> None:
    """report_to names a tracker whose package must be installed: say how, before any work."""
    if report_to == "none":
        return
    module, extra = TRACKER_PACKAGES[report_to]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"report_to = \"{report_to}\" needs the {module} package: "
                        f"pip install 'llmctl[{extra}]' (or set report_to = \"none\")")


def save_trained(trainer: Trainer, model, tokenizer, path, stage: StageRun) -> None:
    """The final weights, written once. Under FSDP or ZeRO-3 every rank must call this: the
    Trainer gathers the shards and rank 0 writes them."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        if trainer.is_fsdp_enabled:  # checkpoints are sharded; the model is gathered
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(path))
        if stage.is_main_process:
            (path / "training_args.bin").unlink(missing_ok=True)  # pickled: not an output
            tokenizer.save_pretrained(str(path))
    elif stage.is_main_process:
        save_model(model, tokenizer, path)


def finish_training(trainer: Trainer, stage: StageRun, cfg: TrainConfig, tokenizer, output: str,
                    metrics: dict[str, float], model=None) -> dict[str, float]:
    """How every Trainer stage ends: the final weights (``model``, default the trainer's) saved
    as ``output`` ("model" or "adapter"), the loss curve and log, the stage's ``metrics`` with
    the losses, step and batch and schedule figures added, the manifest written and the stage
    published. Returns all the metrics."""
    save_trained(trainer, trainer.model if model is None else model, tokenizer,
                 stage.path(output), stage)
    logs = save_training_log(trainer, stage)
    first, last = loss_first_last(trainer.state.log_history)
    metrics = {**metrics, "train_loss_first": first, "train_loss_last": last,
               "global_step": trainer.state.global_step,
               **batch_metrics(cfg), **schedule_metrics(trainer)}
    stage.finish(metrics, {output: output, **logs})
    return metrics


def batch_metrics(cfg: TrainConfig) -> dict[str, int]:
    """Samples per optimizer step across all processes, and how many processes there were."""
    world = distributed.world_size()
    return {"world_size": world, "effective_batch_size": cfg.batch_size * cfg.grad_accum * world}


def save_training_log(trainer: Trainer, stage: StageRun) -> dict[str, str]:
    """``loss_curve.png`` and ``log_history.json`` (every logged loss, by step), from rank 0;
    closes the tracker's run; returns the files as manifest outputs."""
    if stage.is_main_process:
        save_loss_curve(trainer.state.log_history, stage.path("loss_curve.png"), stage.stage)
        stage.path("log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    if "wandb" in trainer.args.report_to:
        import wandb

        wandb.finish()  # complete its files before the stage directory is published
    return {"loss_curve": "loss_curve.png", "log_history": "log_history.json"}


def eval_cap(cfg: TrainConfig) -> int | None:
    """Examples ``eval_max_batches`` allows: batches of the whole job, so one process and
    several evaluate the same examples."""
    if not cfg.eval_max_batches:
        return None
    return cfg.eval_max_batches * (cfg.eval_batch_size or cfg.batch_size) * distributed.world_size()


def capped_eval(dataset, cfg: TrainConfig):
    """The Trainer's eval dataset cut to what ``eval_max_batches`` allows (rows, not packed
    blocks: a cap on evaluation cost)."""
    cap = eval_cap(cfg)
    return dataset.select(range(min(len(dataset), cap))) if cap else dataset


def schedule_metrics(trainer: Trainer) -> dict[str, float]:
    """The learning-rate schedule as it ran: peak and last logged rate."""
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    return {"learning_rate_peak": max(rates), "learning_rate_last": rates[-1]} if rates else {}
