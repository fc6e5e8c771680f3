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
    name: str = Field("llmctl", description="the run's name: the default run directory is "
                      "runs/<name>, and tracker runs are named <name>-<stage>")
    dir: str | None = Field(None, description="the run directory; default: runs/<name>")
    seed: int = Field(42, description="random seed, set before each stage; also the "
                      "Trainer's seed and data order")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The default run directory is runs/<name>: a name must not lead out of runs/.
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError("a run name, not a path (use run.dir or --run-dir for a directory)")
        return name


class ModelConfig(Section):
    name_or_path: str | None = Field(None, description="hub id or local directory; the base "
                                     "model when no upstream stage produces one")
    tokenizer: str | None = Field(None, description="tokenizer hub id or directory; default: "
                                  "the model's own")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) to "
                                 "load models and tokenizers at")
    trust_remote_code: bool = Field(False, description="let models and tokenizers run code "
                                    "from their repository (transformers' trust_remote_code)")
    allow_pickle: bool = Field(False, description="also load pickled weights "
                               "(pytorch_model.bin): runs their code")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype models are loaded in; auto: the checkpoint's own")


class DataSource(Section):
    path: str = Field(..., description="the dataset: local dir, mem://, hub://org/name or "
                      "al://org/name")
    columns: dict[str, str] = Field(default_factory=dict, description="template field -> "
                                    "dataset column, where the names differ")
    template: str = Field("text", description="a named template (llmctl.data.TEMPLATES), a "
                          "format string over the row's fields, or \"chat\": the tokenizer's "
                          "chat template renders each row as a conversation")
    system: str | None = Field(None, description="template = \"chat\": an optional system "
                               "prompt before the user turn")
    user: str | None = Field(None, description="template = \"chat\": the user turn, a format "
                             "string over the row's fields, answered by the `assistant` field; "
                             "None: each row's `messages` field (a list of {role, content})")
    assistant: str = Field("response", description="template = \"chat\" with `user` set: the "
                           "field holding the assistant's answer")
    query: str | None = Field(None, description="TQL run on the dataset first, e.g. "
                              "\"SELECT * WHERE contains(text, 'tax')\"")
    eval_path: str | None = Field(None, description="separate evaluation dataset; else the "
                                  "last eval_fraction of the rows is split off")
    eval_query: str | None = Field(None, description="TQL run on eval_path; default: query")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of the rows held out "
                                 "for evaluation (the last ones) when there is no eval_path")
    limit: int | None = Field(None, ge=1, description="use at most this many rows (after the "
                              "query)")


class DistributedConfig(Section):
    """Several processes for the training stages (see llmctl.distributed)."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="how several processes train one model: none (one process), DDP, "
        "FSDP or DeepSpeed ZeRO")
    num_processes: int = Field(1, description="processes per machine; > 1 makes `llmctl "
                               "STAGE` launch itself with torchrun")
    config_file: str | None = Field(None, description="your accelerate config (may name a "
                                    "DeepSpeed JSON): wins over the settings here")
    fsdp_sharding: Literal["full", "hybrid", "shard_grad_op"] = Field(
        "full", description="FSDP sharding: full_shard, hybrid_shard or shard_grad_op")
    fsdp_wrap: list[str] = Field(default_factory=list, description="FSDP: layer classes to "
                                 "wrap; default: the model's own")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    cpu_offload: bool = Field(False, description="offload to CPU: FSDP parameters / ZeRO "
                              "optimizer state (and parameters at stage 3)")

    @model_validator(mode="after")
    def _check(self) -> "DistributedConfig":
        if self.num_processes < 1:
            raise ValueError("num_processes: must be >= 1")
        if self.num_processes > 1 and self.strategy == "none" and not self.config_file:
            raise ValueError("num_processes: > 1 needs a strategy (ddp, fsdp or deepspeed)")
        return self


class TrainConfig(Section):
    """Knobs every Trainer-based stage shares."""

    data: str | None = Field(None, description="name of a [data.<name>] source")
    max_steps: int = Field(-1, ge=-1, description="optimizer steps to train; > 0 wins over "
                           "epochs")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (may be "
                          "fractional)")
    batch_size: int = Field(8, ge=1, description="training examples per process per "
                            "micro-batch")
    eval_batch_size: int | None = Field(None, ge=1, description="evaluation examples per "
                                        "process per batch; default: batch_size")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation: micro-batches per "
                            "optimizer step")
    lr: float = Field(5e-5, ge=0, description="learning rate (peak, after warmup)")
    scheduler: Scheduler = Field("cosine", description="learning-rate schedule "
                                 "(transformers' SchedulerType)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear learning-rate "
                              "warmup")
    weight_decay: float = Field(0.0, ge=0, description="the optimizer's weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="clip gradients to this global norm "
                                 "(0: no clipping)")
    precision: Precision = Field("auto", description="training precision; auto: bf16 on CUDA "
                                 "cards that have it, fp16 on older cards, fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the "
                                         "backward pass: less memory, more compute")
    logging_steps: int = Field(10, ge=1, description="log training metrics every this many "
                               "optimizer steps")
    eval_steps: int | None = Field(None, ge=1, description="evaluate every this many optimizer "
                                   "steps; None: once at the end only")
    save_steps: int = Field(500, ge=1, description="save a checkpoint every this many "
                            "optimizer steps")
    save_total_limit: int | None = Field(2, ge=1, description="checkpoints kept, oldest "
                                         "deleted first; None: all")
    eval_max_batches: int | None = Field(None, ge=1, description="cap on evaluation batches of "
                                         "the whole job (None: all)")
    report_to: Literal["none", "wandb", "tensorboard"] = Field(
        "none", description="experiment tracker; its files go in the stage directory")
    dataloader_drop_last: bool = Field(False, description="drop each dataloader's last, "
                                       "incomplete batch")


class PretrainConfig(TrainConfig):
    init: Literal["config", "pretrained"] = Field(
        "config", description="config: a new model from scratch; pretrained: continue a "
        "checkpoint")
    architecture: Literal["gpt2", "opt", "llama"] = Field(
        "gpt2", description="architecture of a new model (init = \"config\")")
    config: dict[str, Any] = Field(default_factory=dict, description="passed to the "
                                   "architecture's Config (init = \"config\")")
    model: str | None = Field(None, description="checkpoint to continue from (init = "
                              "\"pretrained\"); default: model.name_or_path")
    tokenizer: str | None = Field(None, description="the tokenizer; default: model.tokenizer, "
                                  "else the model's (pretrain.model or model.name_or_path)")
    seq_len: int = Field(512, ge=2, description="tokens per training block")
    pack: bool = Field(True, description="concatenate documents into seq_len blocks, else "
                       "truncate/pad each")
    lr: float = Field(5e-4, ge=0, description="learning rate (peak, after warmup)")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="rank of the low-rank update")
    alpha: int = Field(32, ge=1, description="LoRA alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch's input")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="biases trained: none, all, or those of the adapted layers only")
    target_modules: list[str] | None = Field(None, description="names of the modules to adapt; "
                                             "None: a per-architecture default")


class SftConfig(TrainConfig):
    eval_task_rows: int = Field(200, ge=1, description="held-out rows whose label the model "
                                "is scored on before and after (when the answers are a few "
                                "labels)")
    model: str | None = Field(None, description="the model to tune; default: upstream "
                              "pretrain output, else model.name_or_path")
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora, qlora (LoRA on a 4-bit NF4 base; CUDA) or full fine-tuning")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter (method = "
                             "\"lora\" or \"qlora\")")
    seq_len: int = Field(1024, ge=2, description="maximum tokens per training sequence (the "
                         "block length when packing)")
    packing: bool = Field(True, description="pack examples into full seq_len blocks, else one "
                          "example per sequence")
    completion_only_loss: bool = Field(False, description="loss on the response only, not the "
                                       "prompt (always so with template = \"chat\")")
    load_in_bf16: bool = Field(False, description="load the model's weights in bfloat16")
    fp32_norms_and_head: bool = Field(False, description="keep 1-D params and the LM head "
                                      "output in fp32")
    eval_task: bool = Field(True, description="score label log-likelihood accuracy before and "
                            "after training")
    lr: float = Field(1e-4, ge=0, description="learning rate (peak, after warmup)")


class RewardConfig(TrainConfig):
    """A scalar reward head (sequence classification, 1 label) trained on chosen/rejected pairs."""

    model: str | None = Field(None, description="backbone; default: the upstream merge/sft "
                              "model (the InstructGPT way)")
    init: Literal["pretrained", "config"] = Field(
        "pretrained", description="pretrained: start from the model; config: a new backbone "
        "from architecture and config")
    architecture: Literal["bert", "deberta-v2", "gpt2", "opt", "llama"] = Field(
        "bert", description="architecture of a new backbone (init = \"config\")")
    config: dict[str, Any] = Field(default_factory=dict, description="passed to the "
                                   "architecture's Config (init = \"config\")")
    tokenizer: str | None = Field(None, description="the tokenizer; default: the backbone's "
                                  "own (init = \"config\": model.name_or_path's)")
    method: Literal["full", "lora"] = Field("full", description="full fine-tuning or a LoRA "
                                            "adapter (merged before scoring)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter (method = "
                             "\"lora\")")
    max_length: int = Field(512, ge=2, description="tokens per text (prompt and answer), "
                            "truncated")
    lr: float = Field(2e-5, ge=0, description="learning rate (peak, after warmup)")
    scheduler: Scheduler = Field("linear", description="learning-rate schedule "
                                 "(transformers' SchedulerType)")


class PpoConfig(Section):
    """RLHF with PPO (trl 1.12's algorithm, llmctl's code): a LoRA policy against a reward
    model, KL-penalised to the reference."""

    data: str | None = Field(None, description="the [data.<name>] source of prompts; its "
                             "template turns a row into a query")
    model: str | None = Field(None, description="policy; default: the upstream merge/sft model")
    reward_model: str | None = Field(None, description="the reward model; default: "
                                     "<run_dir>/reward/model")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the policy's adapter")
    steps: int = Field(100, ge=1, description="PPO batches (each: rollout, score, ppo_epochs "
                       "of updates)")
    batch_size: int = Field(32, ge=1, description="rollouts per batch")  # the course: 32
    # the course: mini-batch 4 of 32 -> 8 mini-batches
    mini_batches: int = Field(8, ge=1, description="mini-batches each batch is split into "
                              "for the updates")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation: a process's "
                            "micro-batch is batch_size / grad_accum rollouts")
    ppo_epochs: int = Field(4, ge=1, description="passes of updates over each batch")
    lr: float = Field(1.41e-5, ge=0, description="learning rate (peak; decays linearly)")
    query_max_length: int = Field(400, ge=1, description="tokens kept of each query (the "
                                  "prompt), truncated")
    response_length: int = Field(64, ge=1, description="new tokens per response (trl's v2 "
                                 "PPO: a maximum)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the responses")
    kl_coef: float = Field(0.2, description="initial KL coefficient")
    kl_target: float | None = Field(None, description="adapt kl_coef to this KL (Ziegler et "
                                    "al.); None: fixed")
    kl_horizon: int = Field(10000, description="kl_target: the adaptive controller's horizon "
                            "in rollouts (larger: kl_coef moves more slowly)")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="trl's KL estimator: k1 (the "
                                              "log-ratio) or k3 (lower variance)")
    cliprange: float = Field(0.2, description="clipping range of the policy's probability "
                             "ratio")
    vf_coef: float = Field(0.1, description="weight of the value loss")
    missing_eos_penalty: float | None = Field(None, description="subtracted from the score of "
                                              "a response without EOS; None: no penalty")
    reward_batch_size: int = Field(16, ge=1, description="texts per reward-model batch when "
                                   "it reads re-tokenized text")
    reward_max_length: int = Field(400, ge=2, description="reward-model tokens per text, "
                                   "truncated, when it reads re-tokenized text")
    reward_text: str | None = Field(None, description="what the reward model reads: a format "
                                    "string over the prompt row's fields and {response} (the "
                                    "policy's answer alone), e.g. \"{response}: {text}\"; "
                                    "default: the query and response")
    eval_prompts: int = Field(32, ge=1, description="held-out prompts scored before and after "
                              "PPO")
    max_kl: float | None = Field(None, description="fail the stage if the final KL to the "
                                 "reference exceeds this")
    precision: Precision = Field("auto", description="training precision; auto: bf16 on CUDA "
                                 "cards that have it, fp16 on older cards, fp32 on CPU")
    save_steps: int = Field(50, ge=1, description="save a checkpoint every this many PPO "
                            "batches")
    logging_steps: int = Field(1, ge=1, description="kept for older recipes: PPO logs every "
                               "batch regardless")
    merge: bool = Field(False, description="also write a merged standalone model")
    report_to: Literal["none", "wandb", "tensorboard"] = Field(
        "none", description="experiment tracker; its files go in the stage directory")

    _reward_text = field_validator("reward_text")(lambda cls, value: _names_response(value))


def _names_response(text: str | None) -> str | None:
    """A format string a reward model reads must place the policy's answer somewhere."""
    if text is not None and "{response}" not in text:
        raise ValueError("must contain {response}, the policy's answer")
    return text


class DpoConfig(TrainConfig):
    eval_task_rows: int = Field(200, ge=1, description="held-out rows whose label the model "
                                "is scored on before and after (when the answers are a few "
                                "labels)")
    model: str | None = Field(None, description="the policy to tune; default: the upstream "
                              "merge/sft model")
    method: Literal["lora", "full"] = Field("lora", description="a LoRA adapter or full "
                                            "fine-tuning")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter (method = "
                             "\"lora\")")
    beta: float = Field(0.1, gt=0, description="DPO's beta: how strongly the policy is held to "
                        "the reference (higher: closer)")
    loss_type: str = Field("sigmoid", description="trl's DPO loss name: sigmoid, ipo, hinge, "
                           "robust, ...")
    rpo_alpha: float | None = Field(None, gt=0, description="adds the chosen answers' NLL, this "
                                    "weighted, to the loss (RPO): the policy keeps saying them "
                                    "instead of only ranking them higher")
    max_length: int = Field(512, ge=2, description="tokens per prompt and answer, truncated")
    lr: float = Field(5e-6, ge=0, description="learning rate (peak, after warmup)")


# A reward's weight in GRPO's sum: negative for a penalty, never inf or nan.
RewardWeight = Annotated[float, Field(allow_inf_nan=False)]


class LabelMatchReward(Section):
    """1 when the completion's first word is the row's label (case and punctuation aside)."""

    kind: Literal["label_match"] = Field(..., description="the reward kind")
    field: str | None = Field(None, description="the row's label field; default: the "
                              "template's response field")
    weight: RewardWeight = Field(1.0, description="weight in GRPO's sum (negative: a penalty)")


class RegexReward(Section):
    """1 when ``re.search(pattern, completion)`` finds a match (anchor with ^...$ for whole)."""

    kind: Literal["regex"] = Field(..., description="the reward kind")
    pattern: str = Field(..., description="a Python regular expression searched for in the "
                         "completion")
    weight: RewardWeight = Field(1.0, description="weight in GRPO's sum (negative: a penalty)")

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

    kind: Literal["length"] = Field(..., description="the reward kind")
    min_tokens: int = Field(1, ge=0, description="fewest completion tokens that score 1")
    max_tokens: int = Field(..., ge=1, description="most completion tokens that score 1")
    weight: RewardWeight = Field(1.0, description="weight in GRPO's sum (negative: a penalty)")

    @model_validator(mode="after")
    def _band(self) -> "LengthReward":
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens: more than max_tokens")
        return self


class ModelReward(Section):
    """A reward model's score (a one-label sequence classifier, with its own tokenizer)."""

    kind: Literal["model"] = Field(..., description="the reward kind")
    model: str | None = Field(None, description="the reward model; default: "
                              "<run_dir>/reward/model")
    text: str | None = Field(None, description="what it reads: a format string over the "
                             "prompt row's fields and {response}, as ppo.reward_text; "
                             "default: the prompt and the completion")
    max_length: int = Field(512, ge=2, description="reward-model tokens per text, truncated")
    batch_size: int = Field(16, ge=1, description="texts per reward-model batch")
    weight: RewardWeight = Field(1.0, description="weight in GRPO's sum (negative: a penalty)")

    _text = field_validator("text")(lambda cls, value: _names_response(value))


class FunctionReward(Section):
    """Your function, ``module:function``, with trl's reward-function signature:
    ``f(prompts, completions, completion_ids, **row_fields) -> list[float]``. Named here
    explicitly; llmctl imports nothing else."""

    kind: Literal["function"] = Field(..., description="the reward kind")
    function: str = Field(..., description="your reward function, as module:function")
    weight: RewardWeight = Field(1.0, description="weight in GRPO's sum (negative: a penalty)")

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


class GroupRLConfig(TrainConfig):
    """Online RL on groups of sampled completions per prompt, scored by verifiable rewards
    and/or reward models (GRPO, RLOO): what both stages' tables share."""

    model: str | None = Field(None, description="policy; default: the upstream merge/sft model")
    eval_task_rows: int = Field(200, ge=1, description="held-out rows whose label the model "
                                "is scored on before and after (when the answers are a few "
                                "labels)")
    method: Literal["lora", "full"] = Field("lora", description="a LoRA adapter or full "
                                            "fine-tuning")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter (method = "
                             "\"lora\")")
    rewards: list[GrpoReward] = Field(..., min_length=1, description="the rewards, weighted "
                                      "and summed")
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group)")
    max_completion_length: int = Field(32, ge=1, description="new tokens per completion, at "
                                       "most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the "
                               "completions")
    beta: float = Field(0.0, ge=0, description="KL to the reference; 0: no reference model is "
                        "loaded")
    epsilon: float = Field(0.2, gt=0, description="the clipping range of the probability "
                           "ratio")
    eval_prompts: int = Field(64, ge=1, description="held-out prompts scored before and after")
    lr: float = Field(1e-5, ge=0, description="learning rate (peak, after warmup)")
    logging_steps: int = Field(1, ge=1, description="log training metrics every this many "
                               "optimizer steps")
    save_steps: int = Field(50, ge=1, description="save a checkpoint every this many "
                            "optimizer steps")

    @model_validator(mode="after")
    def _groups(self) -> "GroupRLConfig":
        # trl samples batch_size x grad_accum completions per generation round, in whole groups
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(f"batch_size: batch_size x grad_accum ({self.batch_size} x "
                             f"{self.grad_accum}) must be a multiple of num_generations "
                             f"({self.num_generations}): completions come in whole groups")
        return self


class GrpoConfig(GroupRLConfig):
    """trl's GRPO: each completion's advantage is its reward against its group's mean (and
    standard deviation), with a PPO-style clipped ratio."""

    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="trl's GRPO loss variant (how token losses are normalised)")


class RlooConfig(GroupRLConfig):
    """trl's RLOO (REINFORCE leave-one-out): each completion's advantage is its reward against
    the mean reward of the other completions of its prompt."""


class MergeConfig(Section):
    adapter: str | None = Field(None, description="the LoRA adapter; default: the sft "
                                "stage's, <run_dir>/sft/adapter")
    base: str | None = Field(None, description="the base model; default: the base recorded in "
                             "the adapter")
    allow_other_base: bool = Field(False, description="merge into a base other than the one "
                                   "it was trained on")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved model; auto: model.dtype (auto there too: the "
        "float32 merge as is)")
    tolerance: float = Field(1e-3, ge=0, description="largest |logit difference| allowed "
                             "between the merged model and base+adapter on probe texts")


class QuantizeCommon(Section):
    """Post-training quantization with an accuracy criterion (see llmctl.quantization): what
    every backend shares. Each backend's table adds its own methods and fields below."""

    model: str | None = Field(None, description="a stage (\"dpo\") or a model path; default: the "
                              "last trained model (ppo > rloo > grpo > dpo > merge > sft > pretrain)")
    calibration: str | None = Field(None, description="the [data.<name>] source whose rows "
                                    "calibrate GPTQ/AWQ/static INT8; default: the metric's")
    calibration_samples: int = Field(32, ge=1, description="calibration blocks of seq_len tokens")
    metric: Literal["perplexity", "task"] = Field(
        "perplexity", description="the accuracy criterion, measured before and after")
    data: str | None = Field(None, description="metric = perplexity: the [data.<name>] source "
                             "whose eval split is scored")
    seq_len: int = Field(256, ge=2, description="tokens per perplexity and calibration block")
    eval_batch_size: int = Field(4, ge=1, description="blocks per perplexity batch; lm-eval's "
                                 "batch size (metric = task)")
    eval_max_batches: int | None = Field(16, ge=1, description="metric = perplexity: batches "
                                         "scored; None: the whole eval split")
    task: str | None = Field(None, description="metric = task: an lm-eval task name")
    task_path: str | None = Field(None, description="a directory of local lm-eval YAML tasks")
    task_metric: str = Field("acc", description="metric = task: which of the task's lm-eval "
                             "metrics is compared")
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

    backend: Literal["inc"] = Field("inc", description="the quantization backend (the default)")
    method: Literal["rtn", "gptq", "awq"] = Field(
        "rtn", description="round-to-nearest, or GPTQ / AWQ (calibrated)")
    bits: Literal[4, 8] = Field(4, description="weight bits")
    group_size: int = Field(128, ge=-1, description="-1: one group per output channel")
    sym: bool = Field(True, description="symmetric quantization (no zero point)")



class TorchQuantize(QuantizeCommon):
    """PyTorch dynamic INT8: int8 weights per output channel, activations quantized on the fly."""

    backend: Literal["torch"] = Field(..., description="the quantization backend")
    method: Literal["dynamic"] = Field("dynamic", description="dynamic INT8 (the only method)")
    bits: Literal[8] = Field(8, description="weight bits (INT8 only)")


class OpenVinoQuantize(QuantizeCommon):
    """OpenVINO through optimum-intel/NNCF: weight-only INT4/INT8, or static INT8."""

    backend: Literal["openvino"] = Field(..., description="the quantization backend")
    method: Literal["weight", "static"] = Field(
        "weight", description="weight: weight-only compression; static: INT8 weights and "
        "activations, calibrated")
    bits: Literal[4, 8] = Field(4, description="weight bits (static: 8)")
    group_size: int = Field(128, ge=-1, description="INT4: weights per quantization group; -1: "
                            "one group per output channel")
    sym: bool = Field(True, description="symmetric quantization (no zero point)")
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

    backend: Literal["bnb"] = Field(..., description="the quantization backend")
    method: Literal["weight"] = Field("weight", description="weight-only (the only method)")
    bits: Literal[4, 8] = Field(4, description="weight bits: 8-bit, or 4-bit NF4")


class GgufQuantize(QuantizeCommon):
    """One GGUF file for llama.cpp and Ollama (llama and qwen2 models)."""

    backend: Literal["gguf"] = Field(..., description="the quantization backend")
    method: Literal["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "bf16", "f16"] = Field(
        "q8_0", description="llama.cpp's weight type: q8_0 (8.5 bits per weight), q5_1, q5_0, "
        "q4_1, q4_0 (4.5), or bf16 / f16; the trials go on toward more bits")


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
          Annotated[OpenVinoQuantize, Tag("openvino")], Annotated[BnbQuantize, Tag("bnb")],
          Annotated[GgufQuantize, Tag("gguf")]],
    Discriminator(_quantize_backend, custom_error_type="unknown_backend",
                  custom_error_message="backends: inc, torch, openvino, bnb, gguf")]
INC_INT8_HINT = ("; neural-compressor 3.x runs dynamic/static INT8 through a PT2E graph export "
                 "that cannot drive generate(): use backend = \"torch\", method = \"dynamic\" or "
                 "backend = \"openvino\", method = \"static\"")


class LatencyConfig(Section):
    """Generation timing: forced lengths (min = max new tokens), median of several runs."""

    prompt_tokens: int = Field(32, ge=1, description="tokens per timed prompt")
    new_tokens: int = Field(64, ge=1, description="tokens generated per timed run (forced)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1], description="batch sizes "
                                   "timed")
    num_beams: list[int] = Field(default_factory=lambda: [1, 4], description="beam counts "
                                 "timed (1: greedy)")
    runs: int = Field(3, ge=0, description="timed runs per setting, after a warm-up; the "
                      "median is reported; 0: no timing")


class BenchConfig(Section):
    models: list[str] = Field(default_factory=list, description="stage names (\"merge\", "
                              "\"quantize\", ...) or model paths; default: the last trained "
                              "model and, when the recipe quantizes, the quantized one: the "
                              "vanilla-vs-quantized table")
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks (registry or "
                             "task_path)")
    task_path: str | None = Field(None, description="a directory of local lm-eval YAML tasks")
    num_fewshot: int | None = Field(None, description="few-shot examples per task prompt; "
                                    "None: each task's default")
    limit: int | None = Field(None, ge=1, description="lm-eval documents per task; None: all")
    batch_size: int = Field(8, ge=1, description="lm-eval's batch size")
    apply_chat_template: bool = Field(False, description="task prompts as a user turn in the "
                                      "model's chat template")
    data: str | None = Field(None, description="perplexity on this [data.<name>] source's "
                             "eval split")
    seq_len: int = Field(256, ge=2, description="tokens per perplexity block")
    eval_batch_size: int = Field(4, ge=1, description="blocks per perplexity batch")
    eval_max_batches: int | None = Field(16, ge=1, description="perplexity batches scored; "
                                         "None: the whole eval split")
    latency: LatencyConfig = Field(default_factory=LatencyConfig, description="generation "
                                   "timing; runs = 0: no timing")


class GenerateConfig(Section):
    model: str | None = Field(None, description="a stage name or model path; default: the last "
                              "model-producing stage of the recipe")
    template: str | None = Field(None, description="named template, format string, or \"chat\" "
                                 "(the model's chat template; prompt = user turn); the prompt "
                                 "is the text before the template's last field")
    system: str | None = Field(None, description="template = \"chat\": a system prompt before "
                               "each user turn")
    prompts: list[str] = Field(default_factory=list, description="prompts to complete")
    prompts_file: str | None = Field(None, description="more prompts: one per line, or JSONL "
                                     "lines with a \"prompt\" key; \"\" = none: how "
                                     "`generate --prompt` drops the recipe's")
    max_new_tokens: int = Field(64, ge=1, description="new tokens per completion, at most")
    min_new_tokens: int = Field(0, ge=0, description="new tokens per completion, at least")
    do_sample: bool = Field(False, description="sample (temperature, top_k, top_p), else "
                            "greedy or beam search")
    num_beams: int = Field(1, ge=1, description="beams of beam search; 1: none")
    top_k: int = Field(50, ge=0, description="do_sample: sample from the k likeliest tokens; "
                       "0: all")
    top_p: float = Field(1.0, gt=0, le=1, description="do_sample: nucleus sampling's "
                         "probability mass; 1: all")
    temperature: float = Field(1.0, gt=0, description="do_sample: the sampling temperature")
    repetition_penalty: float = Field(1.0, gt=0, description="penalty on tokens already "
                                      "present (1: none)")
    length_penalty: float = Field(1.0, description="beam search: exponent on the length "
                                  "dividing a beam's score (> 0 favours longer)")
    no_repeat_ngram_size: int = Field(0, ge=0, description="no n-gram of this size occurs "
                                      "twice; 0: no limit")
    num_return_sequences: int = Field(1, ge=1, description="completions per prompt")
    stop: list[str] = Field(default_factory=list, description="stop strings: generation stops "
                            "at the first, and the completion is cut before it")

    @model_validator(mode="after")
    def _check(self) -> "GenerateConfig":
        if self.prompts_file == "":
            self.prompts_file = None
        if self.num_return_sequences > max(self.num_beams, 1) and not self.do_sample:
            raise ValueError("num_return_sequences: more than num_beams needs do_sample = true")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens: more than max_new_tokens")
        return self
