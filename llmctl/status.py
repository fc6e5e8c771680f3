"""`llmctl status`: where each stage of a run stands — finished (when, how long, its key
metrics), interrupted (and the checkpoint a rerun resumes from) or not run — and whether
`llmctl run` would run it now, and why. Reads the run directory; changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.errors import UserError
from llmctl.rundir import _last_checkpoint, read_manifest
from llmctl.stages import STAGES


def recipe_path(target: Path, run_dir: Path | None) -> tuple[Path, Path | None]:
    """(recipe file, run directory) for a recipe file, or for a run directory holding the
    recipe it was run from (`llmctl demo` writes one): its ``recipe.toml``, run there."""
    if not target.is_dir():
        return target, run_dir
    recipe = target / "recipe.toml"
    if not recipe.is_file():
        raise UserError(f"{target}: a directory without recipe.toml; give the recipe "
                        f"file (and --run-dir {target})")
    return recipe, target


def stage_status(recipe) -> list[dict[str, Any]]:
    """One row per stage of the recipe, in pipeline order."""
    from llmctl.pipeline import plan

    steps = dict(plan(recipe))
    rows = []
    for stage in recipe.stages():
        row: dict[str, Any] = {"stage": stage, "dir": str(recipe.run_dir / stage)}
        manifest = read_manifest(recipe.run_dir / stage)
        partial = recipe.run_dir / ".partial" / stage
        if manifest and manifest.get("status") == "complete":
            metrics = manifest.get("metrics") or {}
            row.update(status="finished", finished_at=manifest.get("finished_at"),
                       wall_seconds=manifest.get("wall_seconds"),
                       metrics={k: metrics[k] for k in STAGES[stage].summary if k in metrics})
        if partial.is_dir():  # a later run that stopped part-way (over a finished one, or not)
            checkpoint = _last_checkpoint(partial / "checkpoints")
            row.update(status="interrupted" if "status" not in row else "finished, rerun "
                       "interrupted", checkpoint=checkpoint and Path(checkpoint).name)
        row.setdefault("status", "not run")
        reason = steps[stage]
        row["next_run"] = "skip (up to date)" if reason is None else f"run ({reason})"
        rows.append(row)
    return rows


def print_table(recipe, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe.run_dir} ({recipe.source})", show_lines=True)
    for column in ("stage", "status", "finished", "wall", "metrics", "`llmctl run` would"):
        table.add_column(column, overflow="fold")
    for row in rows:
        status = row["status"] + (f" at {row['checkpoint']}" if row.get("checkpoint") else "")
        wall = f"{row['wall_seconds']:.0f} s" if row.get("wall_seconds") is not None else ""
        metrics = "\n".join(f"{k} {_short(v)}" for k, v in row.get("metrics", {}).items())
        table.add_row(row["stage"], status, (row.get("finished_at") or "")[:19].replace("T", " "),
                      wall, metrics, row["next_run"])
    Console().print(table)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)

