"""Running stages: one by name, or every stage of a recipe in pipeline order with skipping."""

from __future__ import annotations

import importlib
from typing import Callable

from llmctl import distributed
from llmctl.progress import console
from llmctl.recipe import PIPELINE, Recipe
from llmctl.rundir import read_manifest

def stage_function(stage: str) -> Callable:
    """A stage is the module llmctl.stages.<name> and its run(recipe, run_dir)."""
    return importlib.import_module(f"llmctl.stages.{stage}").run


def run_stage(recipe: Recipe, stage: str) -> dict:
    recipe.stage_config(stage)  # exit 2 if the recipe has no table for it
    if stage in distributed.TRAINING_STAGES:
        distributed.check_supported(recipe.distributed)
        if distributed.should_launch(recipe.distributed, stage):
            # The same stage, once per process, under torchrun / accelerate launch.
            distributed.launch(recipe, stage)
            return (read_manifest(recipe.run_dir / stage) or {}).get("metrics", {})
        distributed.init()
    return stage_function(stage)(recipe, recipe.run_dir)


def is_up_to_date(recipe: Recipe, stage: str) -> bool:
    """Finished, and by the same resolved config and inputs as the recipe asks for now."""
    manifest = read_manifest(recipe.run_dir / stage)
    return bool(manifest) and manifest.get("status") == "complete" \
        and manifest.get("config_hash") == recipe.stage_hash(stage)


def run_all(recipe: Recipe, force: bool = False, stages: list[str] | None = None) -> dict[str, str]:
    """Run the recipe's stages in PIPELINE order; returns stage -> "ran" | "skipped"."""
    outcome = {}
    for stage in stages or recipe.stages():
        assert stage in PIPELINE
        if not force and is_up_to_date(recipe, stage):
            console.print(f"[dim]llmctl {stage}: up to date, skipped[/]")
            outcome[stage] = "skipped"
            continue
        run_stage(recipe, stage)
        outcome[stage] = "ran"
    return outcome
