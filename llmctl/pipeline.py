"""Running stages: one by name, or every stage of a recipe in pipeline order with skipping."""

from __future__ import annotations

import contextlib
import importlib
import os
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


def why_stale(recipe: Recipe, stage: str) -> str | None:
    """Why a stage must (re)run, or None when it is up to date: finished, by the same resolved
    config as the recipe asks for now, and nothing it reads changed since it started (an
    upstream stage rerun by hand, as `llmctl ppo` makes the quantize that read the old policy
    stale; a dataset rewritten in place; a retrained tokenizer). The config hash sees paths,
    not contents; the files' modification times see the contents."""
    manifest = read_manifest(recipe.run_dir / stage)
    if not manifest or manifest.get("status") != "complete":
        return "not finished yet"
    if manifest.get("config_hash") != recipe.stage_hash(stage):
        return "its config or input paths changed"
    # started_at has whole seconds: a file written in the second the stage started counts as
    # read by it, not as a change.
    changed_after = datetime.fromisoformat(manifest["started_at"]).timestamp() + 1
    for path in recipe.read_paths(stage):
        if newest_mtime(Path(path)) >= changed_after:
            return f"{path} changed after it ran"
    return None


def newest_mtime(path: Path) -> float:
    """The latest modification time of a local file or of anything under a local directory;
    0 for hub ids and remote datasets (hub://, al://), which have no local copy to look at."""
    if not path.exists():
        return 0.0
    newest = path.stat().st_mtime
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):  # a file removed while we walk
                    newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
    return newest


def run_all(recipe: Recipe, force: bool = False, stages: list[str] | None = None) -> dict[str, str]:
    """Run the recipe's stages in PIPELINE order; returns stage -> "ran" | "skipped"."""
    outcome = {}
    for stage in stages or recipe.stages():
        assert stage in PIPELINE
        reason = "--force" if force else why_stale(recipe, stage)
        if reason is None:
            console.print(f"[dim]llmctl {stage}: up to date, skipped[/]")
            outcome[stage] = "skipped"
            continue
        console.print(f"[dim]llmctl {stage}: running ({reason})[/]", soft_wrap=True)
        run_stage(recipe, stage)
        outcome[stage] = "ran"
    return outcome
