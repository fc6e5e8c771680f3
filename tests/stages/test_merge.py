"""`llmctl merge`: merged logits equal base+adapter; the merged model loads anywhere; errors."""

import json
import shutil

import pytest
import torch

from tests.conftest import manifest, run_cli
from tests.stages.test_sft import sft_recipe


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, assets, pretrained_model):
    """A recipe whose sft stage has finished (LoRA adapter on the tiny pretrained model)."""
    from llmctl.pipeline import run_stage
    from llmctl.recipe import load_recipe

    root = tmp_path_factory.mktemp("merge")
    recipe = sft_recipe(root, assets, pretrained_model)
    run_stage(load_recipe(recipe), "sft")
    return recipe


def test_merge_round_trip(sft_run, capsys):
    run_dir = sft_run.parent / "run"
    code, _, err = run_cli(["merge", sft_run], capsys)
    assert code == 0, err
    m = manifest(run_dir / "merge")
    assert m["metrics"]["max_abs_logit_diff"] <= 1e-3
    assert m["inputs"]["adapter"] == "$RUN/sft/adapter"  # portable: relative to the run dir
    merged_dir = run_dir / "merge" / "model"
    assert (merged_dir / "model.safetensors").exists()
    assert not (merged_dir / "adapter_config.json").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(merged_dir)
    adapter_dir = run_dir / "sft" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(json.loads(
        (adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    batch = tok(["Shares plunged after the company posted a loss."], return_tensors="pt",
                return_token_type_ids=False)
    with torch.no_grad():
        diff = (merged(**batch).logits - with_adapter(**batch).logits).abs().max().item()
    assert diff < 1e-4
    # and the adapter really changed the model: merged differs from the bare base
    with torch.no_grad(), with_adapter.disable_adapter():
        assert (merged(**batch).logits - with_adapter(**batch).logits).abs().max().item() > 1e-3
    generator = pipeline("text-generation", model=str(merged_dir), tokenizer=str(merged_dir))
    out = generator("The function", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("The function")

    # generate's default model is now the merged one
    code, out, err = run_cli(["generate", sft_run, "-p", json.dumps(
        {"instruction": "Sentiment?", "input": "Profit rose."}), "--json"], capsys)
    assert code == 0, err
    assert manifest(run_dir / "generate")["inputs"]["model"] == "$RUN/merge/model"


def test_merge_rejects_what_is_not_an_adapter(sft_run, capsys, tmp_path):
    code, _, err = run_cli(["merge", sft_run, "--run-dir", tmp_path / "elsewhere",
                            "--set", f"merge.adapter=\"{tmp_path}/nothing/adapter\""], capsys)
    assert code == 2 and "merge.adapter:" in err and "does not exist" in err
    not_adapter = tmp_path / "plain"
    not_adapter.mkdir()
    code, _, err = run_cli(["merge", sft_run, "--run-dir", tmp_path / "elsewhere",
                            "--set", f"merge.adapter=\"{not_adapter}\""], capsys)
    assert code == 2 and "is not a LoRA adapter directory" in err


def test_adapter_without_base_is_exit_2(sft_run, capsys, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_run.parent / "run" / "sft" / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base" / "model")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["merge", sft_run, "--run-dir", tmp_path / "elsewhere",
                            "--set", f"merge.adapter=\"{adapter}\""], capsys)
    assert code == 2 and "base_model_name_or_path" in err and "does not exist" in err
    # nor does generate load it
    code, _, err = run_cli(["generate", sft_run, "-p", "x", "--run-dir", tmp_path / "elsewhere",
                            "--set", f"generate.model=\"{adapter}\""], capsys)
    assert code == 2 and "does not exist" in err


def test_merge_outside_tolerance_fails_and_saves_nothing(sft_run, capsys, tmp_path):
    code, _, err = run_cli(["merge", sft_run, "--run-dir", tmp_path / "strict",
                            "--set", "merge.adapter=\"" + str(sft_run.parent / "run" / "sft" / "adapter") + "\"",
                            "--set", "merge.tolerance=1e-12"], capsys)
    assert code == 1 and "nothing was saved" in err
    assert not (tmp_path / "strict" / "merge").exists()
