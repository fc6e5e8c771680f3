"""Recipes: load a TOML file, apply ``--set`` overrides, validate, resolve what stages read.

The tables' fields are in ``llmctl.schema``; which stages exist, and what each reads, in
``llmctl.stages``. Relative paths in a recipe are relative to the directory you run ``llmctl``
from.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationError, create_model

from llmctl.errors import UserError
from llmctl.fingerprint import config_hash
from llmctl.paths import is_local, read_text
from llmctl.schema import (DataSource, DistributedConfig, ModelConfig, RunConfig, Section,
                           union_tag)
from llmctl.stages import REGISTRY, STAGES, model_stages, stage_models


class RecipeTables(Section):
    """The tables every recipe may have; ``Recipe`` adds one optional table per stage."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: dict[str, DataSource] = Field(default_factory=dict)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    # Where the recipe came from; not a TOML key.
    source: str = Field(default="<recipe>", exclude=True)
    overrides: list[str] = Field(default_factory=list, exclude=True)  # the --set items applied

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def stages(self) -> list[str]:
        return [s.name for s in REGISTRY if getattr(self, s.name) is not None]

    def stage_config(self, stage: str) -> Any:
        section = getattr(self, stage, None)
        if section is None:
            raise UserError(f"{self.source}: the recipe has no [{stage}] table")
        return section

    def data_source(self, stage: str, name: str | None, key: str = "data") -> DataSource:
        if name is None:
            raise UserError(f"{self.source}: {stage}.{key}: missing (name a [data.<name>] source)")
        if name not in self.data:
            known = ", ".join(sorted(self.data)) or "none"
            raise UserError(f"{self.source}: {stage}.{key}: no [data.{name}] table "
                            f"(have: {known})")
        return self.data[name]

    def stage_hash(self, stage: str) -> str:
        return config_hash(self.hashed_config(stage))

    def hashed_config(self, stage: str) -> dict[str, Any]:
        """Everything that decides a stage's output, and nothing else: its own table, the seed,
        the [model] loading fields, the data sources it reads and the inputs it loads, with
        paths resolved (inside the run directory: relative to it, so a moved or copied run
        directory hashes the same). Contents of inputs are checked apart (``input_paths``)."""
        section = self._normalize_paths(self.stage_config(stage).model_dump())
        model = self.model.model_dump(include=set(LOAD_KEYS))
        data = {}
        for name in self.stage_sources(stage):
            source = self.data[name].model_dump()
            for key in ("path", "eval_path"):
                if source[key]:
                    source[key] = self.normalize_path(source[key])
            data[name] = source
        return {stage: section, "seed": self.run.seed, "model": model, "data": data,
                "inputs": {k: self.normalize_path(v) for k, v in self.upstream_inputs(stage).items()}}

    def _normalize_paths(self, table: dict[str, Any]) -> dict[str, Any]:
        """``normalize_path`` on every path key of a table, nested tables and lists included
        (a GRPO reward's ``model``); a stage's name where a model goes stays as written."""
        def normalize(value: str) -> str:
            return value if value in stage_models() else self.normalize_path(value)

        out = {}
        for key, value in table.items():
            if key in PATH_KEYS and isinstance(value, str):
                value = normalize(value)
            elif key in PATH_KEYS and isinstance(value, list):
                value = [normalize(v) if isinstance(v, str) else v for v in value]
            elif isinstance(value, dict):
                value = self._normalize_paths(value)
            elif isinstance(value, list):
                value = [self._normalize_paths(v) if isinstance(v, dict) else v for v in value]
            out[key] = value
        return out

    def normalize_path(self, path: str) -> str:
        """A local path as stage hashes see it: ``$RUN/...`` inside the run directory, else
        absolute; hub ids and remote datasets as written."""
        if not is_local(path):
            return path
        resolved = Path(path).expanduser().resolve()
        run_dir = self.run_dir.expanduser().resolve()
        if resolved.is_relative_to(run_dir):
            return "/".join(("$RUN", *resolved.relative_to(run_dir).parts))
        return str(resolved)

    def stage_sources(self, stage: str) -> list[str]:
        """Names of the [data.*] sources a stage reads (its data, its calibration data)."""
        cfg = self.stage_config(stage)
        names = [getattr(cfg, key, None) for key in STAGES[stage].data_keys]
        return [n for n in dict.fromkeys(names) if n and n in self.data]

    # -- inputs ------------------------------------------------------------------------------

    def upstream_inputs(self, stage: str) -> dict[str, str]:
        """Paths a stage reads from earlier stages in this run directory (or the recipe)."""
        return STAGES[stage].inputs(self, self.stage_config(stage))

    def input_paths(self, stage: str) -> list[str]:
        """Everything a stage reads: upstream outputs, its data sources, tokenizers, task files.
        Staleness checks compare their contents with what the stage saw (`pipeline.why_stale`)."""
        cfg = self.stage_config(stage)
        paths = list(self.upstream_inputs(stage).values())
        for name in self.stage_sources(stage):
            paths += [self.data[name].path, self.data[name].eval_path]
        paths += [getattr(cfg, key, None) for key in ("tokenizer", "task_path", "prompts_file")]
        return list(dict.fromkeys(p for p in paths if p))

    # -- which model a stage reads by default ----------------------------------------------------

    def model_from(self, *upstream: str) -> str:
        """The model of the first of ``upstream`` the recipe has, else the base model."""
        for name in upstream:
            if getattr(self, name) is not None:
                return self.stage_model(name)
        return self.base_model("model.name_or_path")

    def stage_model(self, stage: str) -> str:
        """Where a stage of this recipe leaves its model (its adapter, for a LoRA stage)."""
        return str(self.run_dir / stage / STAGES[stage].model_output(self.stage_config(stage)))

    def base_model(self, key: str) -> str:
        if not self.model.name_or_path:
            raise UserError(f"{self.source}: {key}: missing (no upstream stage produces a model)")
        return self.model.name_or_path

    def trained_model(self) -> str:
        """The latest trained model: PPO's policy beats the merged SFT model, which beats the
        adapter..."""
        return self.model_from(*model_stages())

    def _last_trained_stage(self) -> str | None:
        return next((s for s in model_stages() if getattr(self, s) is not None), None)

    def named_model(self, name: str) -> str:
        """A model named by a stage ("sft", "quantize") or given as a path or hub id. A stage
        the recipe lacks (ad-hoc use of a run directory) is found by what it left."""
        if name not in stage_models():
            return name
        if getattr(self, name) is not None:
            return self.stage_model(name)
        adapter = self.run_dir / name / "adapter"
        return str(adapter if adapter.is_dir() else self.run_dir / name / "model")

    def last_model(self) -> str:
        """What generate uses by default: the quantized model when there is one."""
        if self.quantize is not None:
            return self.stage_model("quantize")
        return self.trained_model()

    def bench_models(self) -> dict[str, str]:
        """label -> path for each bench model; a stage name stands for that stage's model."""
        names = list(self.stage_config("bench").models)
        if not names:
            names = [self._last_trained_stage() or self.base_model("bench.models")]
            if self.quantize is not None:
                names.append("quantize")
        stages = {name: self.named_model(name) for name in names if name in stage_models()}
        models = {}
        for name in names:  # a stage keeps its name; a path is labelled around them
            if name in stages:
                models[name] = stages[name]
            else:
                models[_unique_label(name, {**stages, **models})] = name
        return models


# One optional table per registered stage, in pipeline order.
Recipe = create_model("Recipe", __base__=RecipeTables,
                      **{spec.name: (Optional[spec.config], None) for spec in REGISTRY})


# Stage-table keys that hold a path (normalised in stage hashes).
PATH_KEYS = ("model", "models", "adapter", "base", "reward_model", "tokenizer", "task_path",
             "prompts_file")
# [model] keys that change how every stage loads a model.
LOAD_KEYS = ("revision", "trust_remote_code", "allow_pickle", "dtype")


def _unique_label(path: str, taken: dict[str, str]) -> str:
    """A short name for a model path: its directory name, or for a stage's ``model`` /
    ``adapter`` directory the stage's name (with its run's name before it when the stage's
    alone is taken); ``-2``, ``-3``... when that is taken too."""
    parts = Path(path).parts
    stage_output = len(parts) > 1 and parts[-1] in ("model", "adapter")
    label = parts[-2] if stage_output else parts[-1]
    if label in taken and stage_output and len(parts) > 2:
        label = f"{parts[-3]}-{label}"  # another run's stage: runs/<run>/<stage>/model
    unique, n = label, 1
    while unique in taken:
        n += 1
        unique = f"{label}-{n}"
    return unique


# -- loading ---------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a","b","c"], value); VALUE is read as a TOML literal, else a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: bad key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set run.name=trial3
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part} is not a table")
            node = child
        node[path[-1]] = value
    return raw


def _format_validation_error(source: str, err: ValidationError, raw: Any) -> str:
    first = err.errors()[0]
    path, tag = _key_path(first["loc"], raw)
    key = ".".join(str(p) for p in path) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = f"unknown key (not a field of {tag!r})" if tag else "unknown key"
    elif kind == "missing":
        msg = "missing required key"
    elif kind == "value_error":
        # Our validators say "field: what is wrong"; name the field in the key, not the table.
        msg = str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier():
            if key == "<root>":
                key = field
            elif not key.endswith(f".{field}"):  # a field validator's loc already names it
                key = f"{key}.{field}"
            msg = rest
    elif kind == "unknown_backend":  # [quantize]'s backend picks the table's type
        key += ".backend"
        msg = f"unknown backend {first['input'].get('backend')!r} ({first['msg']})"
    else:
        msg = f"{first['msg']} (got {first.get('input')!r})"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def _key_path(loc: tuple, raw: Any) -> tuple[list, str | None]:
    """The recipe keys of an error's location, and the innermost union tag on the way:
    pydantic puts the union member's tag in the location (``quantize.torch.method``,
    ``grpo.rewards.0.regex.pattern``) where the user wrote no such key."""
    path, node, tag, just_skipped = [], raw, None, False
    for part in loc:
        if path and isinstance(node, dict) and not just_skipped \
                and part == union_tag(path[-1], node):
            tag, just_skipped = part, True  # the tag comes once, right after the union's key
            continue
        path.append(part)
        just_skipped = False
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    return path, tag


def _has(node: dict | list, part: Any) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and part < len(node)


def validate(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(source, err, raw)) from None
    recipe.source = source
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML: {err}") from None
    apply_overrides(raw, overrides or [])
    recipe = validate(raw, str(path))
    recipe.overrides = list(overrides or [])
    return recipe


def dump_resolved(recipe: Recipe) -> dict[str, Any]:
    """The recipe as validated, defaults filled in, with the run directory spelled out."""
    out = recipe.model_dump(exclude_none=True)
    out["run"]["dir"] = str(recipe.run_dir)
    return out
