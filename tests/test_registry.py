"""The stage registry: every stage has help, a recipe table, a module with run(ctx), a CLI
command, a place in `llmctl run`'s order, and a repo recipe that dry-runs it."""

import importlib
import tomllib
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from llmctl import schema
from llmctl.recipe import Recipe
from llmctl.schema import Section
from llmctl.stages import REGISTRY, STAGES, model_stages, stage_models

REPO = Path(__file__).parents[1]


def test_every_stage_is_complete():
    from llmctl.cli import app

    commands = {c.name for c in app.registered_commands}
    recipe_tables = {}
    for path in sorted((REPO / "recipes").glob("*.toml")):
        for table in tomllib.loads(path.read_text()):
            recipe_tables.setdefault(table, path.name)
    for spec in REGISTRY:
        assert spec.help and "\n" not in spec.help, spec.name
        assert table_types(spec.config) and all(issubclass(t, Section)
                                                for t in table_types(spec.config))
        assert Recipe.model_fields[spec.name].default is None  # an optional [<name>] table
        assert spec.config in getattr(Recipe.model_fields[spec.name].annotation, "__args__", ())
        assert callable(importlib.import_module(f"llmctl.stages.{spec.name}").run)
        assert spec.name in commands
        # test_recipe.test_repo_recipes_dry_run dry-runs every repo recipe
        assert spec.name in recipe_tables, f"no recipe in recipes/ has a [{spec.name}] table"


def table_types(config) -> list[type]:
    """A stage's table model, or each member of a tagged union of them ([quantize])."""
    if isinstance(config, type):
        return [config]
    union = get_args(config)[0]  # Annotated[Union[Annotated[Model, Tag], ...], Discriminator]
    return [get_args(member)[0] for member in get_args(union)]


def test_run_order_and_default_models_come_from_the_registry(tmp_path):
    from llmctl.recipe import load_recipe

    assert [s.name for s in REGISTRY] == list(STAGES)
    # the latest trained model is what quantize, bench and generate read by default
    assert model_stages() == ["ppo", "rloo", "grpo", "dpo", "merge", "sft", "pretrain"]
    assert "quantize" in stage_models() and "quantize" not in model_stages()
    path = tmp_path / "r.toml"
    path.write_text('[run]\nname = "t"\n[model]\nname_or_path = "m"\n[data.d]\npath = "d"\n'
                    '[generate]\n[sft]\ndata = "d"\n[grpo]\ndata = "d"\n'
                    '[[grpo.rewards]]\nkind = "label_match"\n')
    recipe = load_recipe(path)
    assert recipe.stages() == ["sft", "grpo", "generate"]  # pipeline order, not file order
    assert recipe.upstream_inputs("grpo") == {"model": "runs/t/sft/adapter"}
    assert recipe.upstream_inputs("generate") == {"model": "runs/t/grpo/adapter"}


def test_every_table_field_has_a_description():
    tables = schema_tables(Recipe)
    assert {"RunConfig", "GrpoConfig", "LabelMatchReward", "LoraConfig", "LatencyConfig",
            "IncQuantize", "BnbQuantize"} <= {t.__name__ for t in tables}
    missing = [f"{table.__name__}.{name}" for table in tables
               for name, field in table.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, f"fields without Field(description=...): {', '.join(missing)}"


def schema_tables(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every table a recipe can hold: the tables of ``root``'s fields, the members of their
    unions (QuantizeConfig, GrpoReward) and the tables their fields hold."""
    seen: dict[type, None] = {}
    todo = [field.annotation for field in root.model_fields.values()]
    while todo:
        item = todo.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            if item not in seen:
                seen[item] = None
                todo += [field.annotation for field in item.model_fields.values()]
        else:
            todo += get_args(item)  # Union, Annotated, list[...], dict[..., ...]
    return [table for table in seen if table.model_fields]



def test_recipe_reference_is_current():
    """docs/recipe-reference.md is what the schema says now: a key added without rerunning
    scripts/recipe_reference.py fails here."""
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "recipe_reference.py"
    spec = importlib.util.spec_from_file_location("recipe_reference", script)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    text = reference.render()
    assert "| `trust_remote_code` | bool | `false` |" in text  # a key, its type and default
    assert '## [quantize] [backend = "openvino"]' in text  # each union member's own table
    assert reference.OUT.read_text() == text, "run: python scripts/recipe_reference.py"
