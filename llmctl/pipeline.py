"""Running stages: one by name, or every stage of a recipe in pipeline order with skipping."""

from __future__ import annotations

import importlib
from datetime import datetime
from pathlib import Path
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
    """Finished, by the same resolved config and inputs as the recipe asks for now, and after
    the stages of this run it reads from last finished (`llmctl ppo` rerun by hand makes the
    quantize that read the old policy stale)."""
    manifest = read_manifest(recipe.run_dir / stage)
    if not (manifest and manifest.get("status") == "complete"
            and manifest.get("config_hash") == recipe.stage_hash(stage)):
        return False
    started = datetime.fromisoformat(manifest["started_at"])
    for upstream in _upstream_stages(recipe, manifest.get("inputs", {})):
        finished = (read_manifest(recipe.run_dir / upstream) or {}).get("finished_at")
        if finished and datetime.fromisoformat(finished) > started:
            return False
    return True


def _upstream_stages(recipe: Recipe, inputs: dict) -> set[str]:
    """The stages of this run directory whose outputs a manifest's inputs point into."""
    run_dir = recipe.run_dir.resolve()
    paths = [Path(p).resolve() for p in inputs.values() if isinstance(p, str)]
    return {path.relative_to(run_dir).parts[0] for path in paths
            if path != run_dir and path.is_relative_to(run_dir)} & set(PIPELINE)


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
