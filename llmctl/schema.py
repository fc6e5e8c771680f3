"""The recipe's tables: one pydantic model per table, strict, every static rule checked at load.

A recipe has a ``[run]`` table, a shared ``[model]`` table, named data sources under
``[data.<name>]`` and one table per stage (``llmctl.stages.REGISTRY`` names each stage's model).
An unknown key, a wrong type or a missing required key is a user error naming the file and the
dotted key (``llmctl.recipe.validate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator,
                      model_validator)

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

    _reward_text = field_validator("reward_text")(lambda cls, value: _names_response(value))


def _names_response(text: str | None) -> str | None:
    """A format string a reward model reads must place the policy's answer somewhere."""
    if text is not None and "{response}" not in text:
        raise ValueError("must contain {response}, the policy's answer")
    return text


class DpoConfig(TrainConfig):
    model: str | None = None  # default: the upstream merge/sft model
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"  # trl's names: sigmoid, ipo, hinge, robust, ...
    max_length: int = Field(512, ge=2)
    lr: float = Field(5e-6, ge=0)


# A reward's weight in GRPO's sum: negative for a penalty, never inf or nan.
RewardWeight = Annotated[float, Field(allow_inf_nan=False)]


class LabelMatchReward(Section):
    """1 when the completion's first word is the row's label (case and punctuation aside)."""

    kind: Literal["label_match"]
    field: str | None = None  # the row's label field; default: the template's response field
    weight: RewardWeight = 1.0


class RegexReward(Section):
    """1 when ``re.search(pattern, completion)`` finds a match (anchor with ^...$ for whole)."""

    kind: Literal["regex"]
    pattern: str
    weight: RewardWeight = 1.0

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        import re

        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"pattern: not a regular expression ({err})") from None
        return pattern


class LengthReward(Section):
    """1 when the completion has ``min_tokens``..``max_tokens`` tokens, else 0."""

    kind: Literal["length"]
    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(..., ge=1)
    weight: RewardWeight = 1.0

    @model_validator(mode="after")
    def _band(self) -> "LengthReward":
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens: more than max_tokens")
        return self


class ModelReward(Section):
    """A reward model's score (a one-label sequence classifier, with its own tokenizer)."""

    kind: Literal["model"]
    model: str | None = None  # default: <run_dir>/reward/model
    # What it reads: a format string over the prompt row's fields and {response}, as
    # ppo.reward_text; default: the prompt and the completion.
    text: str | None = None
    max_length: int = Field(512, ge=2)
    batch_size: int = Field(16, ge=1)
    weight: RewardWeight = 1.0

    _text = field_validator("text")(lambda cls, value: _names_response(value))


class FunctionReward(Section):
    """Your function, ``module:function``, with trl's reward-function signature:
    ``f(prompts, completions, completion_ids, **row_fields) -> list[float]``. Named here
    explicitly; llmctl imports nothing else."""

    kind: Literal["function"]
    function: str
    weight: RewardWeight = 1.0

    @field_validator("function")
    @classmethod
    def _spec(cls, value: str) -> str:
        module, sep, name = value.partition(":")
        if not sep or not module or not name.isidentifier() \
                or not all(part.isidentifier() for part in module.split(".")):
            raise ValueError("function: expected module:function, e.g. my_rewards:brevity")
        return value


GrpoReward = Annotated[Union[LabelMatchReward, RegexReward, LengthReward, ModelReward,
                             FunctionReward], Field(discriminator="kind")]


class GrpoConfig(TrainConfig):
    """trl's GRPO: groups of sampled completions per prompt, scored by verifiable rewards
    and/or reward models, each completion's advantage relative to its group."""

    model: str | None = None  # policy; default: the upstream merge/sft model
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    rewards: list[GrpoReward] = Field(..., min_length=1)  # weighted and summed
    num_generations: int = Field(8, ge=2)  # completions per prompt (the group)
    max_completion_length: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0)  # KL to the reference; 0: no reference model is loaded
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    epsilon: float = Field(0.2, gt=0)  # the clipping range
    eval_prompts: int = Field(64, ge=1)  # held-out prompts scored before and after
    lr: float = Field(1e-5, ge=0)
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _groups(self) -> "GrpoConfig":
        # trl samples batch_size x grad_accum completions per generation round, in whole groups
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(f"batch_size: batch_size x grad_accum ({self.batch_size} x "
                             f"{self.grad_accum}) must be a multiple of num_generations "
                             f"({self.num_generations}): completions come in whole groups")
        return self


class MergeConfig(Section):
    adapter: str | None = None  # default: upstream sft (or ppo) adapter
    base: str | None = None  # default: the base recorded in the adapter
    allow_other_base: bool = False  # merge into a base other than the one it was trained on
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tolerance: float = Field(1e-3, ge=0)


class QuantizeCommon(Section):
    """Post-training quantization with an accuracy criterion (see llmctl.quantization): what
    every backend shares. Each backend's table adds its own methods and fields below."""

    model: str | None = Field(None, description="default: the last trained model "
                              "(ppo > grpo > dpo > merge > sft > pretrain)")
    calibration: str | None = Field(None, description="the [data.<name>] source whose rows "
                                    "calibrate GPTQ/AWQ/static INT8; default: the metric's")
    calibration_samples: int = Field(32, ge=1, description="calibration blocks of seq_len tokens")
    metric: Literal["perplexity", "task"] = Field(
        "perplexity", description="the accuracy criterion, measured before and after")
    data: str | None = Field(None, description="metric = perplexity: the [data.<name>] source "
                             "whose eval split is scored")
    seq_len: int = Field(256, ge=2)
    eval_batch_size: int = Field(4, ge=1)
    eval_max_batches: int | None = Field(16, ge=1)
    task: str | None = Field(None, description="metric = task: an lm-eval task name")
    task_path: str | None = Field(None, description="a directory of local lm-eval YAML tasks")
    task_metric: str = "acc"
    limit: int | None = Field(None, description="lm-eval documents per task")
    apply_chat_template: bool = Field(False, description="task prompts as a user turn in the "
                                      "model's chat template")
    tolerable_loss: float = Field(0.01, ge=0, description="relative: 0.01 = at most 1% worse "
                                  "than the fp model")
    max_trials: int = Field(10, ge=1, description="settings tried, the recipe's own first")

    @model_validator(mode="before")
    @classmethod
    def _known_method(cls, raw: Any) -> Any:
        # Before field validation, to say which backend lacks the method (and what to use).
        methods = get_args(cls.model_fields["method"].annotation)
        if isinstance(raw, dict) and raw.get("method", methods[0]) not in methods:
            backend = _quantize_backend(raw)
            raise ValueError(f"method: {raw['method']!r} is not a method of backend "
                             f"\"{backend}\" (methods: {', '.join(methods)})"
                             + (INC_INT8_HINT if raw["method"] in ("dynamic", "static") else ""))
        return raw

    @model_validator(mode="after")
    def _check_metric(self) -> "QuantizeCommon":
        if self.metric == "task" and not self.task:
            raise ValueError("task: metric = \"task\" needs task (an lm-eval task name)")
        return self

    def settings(self) -> dict[str, Any]:
        """The first trial's settings (the backend's ladder varies them), as quantization.json
        records them."""
        return {key: getattr(self, key) for key in ("backend", "method", "bits", "group_size",
                                                    "sym") if key in type(self).model_fields}


class IncQuantize(QuantizeCommon):
    """Intel neural-compressor weight-only quantization (INT4/INT8 groups)."""

    backend: Literal["inc"] = "inc"
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    bits: Literal[4, 8] = 4
    group_size: int = Field(128, ge=-1, description="-1: one group per output channel")
    sym: bool = True



class TorchQuantize(QuantizeCommon):
    """PyTorch dynamic INT8: int8 weights per output channel, activations quantized on the fly."""

    backend: Literal["torch"]
    method: Literal["dynamic"] = "dynamic"
    bits: Literal[8] = 8


class OpenVinoQuantize(QuantizeCommon):
    """OpenVINO through optimum-intel/NNCF: weight-only INT4/INT8, or static INT8."""

    backend: Literal["openvino"]
    method: Literal["weight", "static"] = "weight"
    bits: Literal[4, 8] = 4
    group_size: int = Field(128, ge=-1)
    sym: bool = True
    smooth_quant: bool = Field(True, description="static: SmoothQuant before quantizing")
    smooth_quant_alpha: float = Field(0.95, ge=0, le=1, description="SmoothQuant's migration "
                                      "strength (0.95 is NNCF's default for transformers)")

    @model_validator(mode="after")
    def _static_is_int8(self) -> "OpenVinoQuantize":
        if self.method == "static" and self.bits != 8:
            raise ValueError("bits: openvino static quantization is INT8 (bits = 8)")
        return self


class BnbQuantize(QuantizeCommon):
    """bitsandbytes 8-bit or 4-bit NF4 weights through transformers (CUDA)."""

    backend: Literal["bnb"]
    method: Literal["weight"] = "weight"
    bits: Literal[4, 8] = 4


def _quantize_backend(raw: Any) -> str:
    return raw.get("backend", "inc") if isinstance(raw, dict) else raw.backend


def union_tag(key: str | int, table: dict[str, Any]) -> str | None:
    """Which member of a tagged union the raw table under ``key`` is: [quantize]'s
    ``backend`` (default "inc"), a grpo.rewards item's ``kind``."""
    if key == "quantize":
        return _quantize_backend(table)
    return table.get("kind") if isinstance(key, int) else None


# [quantize]: one table type per backend, picked by `backend` (default "inc"), so a field or
# method another backend owns is an error at load time and in --dry-run.
QuantizeConfig = Annotated[
    Union[Annotated[IncQuantize, Tag("inc")], Annotated[TorchQuantize, Tag("torch")],
          Annotated[OpenVinoQuantize, Tag("openvino")], Annotated[BnbQuantize, Tag("bnb")]],
    Discriminator(_quantize_backend, custom_error_type="unknown_backend",
                  custom_error_message="backends: inc, torch, openvino, bnb")]
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
    prompts_file: str | None = None  # "" = none: how `generate --prompt` drops the recipe's
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
        if self.prompts_file == "":
            self.prompts_file = None
        if self.num_return_sequences > max(self.num_beams, 1) and not self.do_sample:
            raise ValueError("num_return_sequences: more than num_beams needs do_sample = true")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens: more than max_new_tokens")
        return self
