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
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
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


def check_supported(recipe, stage: str) -> None:
    """Exit 2 before any work for a strategy this machine or install cannot run, or a
    multi-machine job with a setting missing."""
    cfg = recipe.distributed
    if cfg.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("distributed.strategy: \"deepspeed\" needs the deepspeed package: "
                        "pip install 'llmctl[deepspeed]' (or use strategy = \"fsdp\")")
    if cfg.strategy == "fsdp" and not torch.cuda.is_available():
        # accelerate 1.16 turns FSDP on only for GPU-like devices (state.py): on CPU it drops
        # the FSDP plugin and the Trainer would train plain DDP under the name "fsdp".
        raise UserError("distributed.strategy: \"fsdp\" needs CUDA GPUs (accelerate runs "
                        "FSDP only there; on CPU it would silently train as DDP); on CPU use "
                        "strategy = \"ddp\" (gloo) or \"deepspeed\"")
    if cfg.config_file and not os.path.isfile(cfg.config_file):
        raise UserError(f"distributed.config_file: {cfg.config_file} not found")
    job_nodes(recipe, stage)


@dataclass(frozen=True)
class Nodes:
    """The machines of one job: how many, which one this is, where they meet."""

    nnodes: int
    node_rank: int
    rdzv_endpoint: str | None
    rdzv_id: str


RDZV_PORT = 29400  # torchrun's default c10d port


def job_nodes(recipe, stage: str, env: dict[str, str] | None = None) -> Nodes:
    """``[distributed]``'s machine settings; each one left out comes from the environment a
    SLURM job step sets, so one batch script runs the same recipe on every machine."""
    cfg, env = recipe.distributed, os.environ if env is None else env
    if cfg.strategy == "none":
        return Nodes(1, 0, None, "")
    nnodes = cfg.nnodes if cfg.nnodes is not None else _env_int(env, "SLURM_NNODES", 1)
    if nnodes < 1:
        raise UserError(f"distributed.nnodes: must be >= 1, not {nnodes} ($SLURM_NNODES)")
    rdzv_id = cfg.rdzv_id or env.get("SLURM_JOB_ID") or f"{recipe.run.name}-{stage}"
    if nnodes == 1:
        return Nodes(1, 0, None, rdzv_id)
    node_rank = cfg.node_rank if cfg.node_rank is not None else _env_int(env, "SLURM_NODEID")
    if node_rank is None:
        raise UserError(f"distributed.node_rank: needed with nnodes = {nnodes} (0 on the "
                        f"machine that holds the run directory's lock, 1 to {nnodes - 1} on "
                        f"the others; SLURM sets $SLURM_NODEID)")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"distributed.node_rank: must be 0 to {nnodes - 1}, not {node_rank}")
    endpoint = cfg.rdzv_endpoint
    if endpoint is None and env.get("SLURM_JOB_NODELIST"):
        endpoint = f"{first_host(env['SLURM_JOB_NODELIST'])}:{RDZV_PORT}"
    if endpoint is None:
        raise UserError(f"distributed.rdzv_endpoint: needed with nnodes = {nnodes}: host:port "
                        f"of one of the machines, the same on all (SLURM: the job's first "
                        f"host by default)")
    return Nodes(nnodes, node_rank, endpoint, rdzv_id)


def _env_int(env, name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name}: \"{value}\" is not a whole number") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04],gpu7`` -> ``node01``): scontrol's
    own expansion where SLURM is installed, else :func:`expand_nodelist`."""
    if shutil.which("scontrol"):
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                              text=True)
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()[0]
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise UserError(f"$SLURM_JOB_NODELIST: no host in \"{nodelist}\"")
    return hosts[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in full: ``node[01-03,7],gpu7`` -> node01 node02 node03
    node7 gpu7; several bracket groups in one name (``r[1-2]n[1-2]``) multiply; zero padding
    is kept."""
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            options = [text + n for n in _expand_ranges(ranges, nodelist)] if ranges else [text]
            expanded = [head + tail for head in expanded for tail in options]
        hosts.extend(h for h in expanded if h)
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise UserError(f"$SLURM_JOB_NODELIST: cannot read \"[{ranges}]\" in \"{nodelist}\"")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1))
    return out


def should_launch(recipe, stage: str) -> bool:
    """Whether a training stage must start its processes (it is one of them once launched):
    under torchrun: several processes or machines, and FSDP / ZeRO even in one process
    (they need its process group)."""
    cfg = recipe.distributed
    return not is_launched() and \
        (cfg.num_processes > 1 or cfg.strategy in ("fsdp", "deepspeed")
         or job_nodes(recipe, stage).nnodes > 1)


def lock_held_by_node_0(recipe, stage: str) -> bool:
    """On machines other than node 0 of a multi-machine job, llmctl's launcher of a training
    stage does not lock the (shared) run directory: node 0's launcher holds the lock for the
    whole job."""
    return not is_launched() and job_nodes(recipe, stage).node_rank > 0


def launch_command(recipe, stage: str, argv: list[str]) -> list[str]:
    """The command that runs ``llmctl ARGV`` in ``num_processes`` processes on this machine,
    joined with the other machines' when there are several."""
    cfg, job = recipe.distributed, job_nodes(recipe, stage)
    if cfg.config_file:
        machines = []
        if job.nnodes > 1:
            host, _, port = job.rdzv_endpoint.rpartition(":")
            machines = ["--num_machines", str(job.nnodes), "--machine_rank", str(job.node_rank),
                        "--main_process_ip", host, "--main_process_port", port,
                        "--rdzv_backend", "c10d"]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                cfg.config_file, *machines, "--num_processes",
                str(cfg.num_processes * job.nnodes), "-m", "llmctl", *argv]
    if job.nnodes == 1:
        nodes = ["--standalone"]
    else:
        # No --node-rank: under c10d torchrun ignores it (and warns); the rendezvous numbers
        # the machines. Global rank 0, which writes the run directory, may be on any of them.
        nodes = ["--nnodes", str(job.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 job.rdzv_endpoint, "--rdzv-id", job.rdzv_id]
    return [sys.executable, "-m", "torch.distributed.run", *nodes,
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
        # Checkpoints sharded (each rank writes its part); the final weights are gathered
        # into one ordinary model (training.save_trained).
        fsdp_config: dict[str, Any] = {"fsdp_version": cfg.fsdp_version,
                                       "state_dict_type": "SHARDED_STATE_DICT"}
        if cfg.fsdp_version == 1:
            fsdp_config["use_orig_params"] = True
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
    cfg, job = recipe.distributed, job_nodes(recipe, stage)
    out: dict[str, Any] = {"strategy": cfg.strategy, "num_processes": cfg.num_processes}
    if job.nnodes > 1:
        out.update(nnodes=job.nnodes, node_rank=job.node_rank, rdzv_endpoint=job.rdzv_endpoint,
                   rdzv_id=job.rdzv_id)
    if should_launch(recipe, stage):
        out["launch"] = shlex.join(launch_command(recipe, stage, stage_argv(recipe, stage)))
    if cfg.strategy != "none":
        out["trainer_arguments"] = trainer_arguments(cfg)
    return out


class LaunchFailed(Exception):
    """The launched processes failed; they printed their own error line already."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


def launch(recipe, stage: str) -> None:
    """Run this stage in ``num_processes`` processes (on each machine) and wait for them."""
    code = subprocess.call(launch_command(recipe, stage, stage_argv(recipe, stage)))
    if code != 0:
        raise LaunchFailed(2 if code == 2 else 1)
