"""DPO step time as llmctl's dpo stage runs it, on the real run's setting: SmolLM2-135M-Instruct
(the merged SFT model), the tweets' preference pairs in the chat template, and the recipe's
[dpo] table: LoRA, batch, learning rate, beta, loss, max_length and precision, through the
stage's own TrainingArguments (``llmctl.training.stage_arguments``).

trl >= 1.13 computes the LM head only at the positions whose next token is a completion token
(a fused head over the labelled positions), which llmctl's own DPO trainer did for trl 1.12
(1.09x trl 1.12's step); the stage now uses trl's DPOTrainer as it is. To compare two
environments (say before and after a package move), run this script in each, alternating.

Each round trains ``--steps`` optimizer steps from the same start and times the steps after the
first ``SKIP``. Usage (after `make real` has written the run and the datasets):

    python scripts/bench_dpo.py [--model runs/smollm2-tweets/merge/model] [--steps 8] [--rounds 2]
"""

from __future__ import annotations

from llmctl.env import quiet_libraries

quiet_libraries()  # before transformers is imported

import argparse  # noqa: E402
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback
import trl
from trl import DPOConfig, DPOTrainer

from llmctl.data import hf_dataset
from llmctl.models import load_causal_lm, load_tokenizer, lora_config
from llmctl.recipe import load_recipe
from llmctl.stages.dpo import dpo_settings
from llmctl.training import stage_arguments

SKIP = 2  # warm-up steps left out


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def seconds_per_step(recipe, tokenizer, dataset, args, workdir: str) -> float:
    cfg = recipe.dpo
    model = load_causal_lm(args.model, recipe.model)
    # The dpo stage's own arguments (the recipe's [dpo] table: precision, no gradient
    # checkpointing unless asked, where trl's DPOConfig turns it on, and the LM head on the
    # answer positions on CPU too); only the length of the run and its logging are the bench's.
    # A copy of two of those settings here once drifted from the stage: without them this timed
    # trl's defaults, 8-10 s a step against 6-7 before the move (AMX Xeon, 2026-12-06).
    config = stage_arguments(cfg, recipe, workdir, DPOConfig, **dpo_settings(cfg),
                             max_steps=args.steps, save_strategy="no", logging_steps=1,
                             eval_strategy="no", report_to=[])
    torch.manual_seed(0)
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=dataset,
                         peft_config=lora_config(cfg.lora, model, "dpo.lora"))
    timer = StepTimes()
    trainer.add_callback(timer)
    trainer.train()
    steady = timer.times[SKIP:]
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2-135m-tweets-cpu.toml")
    parser.add_argument("--model", default="runs/smollm2-tweets/merge/model")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=256, help="training pairs tokenized")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    tokenizer = load_tokenizer(args.model, recipe.model)
    with tempfile.TemporaryDirectory() as workdir:
        source = recipe.data_source("dpo", recipe.dpo.data)
        dataset = hf_dataset(source, "train", f"data.{recipe.dpo.data}", "preference", workdir)
        dataset = dataset.select(range(min(args.pairs, len(dataset))))
        results = []
        for round_ in range(args.rounds):
            results.append(seconds_per_step(recipe, tokenizer, dataset, args, workdir))
            print(f"round {round_ + 1}: {results[-1]:.3f} s/step", flush=True)
    print(f"trl {trl.__version__}, torch {torch.__version__}: median "
          f"{statistics.median(results):.3f} s/step ({args.rounds} rounds of {args.steps} "
          f"steps, {args.steps - SKIP - 1} timed)")


if __name__ == "__main__":
    main()
