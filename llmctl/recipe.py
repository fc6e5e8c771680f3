"""Recipe schema: load a TOML file, apply ``--set`` overrides, validate, resolve stage inputs.

A recipe has a ``[run]`` table, a shared ``[model]`` table, named data sources under
``[data.<name>]`` and one table per stage. Every table is strict: an unknown key, a wrong type
or a missing required key is a :class:`UserError` that names the file and the dotted key.
Relative paths in a recipe are relative to the directory you run ``llmctl`` from.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, \
    model_validator

from llmctl.errors import UserError
from llmctl.paths import is_local

# The order `llmctl run` executes stages in.
PIPELINE = ("pretrain", "sft", "merge", "reward", "ppo", "dpo", "quantize", "bench", "generate")
# Stages that produce a model, latest first: the default input of the stages after them.
MODEL_STAGES = ("ppo", "dpo", "merge", "sft", "pretrain")

Precision = Literal["auto", "fp32", "bf16", "fp16"]
# transformers' SchedulerType values (tests check the two agree).
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                    "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"]


class Section(BaseModel):
    # strict: TOML already has real types, so "8" for an int is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


class RunConfig(Section):
    name: str = "llmctl"
    dir: str | None = None  # default: runs/<name>
    seed: int = 42

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The default run directory is runs/<name>: a name must not lead out of runs/.
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError("a run name, not a path (use run.dir or --run-dir for a directory)")
        return name


class ModelConfig(Section):
    name_or_path: str | None = None  # hub id or local directory; the base when nothing upstream
    tokenizer: str | None = None  # default: the model's own
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False  # also load pickled weights (pytorch_model.bin): runs their code
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class DataSource(Section):
    path: str  # local dir, mem://, hub://org/name or al://org/name
    columns: dict[str, str] = Field(default_factory=dict)  # template field -> dataset column
    template: str = "text"  # a named template (llmctl.data.TEMPLATES), a format string, or "chat"
    # template = "chat": the tokenizer's chat template renders each row as a conversation:
    # a `messages` field (a list of {role, content}), or, when `user` is set, a user turn
    # (`user`, a format string over the row's fields) answered by the `assistant` field,
    # after an optional `system` prompt.
    system: str | None = None
    user: str | None = None
    assistant: str = "response"
    query: str | None = None  # TQL, e.g. "SELECT * WHERE contains(text, 'tax')"
    eval_path: str | None = None  # separate evaluation dataset; else split off eval_fraction
    eval_query: str | None = None
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    limit: int | None = Field(None, ge=1)  # use at most this many rows (after the query)


class DistributedConfig(Section):
    """Several processes for the training stages (see llmctl.distributed)."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    num_processes: int = 1  # per machine; > 1 makes `llmctl STAGE` launch itself with torchrun
    config_file: str | None = None  # your accelerate config (may name a DeepSpeed JSON): wins
    fsdp_sharding: Literal["full", "hybrid", "shard_grad_op"] = "full"
    fsdp_wrap: list[str] = Field(default_factory=list)  # layer classes; default: the model's own
    zero_stage: Literal[1, 2, 3] = 2
    cpu_offload: bool = False  # FSDP parameters / ZeRO optimizer state (and params at stage 3)

    @model_validator(mode="after")
    def _check(self) -> "DistributedConfig":
        if self.num_processes < 1:
            raise ValueError("num_processes: must be >= 1")
        if self.num_processes > 1 and self.strategy == "none" and not self.config_file:
            raise ValueError("num_processes: > 1 needs a strategy (ddp, fsdp or deepspeed)")
        return self


class TrainConfig(Section):
    """Knobs every Trainer-based stage shares."""

    data: str | None = None  # name of a [data.<name>] source
    max_steps: int = Field(-1, ge=-1)  # > 0 wins over epochs
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, ge=0)
    scheduler: Scheduler = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)  # None: evaluate once at the end only
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    # cap on evaluation batches of the whole job (None: all)
    eval_max_batches: int | None = Field(None, ge=1)
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    dataloader_drop_last: bool = False


class PretrainConfig(TrainConfig):
    init: Literal["config", "pretrained"] = "config"  # from scratch, or continue a checkpoint
    architecture: Literal["gpt2", "opt", "llama"] = "gpt2"
    config: dict[str, Any] = Field(default_factory=dict)  # passed to the architecture's Config
    model: str | None = None  # checkpoint to continue from (init = "pretrained")
    tokenizer: str | None = None  # default: model.tokenizer or model.name_or_path
    seq_len: int = Field(512, ge=2)
    pack: bool = True  # concatenate documents into seq_len blocks, else truncate/pad each
    lr: float = Field(5e-4, ge=0)


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] | None = None  # None: a per-architecture default


class SftConfig(TrainConfig):
    model: str | None = None  # default: upstream pretrain output, else model.name_or_path
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    seq_len: int = Field(1024, ge=2)
    packing: bool = True
    completion_only_loss: bool = False
    load_in_bf16: bool = False
    fp32_norms_and_head: bool = False  # keep 1-D params and the LM head output in fp32
    eval_task: bool = True  # score label log-likelihood accuracy before and after training
    lr: float = Field(1e-4, ge=0)


class RewardConfig(TrainConfig):
    """A scalar reward head (sequence classification, 1 label) trained on chosen/rejected pairs."""

    model: str | None = None  # backbone; default: the upstream sft/merge model (InstructGPT way)
    init: Literal["pretrained", "config"] = "pretrained"
    architecture: Literal["bert", "deberta-v2", "gpt2", "opt", "llama"] = "bert"  # init = "config"
    config: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None  # default: the backbone's own
    method: Literal["full", "lora"] = "full"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    max_length: int = Field(512, ge=2)
    lr: float = Field(2e-5, ge=0)
    scheduler: Scheduler = "linear"


class PpoConfig(Section):
    """RLHF with trl's PPO: a LoRA policy against a reward model, KL-penalised to the reference."""

    data: str | None = None  # prompts; the source's template turns a row into a query
    model: str | None = None  # policy; default: the upstream merge/sft model
    reward_model: str | None = None  # default: <run_dir>/reward/model
    lora: LoraConfig = Field(default_factory=LoraConfig)
    steps: int = Field(100, ge=1)  # PPO batches (each: rollout, score, ppo_epochs of updates)
    batch_size: int = Field(32, ge=1)  # rollouts per batch (the course: 32)
    mini_batches: int = Field(8, ge=1)  # the course: mini-batch 4 of 32 -> 8 mini-batches
    grad_accum: int = Field(1, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    lr: float = Field(1.41e-5, ge=0)
    query_max_length: int = Field(400, ge=1)
    response_length: int = Field(64, ge=1)  # new tokens per response (trl's v2 PPO: a maximum)
    temperature: float = Field(1.0, gt=0)
    kl_coef: float = 0.2  # initial KL coefficient
    kl_target: float | None = None  # adapt kl_coef to this KL (Ziegler et al.); None: fixed
    kl_horizon: int = 10000
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = 0.2
    vf_coef: float = 0.1
    missing_eos_penalty: float | None = None
    reward_batch_size: int = Field(16, ge=1)
    reward_max_length: int = Field(400, ge=2)
    # What the reward model reads: a format string over the prompt row's fields and {response}
    # (the policy's answer alone), e.g. "{response}: {text}"; default: the query and response.
    reward_text: str | None = None
    eval_prompts: int = Field(32, ge=1)  # held-out prompts scored before and after PPO
    max_kl: float | None = None  # fail the stage if the final KL to the reference exceeds this
    precision: Precision = "auto"
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(1, ge=1)
    merge: bool = False  # also write a merged standalone model
    report_to: Literal["none", "wandb", "tensorboard"] = "none"


    @field_validator("reward_text")
    @classmethod
    def _reward_text(cls, value: str | None) -> str | None:
        if value is not None and "{response}" not in value:
            raise ValueError("must contain {response}, the policy's answer")
        return value


class DpoConfig(TrainConfig):
    model: str | None = None  # default: the upstream merge/sft model
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"  # trl's names: sigmoid, ipo, hinge, robust, ...
    max_length: int = Field(512, ge=2)
    lr: float = Field(5e-6, ge=0)


class MergeConfig(Section):
    adapter: str | None = None  # default: upstream sft (or ppo) adapter
    base: str | None = None  # default: the base recorded in the adapter
    allow_other_base: bool = False  # merge into a base other than the one it was trained on
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tolerance: float = Field(1e-3, ge=0)


class QuantizeConfig(Section):
    """Post-training quantization with an accuracy criterion (see llmctl.quantization)."""

    model: str | None = None  # default: the last trained model (ppo > dpo > merge > sft > pretrain)
    backend: Literal["inc", "torch", "openvino", "bnb"] = "inc"
    method: str = "rtn"  # inc: rtn gptq awq; torch: dynamic; openvino: weight static; bnb: weight
    bits: Literal[4, 8] = 4
    group_size: int = Field(128, ge=-1)
    sym: bool = True
    # openvino static: SmoothQuant first, with this migration strength in [0, 1] (0.95 is
    # NNCF's default for transformers).
    smooth_quant: bool = True
    smooth_quant_alpha: float = Field(0.95, ge=0, le=1)
    # Calibration for GPTQ/AWQ/static: rows of a [data.<name>] source, as seq_len-token blocks.
    calibration: str | None = None  # default: the metric's data source
    calibration_samples: int = Field(32, ge=1)
    # The accuracy criterion: a metric measured before and after on held-out data.
    metric: Literal["perplexity", "task"] = "perplexity"
    data: str | None = None  # perplexity: the [data.<name>] source whose eval split is scored
    seq_len: int = Field(256, ge=2)
    eval_batch_size: int = Field(4, ge=1)
    eval_max_batches: int | None = Field(16, ge=1)
    task: str | None = None  # metric = "task": an lm-eval task name
    task_path: str | None = None  # directory of local lm-eval YAML tasks
    task_metric: str = "acc"
    limit: int | None = None  # lm-eval documents per task
    apply_chat_template: bool = False  # task prompts as a user turn in the model's chat template
    tolerable_loss: float = 0.01  # relative: 0.01 = at most 1% worse than the fp model
    max_trials: int = 10

    @model_validator(mode="after")
    def _check(self) -> "QuantizeConfig":
        if self.tolerable_loss < 0:
            raise ValueError("tolerable_loss: must be >= 0")
        if self.max_trials < 1:
            raise ValueError("max_trials: must be >= 1")
        if self.metric == "task" and not self.task:
            raise ValueError("task: metric = \"task\" needs task (an lm-eval task name)")
        methods = QUANTIZE_METHODS[self.backend]
        if self.method not in methods:
            raise ValueError(f"method: {self.method!r} is not a method of backend "
                             f"\"{self.backend}\" (methods: {', '.join(methods)})"
                             + (INC_INT8_HINT if self.backend == "inc" else ""))
        if self.backend == "torch" and self.bits != 8:
            raise ValueError("bits: backend \"torch\" does dynamic INT8 only (bits = 8)")
        if self.backend == "openvino" and self.method == "static" and self.bits != 8:
            raise ValueError("bits: openvino static quantization is INT8 (bits = 8)")
        return self


# Which methods each quantization backend runs (llmctl.quantization).
QUANTIZE_METHODS = {"inc": ("rtn", "gptq", "awq"), "torch": ("dynamic",),
                    "openvino": ("weight", "static"), "bnb": ("weight",)}
INC_INT8_HINT = ("; neural-compressor 3.x runs dynamic/static INT8 through a PT2E graph export "
                 "that cannot drive generate(): use backend = \"torch\", method = \"dynamic\" or "
                 "backend = \"openvino\", method = \"static\"")


class LatencyConfig(Section):
    """Generation timing: forced lengths (min = max new tokens), median of several runs."""

    prompt_tokens: int = Field(32, ge=1)
    new_tokens: int = Field(64, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    num_beams: list[int] = Field(default_factory=lambda: [1, 4])
    runs: int = Field(3, ge=0)


class BenchConfig(Section):
    # Stage names ("merge", "quantize", ...) or model paths; default: the last trained model
    # and, when the recipe quantizes, the quantized one: the vanilla-vs-quantized table.
    models: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=list)  # lm-eval tasks (registry or task_path)
    task_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = False  # task prompts as a user turn in the model's chat template
    data: str | None = None  # perplexity on this source's eval split
    seq_len: int = Field(256, ge=2)
    eval_batch_size: int = Field(4, ge=1)
    eval_max_batches: int | None = Field(16, ge=1)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)  # runs = 0: no timing


class GenerateConfig(Section):
    model: str | None = None  # default: the last model-producing stage of the recipe
    # named template, format string, or "chat" (the model's chat template; prompt = user turn);
    # the prompt is the text before the template's last field
    template: str | None = None
    system: str | None = None  # template = "chat": a system prompt before each user turn
    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = None
    max_new_tokens: int = Field(64, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    do_sample: bool = False
    num_beams: int = Field(1, ge=1)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    repetition_penalty: float = Field(1.0, gt=0)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(0, ge=0)
    num_return_sequences: int = Field(1, ge=1)
    stop: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "GenerateConfig":
        if self.num_return_sequences > max(self.num_beams, 1) and not self.do_sample:
            raise ValueError("num_return_sequences: more than num_beams needs do_sample = true")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens: more than max_new_tokens")
        return self


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: dict[str, DataSource] = Field(default_factory=dict)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    pretrain: PretrainConfig | None = None
    sft: SftConfig | None = None
    merge: MergeConfig | None = None
    reward: RewardConfig | None = None
    ppo: PpoConfig | None = None
    dpo: DpoConfig | None = None
    quantize: QuantizeConfig | None = None
    bench: BenchConfig | None = None
    generate: GenerateConfig | None = None

    # Where the recipe came from; not a TOML key.
    source: str = Field(default="<recipe>", exclude=True)
    overrides: list[str] = Field(default_factory=list, exclude=True)  # the --set items applied

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def stages(self) -> list[str]:
        return [s for s in PIPELINE if getattr(self, s) is not None]

    def stage_config(self, stage: str) -> Any:
        section = getattr(self, stage, None)
        if section is None:
            raise UserError(f"{self.source}: the recipe has no [{stage}] table")
        return section

    def data_source(self, stage: str, name: str | None, key: str = "data") -> DataSource:
        if name is None:
            raise UserError(f"{self.source}: {stage}.{key}: missing (name a [data.<name>] source)")
        if name not in self.data:
            known = ", ".join(sorted(self.data)) or "none"
            raise UserError(f"{self.source}: {stage}.{key}: no [data.{name}] table "
                            f"(have: {known})")
        return self.data[name]

    def stage_hash(self, stage: str) -> str:
        return config_hash(self.hashed_config(stage))

    def hashed_config(self, stage: str) -> dict[str, Any]:
        """Everything that decides a stage's output, and nothing else: its own table, the seed,
        the [model] loading fields, the data sources it reads and the inputs it loads, with
        paths resolved (inside the run directory: relative to it, so a moved or copied run
        directory hashes the same). Contents of inputs are checked apart (``input_paths``)."""
        section = self.stage_config(stage).model_dump()
        for key in PATH_KEYS:
            if isinstance(section.get(key), str):
                section[key] = self.normalize_path(section[key])
        if stage == "bench":
            section["models"] = [m if m in STAGE_MODELS else self.normalize_path(m)
                                 for m in section["models"]]
        model = self.model.model_dump(include=set(LOAD_KEYS))
        if stage == "pretrain" and not section.get("tokenizer") and self.model.tokenizer:
            model["tokenizer"] = self.normalize_path(self.model.tokenizer)
        data = {}
        for name in self.stage_sources(stage):
            source = self.data[name].model_dump()
            for key in ("path", "eval_path"):
                if source[key]:
                    source[key] = self.normalize_path(source[key])
            data[name] = source
        return {stage: section, "seed": self.run.seed, "model": model, "data": data,
                "inputs": {k: self.normalize_path(v) for k, v in self.upstream_inputs(stage).items()}}

    def normalize_path(self, path: str) -> str:
        """A local path as stage hashes see it: ``$RUN/...`` inside the run directory, else
        absolute; hub ids and remote datasets as written."""
        if not is_local(path):
            return path
        resolved = Path(path).expanduser().resolve()
        run_dir = self.run_dir.expanduser().resolve()
        if resolved.is_relative_to(run_dir):
            return "/".join(("$RUN", *resolved.relative_to(run_dir).parts))
        return str(resolved)

    def stage_sources(self, stage: str) -> list[str]:
        """Names of the [data.*] sources a stage reads (its data, its calibration data)."""
        cfg = self.stage_config(stage)
        names = [getattr(cfg, "data", None)]
        if stage == "quantize":
            names.append(cfg.calibration or cfg.data)
        return [n for n in dict.fromkeys(names) if n and n in self.data]

    # -- inputs ------------------------------------------------------------------------------

    def upstream_inputs(self, stage: str) -> dict[str, str]:
        """Paths a stage reads from earlier stages in this run directory (or the recipe)."""
        if stage == "sft":
            return {"model": self.stage_config("sft").model or self._model_from("pretrain")}
        if stage == "merge":
            cfg = self.stage_config("merge")
            return {"adapter": cfg.adapter or str(self.run_dir / "sft" / "adapter")}
        if stage == "reward":
            cfg = self.stage_config("reward")
            if cfg.init == "config":
                return {"tokenizer": cfg.tokenizer or self._require_base("reward.tokenizer")}
            return {"model": cfg.model or self._model_from("merge", "sft", "pretrain")}
        if stage == "ppo":
            cfg = self.stage_config("ppo")
            return {"model": cfg.model or self._model_from("merge", "sft", "pretrain"),
                    "reward_model": cfg.reward_model or str(self.run_dir / "reward" / "model")}
        if stage == "dpo":
            cfg = self.stage_config("dpo")
            return {"model": cfg.model or self._model_from("merge", "sft", "pretrain")}
        if stage == "quantize":
            return {"model": self.stage_config("quantize").model or self._trained_model()}
        if stage == "bench":
            return self._bench_models()
        if stage == "generate":
            return {"model": self.stage_config("generate").model or self._last_model()}
        if stage == "pretrain":
            cfg = self.stage_config("pretrain")
            if cfg.init == "pretrained":
                return {"model": cfg.model or self._require_base("pretrain.model")}
            return {}
        return {}

    def input_paths(self, stage: str) -> list[str]:
        """Everything a stage reads: upstream outputs, its data sources, tokenizers, task files.
        Staleness checks compare their contents with what the stage saw (`pipeline.why_stale`)."""
        cfg = self.stage_config(stage)
        paths = list(self.upstream_inputs(stage).values())
        for name in self.stage_sources(stage):
            paths += [self.data[name].path, self.data[name].eval_path]
        paths += [getattr(cfg, key, None) for key in ("tokenizer", "task_path", "prompts_file")]
        if stage == "pretrain" and not cfg.tokenizer:
            paths.append(self.model.tokenizer)
        return list(dict.fromkeys(p for p in paths if p))

    def _model_from(self, *upstream: str) -> str:
        for stage in upstream:
            if getattr(self, stage) is not None:
                sub = "adapter" if stage in ("sft", "dpo", "ppo") and self._is_adapter(stage) else "model"
                return str(self.run_dir / stage / sub)
        return self._require_base("model.name_or_path")

    def _is_adapter(self, stage: str) -> bool:
        cfg = self.stage_config(stage)
        if stage == "ppo":
            return not cfg.merge
        return cfg.method != "full"

    def _require_base(self, key: str) -> str:
        if not self.model.name_or_path:
            raise UserError(f"{self.source}: {key}: missing (no upstream stage produces a model)")
        return self.model.name_or_path

    def _trained_model(self) -> str:
        # Later stages win: PPO's policy beats the merged SFT model, which beats the adapter...
        if self._last_trained_stage():
            return self._model_from(*MODEL_STAGES)
        return self._require_base("model.name_or_path")

    def _last_trained_stage(self) -> str | None:
        return next((s for s in MODEL_STAGES if getattr(self, s) is not None), None)

    def _last_model(self) -> str:
        """What generate uses by default: the quantized model when there is one."""
        if self.quantize is not None:
            return str(self.run_dir / "quantize" / "model")
        return self._trained_model()

    def _bench_models(self) -> dict[str, str]:
        """label -> path for each bench model; a stage name stands for that stage's model."""
        names = list(self.stage_config("bench").models)
        if not names:
            names = [self._last_trained_stage() or self._require_base("bench.models")]
            if self.quantize is not None:
                names.append("quantize")
        models = {}
        for name in names:
            if name == "quantize":
                models[name] = str(self.run_dir / "quantize" / "model")
            elif name in MODEL_STAGES:
                models[name] = self._model_from(name)
            else:
                models[_unique_label(name, models)] = name
        return models


# Stage-table keys that hold a path (normalised in stage hashes).
PATH_KEYS = ("model", "adapter", "base", "reward_model", "tokenizer", "task_path", "prompts_file")
# [model] keys that change how every stage loads a model.
LOAD_KEYS = ("revision", "trust_remote_code", "allow_pickle", "dtype")
# What bench.models and generate.model accept as a stage name.
STAGE_MODELS = (*MODEL_STAGES, "quantize")


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"sft": {"lr": 1}} -> {"sft.lr": 1}: the dotted keys --set uses."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """``sft.lr: 0.002 -> 0.001, data.sentiment.path changed``: what differs between two
    ``hashed_config`` results, at most ``limit`` items."""
    before, after = flatten(old), flatten(new)
    items = []
    for key in [*before, *(k for k in after if k not in before)]:
        if before.get(key, _MISSING) == after.get(key, _MISSING):
            continue
        if key not in before:
            items.append(f"{key} added ({after[key]!r})")
        elif key not in after:
            items.append(f"{key} removed")
        elif key.endswith(("path", "eval_path")) or key.startswith("inputs."):
            items.append(f"{key} changed ({before[key]} -> {after[key]})")
        else:
            items.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


_MISSING = object()


def _unique_label(path: str, taken: dict[str, str]) -> str:
    """A short name for a model path: its directory name, or for a stage's ``model`` /
    ``adapter`` directory the stage's name; ``-2``, ``-3``... when that is taken."""
    parts = Path(path).parts
    label = parts[-2] if len(parts) > 1 and parts[-1] in ("model", "adapter") else parts[-1]
    unique, n = label, 1
    while unique in taken:
        n += 1
        unique = f"{label}-{n}"
    return unique


# -- loading ---------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a","b","c"], value); VALUE is read as a TOML literal, else a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: bad key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set run.name=trial3
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part} is not a table")
            node = child
        node[path[-1]] = value
    return raw


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "missing required key"
    elif kind == "value_error":
        # Our validators say "field: what is wrong"; name the field in the key, not the table.
        msg = str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier():
            key, msg = (f"{key}.{field}" if key != "<root>" else field), rest
    else:
        msg = f"{first['msg']} (got {first.get('input')!r})"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def validate(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(source, err)) from None
    recipe.source = source
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML: {err}") from None
    apply_overrides(raw, overrides or [])
    recipe = validate(raw, str(path))
    recipe.overrides = list(overrides or [])
    return recipe


def read_text(path: Path, what: str = "") -> str:
    """A text file's content; not UTF-8 is a user error naming the file and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: {what + ' ' if what else ''}not UTF-8 text (byte "
                        f"0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def dump_resolved(recipe: Recipe) -> dict[str, Any]:
    """The recipe as validated, defaults filled in, with the run directory spelled out."""
    out = recipe.model_dump(exclude_none=True)
    out["run"]["dir"] = str(recipe.run_dir)
    return out
