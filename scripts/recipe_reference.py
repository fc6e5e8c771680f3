"""Write docs/recipe-reference.md: every recipe table and key, its type, default and description,
from the schema itself (tests/test_registry.py fails when the file is out of date).

    python scripts/recipe_reference.py            # rewrite the file
    python scripts/recipe_reference.py --check    # exit 1 when it differs from the schema
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmctl.recipe import Recipe

OUT = Path(__file__).parents[1] / "docs" / "recipe-reference.md"


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(type_name(a) for a in args if a is not type(None)) + \
            (" or none" if type(None) in args else "")
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (list, dict):
        return f"{origin.__name__} of " + ", ".join(type_name(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    """The default as TOML writes it."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None or value is PydanticUndefined or isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def tag(table: type[BaseModel]) -> str | None:
    """``backend = "inc"``: the key and value that pick this member of a tagged union."""
    for key in ("backend", "kind"):
        field = table.model_fields.get(key)
        args = typing.get_args(field.annotation) if field else ()
        if field and typing.get_origin(field.annotation) is typing.Literal and len(args) == 1:
            return f'{key} = "{args[0]}"'
    return None


def tables(model: type[BaseModel], prefix: str):
    """(dotted name, table class) for a table and the tables its fields hold."""
    yield prefix, model
    for name, field in model.model_fields.items():
        for member in _members(field.annotation):
            if member is not model:
                union = len(_members(field.annotation)) > 1
                yield from tables(member, f"{prefix}.{name}" + (f"] [{tag(member)}" if union else ""))


def _members(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += [m for m in _members(arg) if m not in found]
    return found


def render() -> str:
    lines = ["# Recipe reference", "",
             "Every table and key a recipe may hold, generated from llmctl's schema by",
             "`python scripts/recipe_reference.py` (a test fails when this file is out of date).",
             "A key's dotted path is what `--set` takes: `--set sft.lora.r=8`.", ""]
    for name, field in Recipe.model_fields.items():
        if field.exclude:
            continue
        for dotted, table in tables_of(name, field.annotation):
            lines += [f"## [{dotted}]", ""]
            if table.__doc__ and table.__doc__.strip() and not table.__doc__.startswith("!!!"):
                lines += [" ".join(table.__doc__.split()), ""]
            lines += ["| key | type | default | what it is |", "|---|---|---|---|"]
            for key, f in table.model_fields.items():
                if f.exclude:
                    continue
                lines.append(f"| `{key}` | {type_name(f.annotation)} | {default_text(f)} | "
                             f"{' '.join((f.description or '').split())} |")
            lines.append("")
    return "\n".join(lines)


def tables_of(name: str, annotation):
    if typing.get_origin(annotation) is dict:  # [data.<name>]
        for member in _members(typing.get_args(annotation)[1]):
            yield from tables(member, f"{name}.<name>")
        return
    members = _members(annotation)
    for member in members:
        label = name if len(members) == 1 else f"{name}] [{tag(member)}"
        yield from tables(member, label)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.is_file() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
