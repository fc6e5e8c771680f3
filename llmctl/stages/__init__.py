"""The stage registry: every stage llmctl runs, in the order `llmctl run` runs them.

An entry says all the rest of llmctl knows about a stage without running it: its command's
help, its recipe table, whether it trains (a launcher, resume, tracking), what it reads
(``inputs``: earlier stages' outputs and model paths; ``data_keys``: the table's keys naming
[data.<name>] sources), which inputs load as classifiers, the model it leaves for later
stages, a preflight check, and the metrics the demo's summary shows. The CLI, the recipe's
tables, `llmctl run`'s order and staleness, config hashing, preflight, ``--dry-run``, the
multi-process launcher, `make real` and the demo summary all ask this table, never a stage's
name (tests/test_architecture.py checks).

The work itself is ``run(ctx)`` in ``llmctl/stages/<name>.py``, imported when the stage runs:
stage modules import torch, trl or OpenVINO (seconds), which ``llmctl --help`` must not pay.
A Trainer stage ends in ``training.finish_training`` (weights, loss curve, manifest).

Adding a stage: its table's model in ``llmctl/schema.py``, ``llmctl/stages/<name>.py`` with
``run(ctx)``, one ``StageSpec`` below, and a recipe that uses it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from llmctl import quantization, schema

if TYPE_CHECKING:
    from llmctl.recipe import Recipe
    from llmctl.rundir import StageRun


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str  # one line: the command's help
    config: type[schema.Section]  # the model of its recipe table [<name>]
    # name -> path of everything it loads that an earlier stage or the recipe provides
    inputs: Callable[["Recipe", Any], dict[str, str]]
    # The directory ("model" or "adapter") holding the causal LM it produces, given its table;
    # None: it produces none.
    model_output: Callable[[Any], str] | None = None
    trains: bool = False  # Trainer-based: launched once per process, resumable, tracked
    feeds_training: bool = True  # later stages train from its model (not so a quantized one)
    reads_data: bool = False  # its table's `data` names a required [data.<name>] source
    # its table's keys that name [data.<name>] sources (read, hashed and checked before it runs)
    data_keys: tuple[str, ...] = ("data",)
    # inputs loaded as sequence classifiers, by name or name prefix (reward_model, reward_model_2)
    classifier_inputs: tuple[str, ...] = ()
    own_command: bool = False  # cli.py writes its command (options beyond the recipe's)
    check: Callable[["Recipe", Any], None] | None = None  # static checks for preflight
    summary: tuple[str, ...] = ()  # metrics `llmctl demo` shows in its summary table

    def run(self, ctx: "StageContext") -> dict:
        return importlib.import_module(f"llmctl.stages.{self.name}").run(ctx)


@dataclass
class StageContext:
    """What `pipeline.run_stage` hands a stage: its table, its resolved and existing inputs,
    with the seed already set. ``start`` takes the stage's work directory once the stage has
    validated and loaded what it needs."""

    recipe: "Recipe"
    name: str
    cfg: Any
    inputs: dict[str, str] = field(default_factory=dict)

    def model_output(self) -> str:
        """The directory ("model" or "adapter") its model is saved in."""
        return STAGES[self.name].model_output(self.cfg)

    def start(self) -> "StageRun":
        from llmctl.rundir import StageRun

        return StageRun.start(self.recipe, self.name, self.inputs)


# -- what each stage reads -------------------------------------------------------------------


def _pretrain_inputs(recipe: "Recipe", cfg: schema.PretrainConfig) -> dict[str, str]:
    inputs = {}
    if cfg.init == "pretrained":
        inputs["model"] = cfg.model or recipe.base_model("pretrain.model")
    if cfg.tokenizer or recipe.model.tokenizer:  # else the model's own
        inputs["tokenizer"] = cfg.tokenizer or recipe.model.tokenizer
    return inputs


def _sft_inputs(recipe: "Recipe", cfg: schema.SftConfig) -> dict[str, str]:
    return {"model": cfg.model or recipe.model_from("pretrain")}


def _merge_inputs(recipe: "Recipe", cfg: schema.MergeConfig) -> dict[str, str]:
    return {"adapter": cfg.adapter or str(recipe.run_dir / "sft" / "adapter")}


def _reward_inputs(recipe: "Recipe", cfg: schema.RewardConfig) -> dict[str, str]:
    if cfg.init == "config":
        return {"tokenizer": cfg.tokenizer or recipe.base_model("reward.tokenizer")}
    # InstructGPT's way: the reward model starts from the fine-tuned policy
    return {"model": cfg.model or recipe.model_from("merge", "sft", "pretrain")}


def _policy_inputs(recipe: "Recipe", cfg) -> dict[str, str]:
    """An RL stage's policy: the fine-tuned model (merged when there is a merge stage)."""
    return {"model": cfg.model or recipe.model_from("merge", "sft", "pretrain")}


def _ppo_inputs(recipe: "Recipe", cfg: schema.PpoConfig) -> dict[str, str]:
    return {**_policy_inputs(recipe, cfg),
            "reward_model": cfg.reward_model or str(recipe.run_dir / "reward" / "model")}


def reward_model_inputs(rewards: list) -> dict[int, str]:
    """The input name of each model reward, by its index in grpo.rewards: reward_model,
    reward_model_2, ..."""
    indices = [i for i, r in enumerate(rewards) if isinstance(r, schema.ModelReward)]
    return {i: "reward_model" if n == 1 else f"reward_model_{n}"
            for n, i in enumerate(indices, start=1)}


def _group_rl_inputs(recipe: "Recipe", cfg: schema.GroupRLConfig) -> dict[str, str]:
    """The policy, and each model reward's model."""
    inputs = _policy_inputs(recipe, cfg)
    for i, name in reward_model_inputs(cfg.rewards).items():
        inputs[name] = cfg.rewards[i].model or str(recipe.run_dir / "reward" / "model")
    return inputs


def _quantize_inputs(recipe: "Recipe", cfg: quantization.QuantizeConfig) -> dict[str, str]:
    return {"model": recipe.named_model(cfg.model) if cfg.model else recipe.trained_model()}


def _bench_inputs(recipe: "Recipe", cfg: schema.BenchConfig) -> dict[str, str]:
    return recipe.bench_models()


def _generate_inputs(recipe: "Recipe", cfg: schema.GenerateConfig) -> dict[str, str]:
    return {"model": recipe.named_model(cfg.model) if cfg.model else recipe.last_model()}


def _adapter_unless_full(cfg) -> str:
    return "model" if cfg.method == "full" else "adapter"


# -- preflight checks that need more than the table's own fields ------------------------------


def _check_pretrain(recipe: "Recipe", cfg: schema.PretrainConfig) -> None:
    from pathlib import Path

    from llmctl.errors import UserError
    from llmctl.paths import looks_local

    tokenizer = recipe.model.tokenizer
    if not cfg.tokenizer and tokenizer and looks_local(tokenizer) and not Path(tokenizer).exists():
        raise UserError(f"{recipe.source}: model.tokenizer: {tokenizer} does not exist")


def _check_ppo(recipe: "Recipe", cfg: schema.PpoConfig) -> None:
    from llmctl.data import check_row_format

    check_row_format(cfg.reward_text, recipe.data_source("ppo", cfg.data), "ppo.reward_text")


def _rewards_check(stage: str) -> Callable[["Recipe", schema.GroupRLConfig], None]:
    return lambda recipe, cfg: _check_rewards(recipe, cfg, stage)


def _check_rewards(recipe: "Recipe", cfg: schema.GroupRLConfig, stage: str) -> None:
    import importlib.util

    from llmctl.data import check_row_format
    from llmctl.errors import UserError

    source = recipe.data_source(stage, cfg.data)
    for i, reward in enumerate(cfg.rewards):
        key = f"{stage}.rewards[{i}]"
        if isinstance(reward, schema.ModelReward):
            check_row_format(reward.text, source, f"{key}.text")
        elif isinstance(reward, schema.FunctionReward):
            module = reward.function.partition(":")[0]
            try:  # found, not run: the module runs when the stage does
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise UserError(f"{recipe.source}: {key}.function: no module {module} (it "
                                f"must be importable: installed, or on PYTHONPATH)")


def _check_quantize(recipe: "Recipe", cfg: quantization.QuantizeConfig) -> None:
    from pathlib import Path

    from llmctl.evaluation import check_tasks

    model = _quantize_inputs(recipe, cfg)["model"]  # checked when it exists (not yet in a run)
    from_config = recipe.pretrain is not None and recipe.pretrain.init == "config"
    if not Path(model).exists() and recipe.model.name_or_path and not from_config:
        model = recipe.model.name_or_path  # not trained yet: a fine-tune keeps its base's family
    quantization.check_supported(cfg.backend, model if Path(model).exists() else None)
    if cfg.task:
        check_tasks([cfg.task], cfg.task_path, "quantize.task")


def _check_runtime(recipe: "Recipe", path: str, key: str) -> None:
    """Exit 2 when what runs a quantize output (llama.cpp for a GGUF one) is not installed:
    for one that exists, or one this recipe's quantize stage will make."""
    if quantization.is_quantized_dir(path):
        quantization.check_runtime(path, key)
    elif recipe.quantize is not None and path == recipe.stage_model("quantize"):
        quantization.backend(recipe.quantize.backend).check_runtime(path, key)


def _check_generate(recipe: "Recipe", cfg: schema.GenerateConfig) -> None:
    _check_runtime(recipe, _generate_inputs(recipe, cfg)["model"], "generate.model")


def _check_bench(recipe: "Recipe", cfg: schema.BenchConfig) -> None:
    from llmctl.evaluation import check_tasks

    for path in recipe.bench_models().values():
        _check_runtime(recipe, path, "bench.models")

    if cfg.tasks:
        check_tasks(cfg.tasks, cfg.task_path, "bench.tasks")


GROUP_RL_SUMMARY = ("reward_mean_first", "reward_mean_last", "eval_reward_gain",
                    "eval_reward_gain_sem", "eval_task_accuracy_before", "eval_task_accuracy_after")

REGISTRY: tuple[StageSpec, ...] = (
    StageSpec("pretrain", "Train a causal LM from a config (or continue one) on streamed text.",
              schema.PretrainConfig, _pretrain_inputs, model_output=lambda cfg: "model",
              trains=True, reads_data=True, check=_check_pretrain,
              summary=("num_params", "train_loss_first", "train_loss_last", "eval_perplexity",
                       "tokens_per_second")),
    StageSpec("sft", "Supervised fine-tuning: LoRA, QLoRA or full.",
              schema.SftConfig, _sft_inputs, model_output=_adapter_unless_full,
              trains=True, reads_data=True,
              summary=("trainable_percent", "train_loss_last", "eval_loss",
                       "eval_task_accuracy_before", "eval_task_accuracy_after")),
    StageSpec("merge", "Merge a LoRA adapter into its base model.",
              schema.MergeConfig, _merge_inputs, model_output=lambda cfg: "model",
              summary=("max_abs_logit_diff",)),
    StageSpec("reward", "Train a reward model on chosen/rejected pairs.",
              schema.RewardConfig, _reward_inputs, trains=True, reads_data=True,
              classifier_inputs=("model",),
              summary=("eval_accuracy", "eval_reward_margin")),
    StageSpec("dpo", "Direct preference optimisation on chosen/rejected pairs.",
              schema.DpoConfig, _policy_inputs, model_output=_adapter_unless_full,
              trains=True, reads_data=True,
              summary=("eval_rewards_accuracy", "eval_task_accuracy_before",
                       "eval_task_accuracy_after")),
    StageSpec("grpo", "RL with verifiable rewards or reward models: trl's GRPO.",
              schema.GrpoConfig, _group_rl_inputs, model_output=_adapter_unless_full,
              trains=True, reads_data=True, check=_rewards_check("grpo"),
              classifier_inputs=("reward_model",),
              summary=GROUP_RL_SUMMARY),
    StageSpec("rloo", "RL with verifiable rewards or reward models: trl's RLOO "
                      "(REINFORCE leave-one-out).",
              schema.RlooConfig, _group_rl_inputs, model_output=_adapter_unless_full,
              trains=True, reads_data=True, check=_rewards_check("rloo"),
              classifier_inputs=("reward_model",),
              summary=GROUP_RL_SUMMARY),
    StageSpec("ppo", "RLHF: optimise the policy against the reward model with PPO.",
              schema.PpoConfig, _ppo_inputs,
              model_output=lambda cfg: "model" if cfg.merge else "adapter",
              trains=True, reads_data=True, check=_check_ppo, classifier_inputs=("reward_model",),
              summary=("reward_mean_before", "reward_mean_after", "reward_gain",
                       "reward_gain_sem", "kl_last")),
    StageSpec("quantize", quantization.SUMMARY, quantization.QuantizeConfig, _quantize_inputs, model_output=lambda cfg: "model",
              feeds_training=False, check=_check_quantize, data_keys=("data", "calibration"),
              summary=("size_bytes_before", "size_bytes_after", "metric_before", "metric_after",
                       "relative_loss", "accepted")),
    StageSpec("bench", "Benchmark a model: lm-eval tasks, perplexity, latency.",
              schema.BenchConfig, _bench_inputs, check=_check_bench,
              # the demo's bench.models = [ppo, quantize, sft]: plain keys are the final model's
              summary=("sft/demo_sentiment.acc", "demo_sentiment.acc",
                       "quantize/demo_sentiment.acc", "perplexity", "quantize/perplexity",
                       "quantize/speedup_greedy_b1", "quantize/speedup_beam4_b1")),
    StageSpec("generate", "Generate text with any stage's model.",
              schema.GenerateConfig, _generate_inputs, check=_check_generate, own_command=True,
              summary=("num_prompts", "tokens_per_second")),
)

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in REGISTRY}


def model_stages() -> list[str]:
    """Stages whose model later stages train from, latest first: the default input."""
    return [s.name for s in reversed(REGISTRY) if s.model_output and s.feeds_training]


def stage_models() -> list[str]:
    """What bench.models and generate.model accept as a stage name."""
    return [s.name for s in REGISTRY if s.model_output]
