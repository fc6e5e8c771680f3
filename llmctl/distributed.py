"""Several processes for one training stage: how llmctl launches them and what each may write.

The engine is the standard one: torchrun starts the processes (or ``accelerate launch`` with a
user's config file), and the HF Trainer / trl trainers run DDP, FSDP or DeepSpeed ZeRO from
the TrainingArguments built here. ``llmctl pretrain recipe.toml`` with ``[distributed]
num_processes = 2`` re-launches itself that way; ``accelerate launch -m llmctl ...`` or
``torchrun -m llmctl ...`` typed by hand works the same. Only the main process (rank 0) writes
the run directory: manifests, reports, plots and final artifacts.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from contextlib import contextmanager
from typing import Any

import torch

from llmctl.errors import UserError
from llmctl.schema import DistributedConfig


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def is_launched() -> bool:
    """Inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def init() -> None:
    """Join the process group now, when launched, so stages can synchronise before training
    (the Trainer would otherwise join only when its arguments are built)."""
    if is_launched():
        from accelerate import PartialState

        PartialState(backend=None if torch.cuda.is_available() else "gloo")


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (say, writing a dataset cache), then the others reuse it."""
    if is_launched():
        from accelerate import PartialState

        with PartialState().main_process_first():
            yield
    else:
        yield


def check_supported(cfg: DistributedConfig) -> None:
    """Exit 2 before any work for a strategy this machine or install cannot run."""
    if cfg.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("distributed.strategy: \"deepspeed\" needs the deepspeed package: "
                        "pip install 'llmctl[deepspeed]' (or use strategy = \"fsdp\")")
    if cfg.strategy in ("fsdp", "deepspeed") and not torch.cuda.is_available():
        raise UserError(f"distributed.strategy: \"{cfg.strategy}\" needs CUDA GPUs; on CPU use "
                        f"strategy = \"ddp\" (gloo), which runs the same recipe")
    if cfg.config_file and not os.path.isfile(cfg.config_file):
        raise UserError(f"distributed.config_file: {cfg.config_file} not found")


def should_launch(cfg: DistributedConfig) -> bool:
    """Whether a training stage must start its processes (it is one of them once launched)."""
    return cfg.num_processes > 1 and not is_launched()


def launch_command(cfg: DistributedConfig, argv: list[str]) -> list[str]:
    """The command that runs ``llmctl ARGV`` in ``num_processes`` processes."""
    if cfg.config_file:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                cfg.config_file, "--num_processes", str(cfg.num_processes), "-m", "llmctl", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={cfg.num_processes}", "-m", "llmctl", *argv]


def trainer_arguments(cfg: DistributedConfig, model_type: str | None = None) -> dict[str, Any]:
    """TrainingArguments fields for the strategy (nothing for a single process)."""
    if cfg.strategy == "none":
        return {"ddp_backend": "gloo"} if is_launched() and not torch.cuda.is_available() else {}
    args: dict[str, Any] = {"ddp_backend": "nccl" if torch.cuda.is_available() else "gloo"}
    if cfg.strategy == "ddp":
        args["ddp_find_unused_parameters"] = False
    elif cfg.strategy == "fsdp":
        sharding = {"full": "full_shard", "hybrid": "hybrid_shard",
                    "shard_grad_op": "shard_grad_op"}[cfg.fsdp_sharding]
        args["fsdp"] = f"{sharding} auto_wrap" + (" offload" if cfg.cpu_offload else "")
        fsdp_config: dict[str, Any] = {"use_orig_params": True}
        if cfg.fsdp_wrap:
            fsdp_config["transformer_layer_cls_to_wrap"] = list(cfg.fsdp_wrap)
        args["fsdp_config"] = fsdp_config
    elif cfg.strategy == "deepspeed":
        args["deepspeed"] = deepspeed_config(cfg)
    return args


def deepspeed_config(cfg: DistributedConfig) -> dict[str, Any]:
    """A ZeRO config; "auto" values are filled in by the HF Trainer from TrainingArguments."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": True,
                            "contiguous_gradients": True}
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def stage_argv(recipe, stage: str) -> list[str]:
    """``llmctl STAGE RECIPE --set ...``: the command line that reproduces this stage run."""
    debug = ["--debug"] if "--debug" in sys.argv else []
    return [stage, recipe.source, *[a for item in recipe.overrides for a in ("--set", item)],
            *debug]


def describe(recipe, stage: str) -> dict[str, Any]:
    """What --dry-run shows: the launch command and the resolved strategy settings."""
    cfg = recipe.distributed
    out: dict[str, Any] = {"strategy": cfg.strategy, "num_processes": cfg.num_processes}
    if cfg.num_processes > 1:
        out["launch"] = shlex.join(launch_command(cfg, stage_argv(recipe, stage)))
    if cfg.strategy != "none":
        out["trainer_arguments"] = trainer_arguments(cfg)
    return out


class LaunchFailed(Exception):
    """The launched processes failed; they printed their own error line already."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


def launch(recipe, stage: str) -> None:
    """Run this stage in ``num_processes`` processes and wait for them."""
    import subprocess

    code = subprocess.call(launch_command(recipe.distributed, stage_argv(recipe, stage)))
    if code != 0:
        raise LaunchFailed(2 if code == 2 else 1)
