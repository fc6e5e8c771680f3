"""A fuzz of every stage command, generated from the recipe schema: bad input is exit 2 with one
`error:` line naming the file or key and the run directory unchanged, never exit 1.

The cases come from walking ``llmctl.schema``'s pydantic models (every table a stage command
reads: [run], [model], [distributed], its [data.<name>] sources and its own table, nested
tables and [quantize]'s backends included), so a new field is fuzzed without a change here.
For each field: the values its type and constraints make interesting (0, -1, the bounds +- 1,
numbers that matter on the demo model, huge ones, NaN and inf, empty strings, wrong types,
unknown enum members); for path fields, broken paths (missing, a file for a directory and the
reverse, not UTF-8, a symlink loop, unreadable where not root); and random combinations of
two or three of those. Each case runs the stage's CLI in-process on the demo recipe with
``--dry-run``, and some (see REAL_SHARE) for real up to the first optimizer step
(``max_steps = 1``, ``ppo.steps = 1``, ``quantize.max_trials = 1``) on a copy of a run directory
whose upstream stages finished.

CI: a fixed seed and budget. By hand, a deeper search:
``LLMCTL_FUZZ_CASES=2000 LLMCTL_FUZZ_SEED=7 pytest -q tests/test_fuzz.py``.
"""

import json
import math
import os
import random
import re
import shutil
import signal
from pathlib import Path
from string import Template
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel

from llmctl.schema import Section
from tests.conftest import run_cli
from tests.test_safety import snapshot

pytestmark = pytest.mark.slow

CASES = int(os.environ.get("LLMCTL_FUZZ_CASES", "50"))
SEED = int(os.environ.get("LLMCTL_FUZZ_SEED", "0"))
# Share of cases that also run for real (those whose values stay small enough to finish fast).
REAL_SHARE = float(os.environ.get("LLMCTL_FUZZ_REAL", "0.1"))
REAL_TIMEOUT_S = 60  # a real case past this is interrupted and counted as inconclusive

# Demo stages plus a minimal table for the stages the demo leaves out, so their fields run too.
EXTRA_TABLES = """
[merge]
adapter = "${run}/ppo/adapter"

[dpo]
data = "prefs"

[grpo]
data = "sentiment"
num_generations = 2
batch_size = 2
rewards = [{ kind = "label_match" }]

[rloo]
data = "sentiment"
num_generations = 2
batch_size = 2
rewards = [{ kind = "label_match" }]
"""
# How a real run stops after its first optimizer step (what a user would set).
STOP_EARLY = {"ppo": "ppo.steps=1", "quantize": "quantize.max_trials=1",
              "generate": "generate.max_new_tokens=2"}
REAL_STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "rloo", "ppo", "merge", "generate",
               "quantize")  # bench's lm-eval takes longer than a fuzz case should: dry-run only
# Numbers that matter on the demo: its batch sizes, sequence lengths and positions (256).
DEMO_NUMBERS = (1, 2, 3, 4, 7, 8, 15, 16, 17, 127, 128, 129, 255, 256, 257, 4096)
HUGE = (10**6, 2**31, 2**63 - 1)
PATH_WORDS = ("path", "file", "dir", "tokenizer", "model", "adapter", "base")


# -- the cases, from the schema --------------------------------------------------------------


def _unwrap(annotation):
    """(annotation without Optional/Annotated, Annotated metadata)."""
    meta = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *more = get_args(annotation)
            meta += more
        elif get_origin(annotation) in (Union, getattr(__import__("types"), "UnionType")):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, meta
            annotation = args[0]
        else:
            return annotation, meta


def _sections(annotation) -> list[type[Section]]:
    """The table models an annotation holds: one, or the members of a tagged union."""
    annotation, _ = _unwrap(annotation)
    members = get_args(annotation) if get_origin(annotation) is Union else (annotation,)
    out = []
    for member in members:
        member, _ = _unwrap(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            out.append(member)
    return out


def _tag(model: type[Section]) -> tuple[str, Any] | None:
    """The discriminating Literal field of a union member (quantize's backend, a reward's kind)."""
    for name in ("backend", "kind"):
        field = model.model_fields.get(name)
        if field is not None and get_origin(field.annotation) is Literal:
            return name, get_args(field.annotation)[0]
    return None


def leaves(model: type[Section], prefix: str, fixed: tuple = ()):
    """(dotted key, annotation, FieldInfo, --set items the key needs) for every field of a table
    and its nested tables; a union member's tag comes with its fields."""
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        key = f"{prefix}{name}"
        yield key, info.annotation, info, fixed
        inner = _sections(info.annotation)
        if inner and get_origin(_unwrap(info.annotation)[0]) is not list:
            for member in inner:
                tag = _tag(member) if len(inner) > 1 else None
                more = fixed + ((f"{key}.{tag[0]}={toml(tag[1])}",) if tag else ())
                yield from leaves(member, f"{key}.", more)


def stage_fields(stage: str, data_sources: list[str]):
    from llmctl.recipe import RecipeTables
    from llmctl.stages import STAGES

    for table in ("run", "model", "distributed"):
        yield from leaves(_sections(RecipeTables.model_fields[table].annotation)[0], f"{table}.")
    from llmctl.schema import DataSource

    for source in data_sources:
        yield from leaves(DataSource, f"data.{source}.")
    config = STAGES[stage].config
    members = _sections(config) if get_origin(_unwrap(config)[0]) is Union else [config]
    for member in members:
        tag = _tag(member) if len(members) > 1 else None
        yield from leaves(member, f"{stage}.",
                          (f"{stage}.{tag[0]}={toml(tag[1])}",) if tag else ())


def _bounds(info, meta) -> list[float]:
    out = []
    for m in [*info.metadata, *meta]:
        for attr in ("ge", "gt", "le", "lt"):
            value = getattr(m, attr, None)
            if value is not None:
                out += [value - 1, value, value + 1]
    return out


def _is_path(name: str, info) -> bool:
    return any(w in name for w in PATH_WORDS) or any(
        w in (info.description or "") for w in ("directory", " path", "file"))


def values(key: str, annotation, info, paths: dict[str, str], rng: random.Random) -> list:
    """The values worth trying for one field."""
    base, meta = _unwrap(annotation)
    name = key.rsplit(".", 1)[-1]
    wrong = ["8", [1], {"x": 1}]
    origin = get_origin(base)
    if base is bool:
        return [1, "true", 0.5]
    if base is int:
        nums = [0, -1, *_bounds(info, meta), *DEMO_NUMBERS, *HUGE, -(2**63)]
        return [int(n) for n in nums] + [1.5, True] + wrong
    if base is float:
        nums = [0.0, -1.0, 1e-12, 0.5, 1.0, 2.0, 1e308, math.nan, math.inf, -math.inf,
                *map(float, _bounds(info, meta))]
        return nums + [1, True] + wrong
    if base is str:
        out = ["", " ", "nope", "{", "{response}", "x" * 5000, "caf\xe9 \u2603", "\x00"]
        if _is_path(name, info):
            out += list(paths.values()) + ["sft", "pretrain", "quantize", "bench", "nope-stage"]
        return out + [1, True, ["a"]]
    if origin is Literal:
        return list(get_args(base)) + ["nope", "", 3, -1]
    if origin is list:
        (item,) = get_args(base) or (Any,)
        members = _sections(item)
        if members:  # a list of tables: one table per member, with a field drawn from it
            out = [[], [{}], [{"kind": "nope"}]]
            for member in members:
                table = {k: v for k, v in [_tag(member)] if _tag(member)}
                fields = [(n, f) for n, f in member.model_fields.items() if n not in table]
                if fields:
                    n, f = rng.choice(fields)
                    table[n] = rng.choice(values(f"{key}.0.{n}", f.annotation, f, paths, rng))
                out.append([table])
            return out
        inner = values(f"{key}.0", item, info, paths, rng) if item is not Any else [1]
        return [[], rng.sample(inner, min(3, len(inner))), [inner[0]] * 64, "a", 1]
    if origin is dict:
        return [{}, {"nope": 1}, {"nope": {"deeper": [1]}}, 1, "x"]
    if _sections(base):
        return [1, "x", [], {"nope": 1}]
    return [0, "", [], {}]


def toml(value) -> str:
    """A value as the TOML literal `--set` reads."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def data_sources(recipe_text: str, stage: str) -> list[str]:
    import tomllib

    raw = tomllib.loads(recipe_text)
    table = raw.get(stage, {})
    names = [table[k] for k in ("data", "calibration") if isinstance(table.get(k), str)]
    return [n for n in names if n in raw.get("data", {})]


def make_cases(recipe_text: str, paths: dict[str, str], n: int, seed: int):
    """n cases (stage, [--set items], keys touched): one field each, and in a third of them,
    two or three fields of the same stage together."""
    from llmctl.stages import STAGES

    rng = random.Random(seed)
    pools = {}
    for stage in STAGES:
        pool = []
        for key, annotation, info, fixed in stage_fields(stage, data_sources(recipe_text, stage)):
            for value in values(key, annotation, info, paths, rng):
                pool.append((key, value, fixed))
        pools[stage] = pool
    stages = sorted(pools)
    cases = []
    for i in range(n):
        stage = stages[i % len(stages)]
        picks = rng.sample(pools[stage], rng.choice((2, 3))) if rng.random() < 0.33 \
            else [rng.choice(pools[stage])]
        sets, keys = [], []
        for key, value, fixed in picks:
            sets += [*fixed, f"{key}={toml(value)}"]
            keys.append(key)
        if rng.random() < 0.03:
            sets.append(f"run.dir={toml(paths['file'])}")  # a run directory that is a file
            keys.append("run.dir")
        cases.append((stage, sets, keys))
    return cases


# -- the project the cases run on -------------------------------------------------------------


def bad_paths(root: Path) -> dict[str, str]:
    """Paths that are wrong in each way a path field can be."""
    root.mkdir()
    (root / "file").write_text("a file, not a directory\n")
    (root / "not_utf8.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "empty_dir").mkdir()
    (root / "dir_with_file").mkdir()
    (root / "dir_with_file" / "config.json").write_text("{not json")
    (root / "loop").symlink_to(root / "loop")
    paths = {"missing": str(root / "missing"), "file": str(root / "file"),
             "not_utf8": str(root / "not_utf8.txt"), "empty_dir": str(root / "empty_dir"),
             "bad_dir": str(root / "dir_with_file"), "loop": str(root / "loop"),
             "under_file": str(root / "file" / "below"), "relative_missing": "no/such/dir"}
    if os.geteuid() != 0:  # root reads a mode-000 file anyway: the case would test nothing
        (root / "unreadable").write_text("secret\n")
        (root / "unreadable").chmod(0)
        paths["unreadable"] = str(root / "unreadable")
    return paths


@pytest.fixture(scope="module")
def fuzz_project(tmp_path_factory, assets):
    return build_project(tmp_path_factory.mktemp("fuzz"), assets)


def build_project(root: Path, assets: dict) -> dict:
    """The demo recipe on the demo assets, and a run directory whose upstream stages finished
    (one optimizer step each): what every stage of the recipe reads exists."""
    run = root / "run"
    demo = (Path(__file__).parents[1] / "llmctl" / "demo" / "demo.toml").read_text()
    text = Template(demo + EXTRA_TABLES).substitute(
        {k: str(Path(v).resolve()) for k, v in assets.items()}, run=str(run))
    # The fixture runs pretrain, sft and reward: later stages read sft's model, not ppo's.
    for old, new in (('[run]\nname = "demo"', f'[run]\nname = "demo"\ndir = "{run}"'),
                     ('models = ["ppo", "quantize", "sft"]', 'models = ["sft"]'),
                     ('[quantize]', '[quantize]\nmodel = "sft"'),
                     ('[generate]', '[generate]\nmodel = "sft"')):
        assert old in text, old
        text = text.replace(old, new, 1)
    recipe = root / "recipe.toml"
    recipe.write_text(text)
    quick = ["--set", "ppo.eval_prompts=4", "--set", "sft.eval_task_rows=8"]
    for stage in ("pretrain", "sft", "reward"):
        code, _, err = run_cli([stage, recipe, "--set", f"{stage}.max_steps=1", *quick])
        assert code == 0, err
    paths = bad_paths(root / "bad")
    return {"root": root, "recipe": recipe, "run": run, "text": text, "paths": paths}


# -- one case ---------------------------------------------------------------------------------


class _Timeout(KeyboardInterrupt):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def check_case(argv: list[str], keys: list[str], watched: Path, capsys) -> int:
    """Run one case; assert the contract; its exit code (130: interrupted after the timeout)."""
    from llmctl import rundir

    rundir.ACTIVE = None  # (in-process: what the previous case's stage left)
    before = snapshot(watched)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(REAL_TIMEOUT_S)
    try:
        code, _, err = run_cli(argv, capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if code in (130, 143):  # interrupted (our timeout; a SIGTERM from outside): inconclusive
        return 130
    lines = err.strip().splitlines()
    assert code in (0, 2), f"exit {code}: llmctl {' '.join(map(str, argv))}\n{err[-3000:]}"
    assert "Traceback" not in err, err
    if code == 2:
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], err
        # It names what is wrong: a dotted key, a path, a file, or the value given.
        named = [str(argv[1]), *keys, *(k.rsplit(".", 1)[-1] for k in keys), "--"]
        named += [v.strip('"') for a in map(str, argv) if "=" in a
                  for v in [a.split("=", 1)[1]] if len(v.strip('"')) > 2]
        assert re.search(r"[\w-]+(\.[\w-]+)+|/", errors[0]) or \
            any(n in errors[0] for n in named), (argv, errors[0])
        assert not re.match(r"error: [A-Z]\w*(Error|Exception)\b", errors[0]), errors[0]
        assert snapshot(watched) == before, argv
    return code


def test_schema_fuzz(fuzz_project, tmp_path, capsys, monkeypatch):
    import time

    project = fuzz_project
    cwd = project["root"] / "cwd"  # where a relative run.dir or path lands: watched too
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    rng = random.Random(SEED + 1)
    counts = {"cases": 0, "dry_exit_0": 0, "dry_exit_2": 0, "real": 0, "real_exit_0": 0,
              "real_exit_2": 0, "real_timeout": 0}
    failures = []

    def run_case(argv, keys, watched):
        try:
            return check_case(argv, keys, watched, capsys)
        except AssertionError as err:  # every failure of the run is reported, not the first
            failures.append(str(err).split("\nassert ")[0])
            return None

    t0 = time.perf_counter()
    for i, (stage, sets, keys) in enumerate(
            make_cases(project["text"], project["paths"], CASES, SEED)):
        args = [stage, project["recipe"], *(x for s in sets for x in ("--set", s))]
        code = run_case([*args, "--dry-run"], keys, project["root"])
        counts["cases"] += 1
        counts[f"dry_exit_{code}"] = counts.get(f"dry_exit_{code}", 0) + 1
        if stage not in REAL_STAGES or rng.random() >= REAL_SHARE or _large(sets):
            continue
        # For real, on a copy of the run directory: a case that runs changes it.
        run = tmp_path / f"run{i}"
        shutil.copytree(project["run"], run, symlinks=True)
        stop = STOP_EARLY.get(stage, f"{stage}.max_steps=1")
        head = [f"run.dir={toml(str(run))}"]
        if not any(s.startswith(stop.split("=")[0] + "=") for s in sets):
            head.append(stop)
        real_args = [stage, project["recipe"], *(x for s in head + sets for x in ("--set", s))]
        watched = run if all(k != "run.dir" for k in keys) else project["root"]
        code = run_case(real_args, keys, watched)
        counts["real"] += 1
        name = "real_timeout" if code == 130 else f"real_exit_{code}"
        counts[name] = counts.get(name, 0) + 1
        shutil.rmtree(run, ignore_errors=True)
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(counts))
    assert not failures, f"{len(failures)} failures:\n" + "\n\n".join(failures)
    assert counts["cases"] == CASES


def _large(sets: list[str]) -> bool:
    """Values that would make a real run long (huge counts, thousands of characters): the
    dry run and preflight see them; a real run of them is not one optimizer step's work."""
    for item in sets:
        value = item.split("=", 1)[1]
        if len(value) > 200 or any(str(n) in value for n in (*HUGE[1:], 10**6, 4096)):
            return True
    return False


def test_the_schema_walk_reaches_every_table():
    """New fields and tables are fuzzed without a change here: the walk finds nested tables,
    [quantize]'s backends and every stage."""
    from llmctl.stages import STAGES

    keys = {key for stage in STAGES for key, *_ in stage_fields(stage, ["corpus"])}
    for key in ("run.dir", "model.tokenizer", "data.corpus.eval_fraction", "sft.lora.r",
                "bench.latency.runs", "quantize.smooth_quant_alpha", "grpo.rewards",
                "distributed.num_processes", "generate.top_p"):
        assert key in keys, key
    assert {k.split(".")[0] for k in keys} >= set(STAGES)
