"""DPO step time: llmctl's trainer (LM head on the completion positions only) against trl's
DPOTrainer, on the real run's setting: SmolLM2-135M-Instruct (the merged SFT model), the
tweets' preference pairs in the chat template, and the recipe's [dpo] LoRA, batch, learning
rate, beta, loss and max_length, in bf16.

Rounds alternate (trl, llmctl, trl, ...); each trains ``--steps`` optimizer steps from the
same start and times the steps after the first ``SKIP``. Prints each round, the medians, and
llmctl/trl as a speed ratio. Usage (after `make real` has written the run and the datasets):

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
from trl import DPOConfig, DPOTrainer

from llmctl.data import hf_dataset
from llmctl.models import load_causal_lm, load_tokenizer, lora_config
from llmctl.recipe import load_recipe
from llmctl.stages.dpo import dpo_loss
from llmctl.trainers.dpo import CompletionHeadDPOTrainer

SKIP = 2  # warm-up steps left out


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def seconds_per_step(trainer_cls, recipe, tokenizer, dataset, args, workdir: str) -> float:
    cfg = recipe.dpo
    model = load_causal_lm(args.model, recipe.model)
    config = DPOConfig(output_dir=workdir, per_device_train_batch_size=cfg.batch_size,
                       max_length=cfg.max_length, learning_rate=cfg.lr, beta=cfg.beta,
                       **dpo_loss(cfg), bf16=True, use_cpu=True, report_to=[],
                       max_steps=args.steps, save_strategy="no", logging_steps=1,
                       disable_tqdm=True, seed=0)
    torch.manual_seed(0)
    trainer = trainer_cls(model=model, args=config, processing_class=tokenizer,
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
        results = {"trl DPOTrainer": [], "llmctl": []}
        for round_ in range(args.rounds):
            for label, cls in (("trl DPOTrainer", DPOTrainer), ("llmctl", CompletionHeadDPOTrainer)):
                seconds = seconds_per_step(cls, recipe, tokenizer, dataset, args, workdir)
                results[label].append(seconds)
                print(f"round {round_ + 1} {label}: {seconds:.3f} s/step", flush=True)
    trl_s, ours_s = (statistics.median(v) for v in results.values())
    print(f"median s/step: trl {trl_s:.3f}, llmctl {ours_s:.3f}; "
          f"llmctl/trl speed {trl_s / ours_s:.2f}x ({args.rounds} rounds of {args.steps} steps, "
          f"{args.steps - SKIP - 1} timed)")


if __name__ == "__main__":
    main()
