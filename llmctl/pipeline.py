"""Running stages: one by name, or every stage of a recipe in pipeline order with skipping.

Before any stage runs, :func:`preflight` checks everything that can be checked without
training (data sources, local paths, upstream outputs, architecture configs, lm-eval task
names), so a typo fails in a second with exit 2, not after hours, and ``--dry-run`` checks
exactly what a run would.
"""

from __future__ import annotations

from llmctl import distributed, rundir
from llmctl.errors import UserError
from llmctl.fingerprint import changed, describe_changes
from llmctl.paths import demo_hint, exists, is_adapter_dir, is_local, looks_local
from llmctl.progress import console
from llmctl.recipe import Recipe
from llmctl.rundir import check_replaceable, check_run_dir, read_manifest, require_input, \
    run_dir_lock, stage_identity, stage_of_path
from llmctl.stages import STAGES, StageContext


def run_stage(recipe: Recipe, stage: str) -> dict:
    """Check, then run one stage (once per process when it trains on several); its metrics."""
    cfg = recipe.stage_config(stage)  # exit 2 if the recipe has no table for it
    spec = STAGES[stage]
    if spec.trains:
        distributed.check_supported(recipe, stage)
    elsewhere = spec.trains and distributed.lock_held_by_node_0(recipe, stage)
    with run_dir_lock(recipe.run_dir, held_elsewhere=elsewhere):
        preflight(recipe, [stage])  # every input exists and loads
        if spec.trains:
            if distributed.should_launch(recipe, stage):
                # The same stage, once per process, under torchrun / accelerate launch.
                distributed.launch(recipe, stage)
                return (read_manifest(recipe.run_dir / stage) or {}).get("metrics", {})
            distributed.init()
        from transformers import set_seed

        set_seed(recipe.run.seed)
        try:
            return spec.run(StageContext(recipe, stage, cfg, recipe.upstream_inputs(stage)))
        except UserError:
            if rundir.ACTIVE is not None and rundir.ACTIVE.stage == stage:
                rundir.ACTIVE.abandon()  # a refused input leaves the run directory as it was
            raise


def why_stale(recipe: Recipe, stage: str) -> str | None:
    """Why a stage must (re)run, or None when it is up to date: finished, by the same resolved
    config as the recipe asks for now (``Recipe.hashed_config``), and nothing it reads changed
    since it started: an upstream stage finished again, a dataset or tokenizer was rewritten.
    Contents are compared, not modification times, so a copied run directory stays finished."""
    manifest = read_manifest(recipe.run_dir / stage)
    if not manifest or manifest.get("status") != "complete":
        return "not finished yet"
    recorded = manifest.get("fingerprint") or {}
    if manifest.get("config_hash") != recipe.stage_hash(stage):
        if "config" not in recorded:
            return "its config changed (finished by an older llmctl)"
        return f"config changed: {describe_changes(recorded['config'], recipe.hashed_config(stage))}"
    for path in recipe.input_paths(stage):
        then = recorded.get("inputs", {}).get(recipe.normalize_path(path))
        if then is None or not is_local(path):
            continue
        if "stage" in then:
            now = stage_identity(read_manifest(recipe.run_dir / then["stage"]) or {})
            if now != {k: then.get(k) for k in now}:
                return f"{then['stage']} ran again after it ({path})"
        elif changed(path, then):
            return f"{path} changed after it ran"
    return None


def preflight(recipe: Recipe, stages: list[str]) -> None:
    """Check each stage's inputs as far as possible without loading a model; exit 2 on the
    first problem. ``stages`` run in this order in this command, so an output of an earlier
    one need not exist yet."""
    check_run_dir(recipe.run_dir)
    produced: set[str] = set()
    for stage in stages:
        cfg = recipe.stage_config(stage)
        check_replaceable(recipe.run_dir / stage, stage)
        spec = STAGES[stage]
        for key in spec.data_keys:
            name = getattr(cfg, key, None)
            if name is not None or (key == "data" and spec.reads_data):
                source = recipe.data_source(stage, name, key)
                for field in ("path", "eval_path"):
                    path = getattr(source, field)
                    if path and is_local(path) and not exists(path):
                        raise UserError(f"{recipe.source}: data.{name}.{field}: dataset {path} "
                                        f"does not exist{demo_hint(path)}")
        if spec.check:  # the stage's own rules, before loading what it reads
            spec.check(recipe, cfg)
        for name, path in recipe.upstream_inputs(stage).items():
            upstream = stage_of_path(path, recipe.run_dir)
            if upstream in produced:
                continue
            if upstream and upstream in STAGES and getattr(recipe, upstream) is None \
                    and not exists(path):
                raise UserError(f"{stage}.{name}: {path} does not exist and no stage of this "
                                f"recipe produces it (add a [{upstream}] table or set "
                                f"{stage}.{name})")
            require_input(path, f"{stage}.{name}")
            if name != "tokenizer" and exists(path):
                from llmctl.models import check_loadable

                if name == "adapter" and not is_adapter_dir(path):
                    raise UserError(f"{stage}.adapter: {path} is not a LoRA adapter directory "
                                    f"(no adapter_config.json)")
                check_loadable(path, recipe.model, f"{stage}.{name}",
                               causal_lm=not name.startswith(spec.classifier_inputs))
        for key in ("tokenizer", "task_path", "prompts_file"):
            path = getattr(cfg, key, None)
            if path and looks_local(path) and not exists(path):
                raise UserError(f"{recipe.source}: {stage}.{key}: {path} does not exist"
                                f"{demo_hint(path)}")
        if getattr(cfg, "init", None) == "config":
            from llmctl.models import check_config_overrides

            check_config_overrides(cfg.architecture, cfg.config, f"{recipe.source}: {stage}.config")
        produced.add(stage)


def plan(recipe: Recipe, force: bool = False, stages: list[str] | None = None
         ) -> list[tuple[str, str | None]]:
    """(stage, reason to run it or None to skip) for each stage, in pipeline order. A stage
    after one that runs runs too when it reads that one's output."""
    out, rerun = [], set()
    for stage in stages or recipe.stages():
        reason = "--force" if force else why_stale(recipe, stage)
        if reason is None:
            upstream = [stage_of_path(p, recipe.run_dir) for p in recipe.input_paths(stage)]
            hit = next((u for u in upstream if u in rerun), None)
            if hit:
                reason = f"{hit} runs first"
        if reason is not None:
            rerun.add(stage)
        out.append((stage, reason))
    return out


def run_all(recipe: Recipe, force: bool = False, stages: list[str] | None = None) -> dict[str, str]:
    """Run the recipe's stages in pipeline order; returns stage -> "ran" | "skipped"."""
    outcome = {}
    with run_dir_lock(recipe.run_dir):
        steps = plan(recipe, force, stages)
        preflight(recipe, [s for s, reason in steps if reason is not None])
        for stage, _ in steps:
            reason = "--force" if force else why_stale(recipe, stage)  # an upstream may have run
            if reason is None:
                console.print(f"[dim]llmctl {stage}: up to date, skipped[/]")
                outcome[stage] = "skipped"
                continue
            console.print(f"[dim]llmctl {stage}: running ({reason})[/]", soft_wrap=True)
            run_stage(recipe, stage)
            outcome[stage] = "ran"
    return outcome
