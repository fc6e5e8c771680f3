"""`llmctl rloo`: REINFORCE leave-one-out with trl's RLOOTrainer, LoRA or full.

The same workflow as `llmctl grpo` (llmctl.stages.grpo): the recipe's prompts and rewards,
held-out label task and reward scored before and after, the adapter (or model) saved. Only the
advantage differs: each completion's reward against the mean reward of the other completions
of its prompt (GRPO's baseline is the group's mean, the completion itself included).
"""

from __future__ import annotations

from trl import RLOOConfig, RLOOTrainer

from llmctl.stages import StageContext
from llmctl.stages.grpo import run_group_rl


def run(ctx: StageContext) -> dict:
    return run_group_rl(ctx, RLOOTrainer, RLOOConfig)
