"""Recipe schema: each error class names the file and the dotted key; overrides are typed."""

import json

import pytest

from llmctl.errors import UserError
from llmctl.recipe import apply_overrides, load_recipe, parse_override

BASE = """
[run]
name = "t"
seed = 3

[model]
name_or_path = "facebook/opt-125m"

[data.qa]
path = "data/qa"
template = "qa"

[sft]
data = "qa"
lora = { r = 16, alpha = 32 }
"""


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_valid_recipe_fills_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.sft.lora.r == 16 and recipe.sft.lora.dropout == 0.05
    assert recipe.run_dir.as_posix() == "runs/t"
    assert recipe.stages() == ["sft"]


@pytest.mark.parametrize("text, key, what", [
    (BASE + "bogus = 1\n", "sft.bogus", "unknown key"),
    (BASE.replace("r = 16", "r = \"16\""), "sft.lora.r", "valid integer"),
    (BASE.replace('path = "data/qa"\n', ""), "data.qa.path", "missing required key"),
    (BASE + "[pretrain]\narchitecture = \"bert\"\n", "pretrain.architecture", "'gpt2', 'opt' or 'llama'"),
    # [quantize] is one table type per backend: each backend's own fields and methods, and
    # the key path the user wrote (pydantic's location also holds the union's tag).
    (BASE + "[quantize]\nbackend = \"tensorrt\"\n", "quantize.backend",
     "unknown backend 'tensorrt' (backends: inc, torch, openvino, bnb, gguf)"),
    (BASE + "[quantize]\nbackend = \"torch\"\nmethod = \"rtn\"\n", "quantize.method",
     "'rtn' is not a method of backend \"torch\" (methods: dynamic)"),
    (BASE + "[quantize]\nmethod = \"dynamic\"\n", "quantize.method",  # inc is the default
     "use backend = \"torch\", method = \"dynamic\""),
    (BASE + "[quantize]\nbackend = \"torch\"\nsmooth_quant = true\n", "quantize.smooth_quant",
     "unknown key (not a field of 'torch')"),
    (BASE + "[quantize]\nbackend = \"torch\"\nbits = 4\n", "quantize.bits", "Input should be 8"),
    (BASE + "[quantize]\nbackend = \"openvino\"\nmethod = \"static\"\n", "quantize.bits",
     "openvino static quantization is INT8"),
    (BASE + "[quantize]\nbackend = \"bnb\"\ngroup_size = 64\n", "quantize.group_size",
     "unknown key"),
    (BASE + "[quantize]\ntolerable_loss = -0.1\n", "quantize.tolerable_loss", "greater than"),
    (BASE + "[grpo]\ndata = \"qa\"\nrewards = [{ kind = \"model\", model = 1 }]\n",
     "grpo.rewards.0.model", "valid string"),
])
def test_errors_name_file_and_key(tmp_path, text, key, what):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert what in message


def test_quantize_table_type_follows_the_backend(tmp_path):
    from llmctl.quantization.inc import IncQuantize
    from llmctl.quantization.openvino import OpenVinoQuantize
    from llmctl.quantization.torch_dynamic import TorchQuantize

    assert type(load_recipe(write(tmp_path, BASE + "[quantize]\n")).quantize) is IncQuantize
    torch_table = load_recipe(write(tmp_path, BASE + "[quantize]\nbackend = \"torch\"\n")).quantize
    assert type(torch_table) is TorchQuantize
    assert torch_table.settings() == {"backend": "torch", "method": "dynamic", "bits": 8}
    ov = load_recipe(write(tmp_path, BASE + "[quantize]\nbackend = \"openvino\"\nmethod = "
                                             "\"static\"\nbits = 8\n")).quantize
    assert type(ov) is OpenVinoQuantize and ov.smooth_quant_alpha == 0.95


def test_syntax_error_names_file(tmp_path):
    path = write(tmp_path, "[run\nname=")
    with pytest.raises(UserError, match=f"{path}: invalid TOML"):
        load_recipe(path)


def test_missing_file():
    with pytest.raises(UserError, match="nope.toml: recipe file not found"):
        load_recipe("nope.toml")


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, ["sft.lora.r=8", "sft.lr=3e-4", "run.name=trial", "sft.packing=false"])
    assert recipe.sft.lora.r == 8 and recipe.sft.lr == 3e-4
    assert recipe.run.name == "trial" and recipe.sft.packing is False
    with pytest.raises(UserError, match="sft.lora.r: Input should be a valid integer"):
        load_recipe(path, ["sft.lora.r=eight"])
    with pytest.raises(UserError, match="sft.lora.rank: unknown key"):
        load_recipe(path, ["sft.lora.rank=8"])


def test_parse_override_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override('a="x=y"') == (["a"], "x=y")
    assert parse_override("a=hello world") == (["a"], "hello world")
    with pytest.raises(UserError):
        parse_override("novalue")
    with pytest.raises(UserError, match="not a table"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_upstream_model_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.upstream_inputs("sft") == {"model": "facebook/opt-125m"}
    with_pretrain = load_recipe(write(tmp_path, BASE + "[pretrain]\ndata = \"qa\"\n"))
    assert with_pretrain.upstream_inputs("sft") == {"model": "runs/t/pretrain/model"}
    explicit = load_recipe(write(tmp_path, BASE), ["sft.model=my/model"])
    assert explicit.upstream_inputs("sft") == {"model": "my/model"}


def test_quantize_model_names_a_stage_or_a_path(tmp_path):
    """quantize.model = "dpo" is that stage's output (the adapter of a LoRA DPO), as
    bench.models names stages; a path is taken as it is; the default is the last trained model."""
    text = BASE + '[merge]\n[dpo]\ndata = "qa"\n[ppo]\ndata = "qa"\nreward_model = "r"\n[quantize]\n'
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.upstream_inputs("quantize") == {"model": "runs/t/ppo/adapter"}
    named = load_recipe(write(tmp_path, text), ['quantize.model="dpo"'])
    assert named.upstream_inputs("quantize") == {"model": "runs/t/dpo/adapter"}
    path = load_recipe(write(tmp_path, text), ['quantize.model="some/dir"'])
    assert path.upstream_inputs("quantize") == {"model": "some/dir"}


def test_bench_labels_keep_stage_names_and_tell_paths_apart(tmp_path):
    """A stage keeps its name as its label, wherever it is in the list; another run's stage
    output gets that run's name before the stage's, so a path never replaces a stage's entry."""
    text = BASE + '[quantize]\n[bench]\nmodels = ["runs/other/quantize/model", "quantize", ' \
                  '"a/b/model", "c/b/model", "c/b/model"]\n'
    models = load_recipe(write(tmp_path, text)).bench_models()
    assert list(models.items()) == [("other-quantize", "runs/other/quantize/model"),
                                    ("quantize", "runs/t/quantize/model"),
                                    ("b", "a/b/model"), ("c-b", "c/b/model"),
                                    ("c-b-2", "c/b/model")]


def test_stage_hash_tracks_config(tmp_path):
    path = write(tmp_path, BASE)
    a, b = load_recipe(path), load_recipe(path, ["sft.lr=1e-3"])
    assert a.stage_hash("sft") == load_recipe(path).stage_hash("sft")
    assert a.stage_hash("sft") != b.stage_hash("sft")


def test_unknown_data_source(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["sft.data=nope"])
    with pytest.raises(UserError, match="sft.data: no \\[data.nope\\] table"):
        recipe.data_source("sft", recipe.sft.data)


def test_repo_recipes_validate():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.toml"))
    assert recipes, "recipes/ is empty"
    for path in recipes:
        load_recipe(path)


def test_course_gpt2_sizes():
    """The course's figures: GPT2Config defaults = 124.4M params; the scaled variant = 1065.8M.

    1065.8M holds with 1024 position embeddings; with 512 it would be 1064.9M, so the course's
    "512 positions" is its training context. recipes/gpt2-1b-openwebtext.toml follows that.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from llmctl.models import count_params

    for overrides, millions in (({}, 124.4), ({"n_layer": 32, "n_embd": 1600, "n_head": 32,
                                               "n_positions": 1024}, 1065.8)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=50257, **overrides))
        assert round(count_params(model) / 1e6, 1) == millions


@pytest.mark.slow
def test_repo_recipes_dry_run(capsys, tmp_path, monkeypatch, assets, pretrained_model):
    """Every shipped recipe validates and resolves its stage inputs with `llmctl run --dry-run`;
    recipes that build on another run's outputs (`llmctl demo`, the SFT recipe a DPO recipe
    continues) do once those exist, and name what is missing before."""
    import re
    from pathlib import Path

    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)  # recipes name runs/... relative to the working directory
    recipes = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.toml"))
    # Recipes on the real artifacts need `make real` first (tests/test_real.py runs them).
    real = [p for p in recipes if ".llmctl-cache/" in p.read_text()]
    for path in real:
        code, _, err = run_cli(["run", path, "--dry-run"], capsys)
        assert code == 2 and ".llmctl-cache/" in err and "does not exist" in err, (path, err)
    recipes = [p for p in recipes if p not in real]
    upstream = {p: set(re.findall(r'"(runs/[^"]+)"', p.read_text())) for p in recipes}
    assert upstream[Path(__file__).parents[1] / "recipes" / "demo-dpo.toml"]
    for path, needed in upstream.items():
        if needed:
            code, _, err = run_cli(["run", path, "--dry-run"], capsys)
            assert code == 2 and "does not exist" in err and \
                any(n in err for n in needed), (path, err)
    # What those runs would have left: demo assets, and finished stages with a model.
    for needed in set().union(*upstream.values()):
        target = tmp_path / needed
        if target.exists():
            continue
        if needed.startswith("runs/demo/assets/"):
            (tmp_path / "runs/demo").mkdir(parents=True, exist_ok=True)
            (tmp_path / "runs/demo/assets").symlink_to(Path(assets["corpus"]).parent)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(pretrained_model)
        (target.parent / "manifest.json").write_text(
            json.dumps({"stage": target.parent.name, "status": "complete"}))
    for path in recipes:
        code, out, err = run_cli(["run", path, "--dry-run"], capsys)
        assert code == 0, f"{path}: {err}"
        assert json.loads(out)["stages"], path


def test_course_lora_trainable_count():
    """OPT-1.3B with LoRA r=16 on the default targets: 3,145,728 of 1,318,903,808 (0.2385%)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, OPTConfig

    from llmctl.models import count_params
    from llmctl.schema import LoraConfig
    from llmctl.models import lora_config

    config = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                       num_attention_heads=32, word_embed_proj_dim=2048, vocab_size=50272)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               lora_config(LoraConfig(), AutoModelForCausalLM.from_config(config), "sft.lora"))
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    assert (trainable, total) == (3_145_728, 1_318_903_808)
    assert round(100 * trainable / total, 4) == 0.2385


def test_make_real_trains_in_fp32_where_bf16_would_be_emulated(monkeypatch):
    """`make real` (llmctl.real --run) keeps the recipe's bf16 on a CPU that has it and sets
    the training stages to fp32 on one that would emulate it ~100x slower."""
    from pathlib import Path

    import llmctl.models
    from llmctl.real import precision_overrides

    recipe_path = Path(__file__).parents[1] / "recipes" / "smollm2-135m-tweets-cpu.toml"
    monkeypatch.setattr(llmctl.models, "cpu_has_native_bf16", lambda: True)
    assert precision_overrides(recipe_path) == []
    monkeypatch.setattr(llmctl.models, "cpu_has_native_bf16", lambda: False)
    overrides = precision_overrides(recipe_path)
    sets = [arg for flag, arg in zip(overrides[::2], overrides[1::2]) if flag == "--set"]
    as_written, overridden = load_recipe(recipe_path), load_recipe(recipe_path, sets)
    in_bf16 = [stage for stage in ("sft", "reward", "ppo", "dpo", "grpo")
               if getattr(getattr(as_written, stage, None), "precision", None) == "bf16"]
    assert {"sft", "reward", "ppo", "dpo"} <= set(in_bf16)
    assert all(getattr(overridden, stage).precision == "fp32" for stage in in_bf16)


def test_make_real_refuses_unknown_arguments_before_any_work():
    from pathlib import Path

    from llmctl.real import main

    for argv in (["--rnu", "r.toml"], ["--run"], ["r.toml"]):
        with pytest.raises(UserError, match=r"python -m llmctl.real \[--run RECIPE\.\.\.\]"):
            main(argv)
    # Every recipe is read before the first runs: a bad last one fails in a second.
    with pytest.raises(UserError, match="nope.toml"):
        main(["--run", str(Path(__file__).parents[1] / "recipes" / "smollm2-135m-tweets-cpu.toml"),
              "nope.toml"])
