"""`llmctl sft`: LoRA, full and packing paths; qlora refused on CPU; resume; bad inputs."""

import json
from pathlib import Path

import pytest

from tests.conftest import kill_when, manifest, recipe_head, run_cli, sentiment_source


def sft_recipe(tmp_path, assets, pretrained_model, extra=""):
    path = tmp_path / "sft.toml"
    head = recipe_head(tmp_path / "run", "sft", sentiment=sentiment_source(assets, limit=120))
    path.write_text(head + f"""
[sft]
model = "{pretrained_model}"
data = "sentiment"
method = "lora"
lora = {{ r = 8, alpha = 16, dropout = 0.0 }}
seq_len = 64
batch_size = 8
max_steps = 16
lr = 2e-2
completion_only_loss = true
logging_steps = 2
save_steps = 4
eval_batch_size = 8

[merge]

[generate]
template = "sentiment"
max_new_tokens = 3
{extra}
""")
    return path


SFT_METRICS = ("trainable_params", "all_params", "trainable_percent", "train_loss_first",
               "train_loss_last", "eval_loss", "eval_task_accuracy_before", "eval_task_accuracy_after")


def test_lora_sft_trains_adapter(tmp_path, assets, pretrained_model, capsys):
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["sft", recipe], capsys)
    assert code == 0, err
    m = manifest(tmp_path / "run" / "sft")
    for key in SFT_METRICS:
        assert isinstance(m["metrics"][key], (int, float)), key
    metrics = m["metrics"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5
    # LoRA r=8 on q_proj/v_proj of 2 layers of width 64: 2 * 2 * (64*8 + 8*64) = 4,096
    assert metrics["trainable_params"] == 4096
    assert metrics["trainable_percent"] == pytest.approx(100 * 4096 / metrics["all_params"])
    adapter = tmp_path / "run" / "sft" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 8
    assert (adapter / "adapter_model.safetensors").exists()
    assert config["base_model_name_or_path"] == str(Path(pretrained_model).resolve())
    assert "trainable params: 4,096" in err

    # the adapter loads in `llmctl generate` on its base
    prompt = json.dumps({"instruction": "What is the sentiment?", "input": "Shares surged."})
    code, out, err = run_cli(["generate", recipe, "-p", prompt, "--json",
                              "--set", f"generate.model=\"{adapter}\""], capsys)
    assert code == 0, err
    assert len(json.loads(out)["completions"]) == 1


def test_full_sft_without_packing(tmp_path, assets, pretrained_model, capsys):
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["sft", recipe, "--set", "sft.method=full", "--set", "sft.packing=false",
                            "--set", "sft.lr=1e-3"], capsys)
    assert code == 0, err
    m = manifest(tmp_path / "run" / "sft")
    assert m["outputs"]["model"] == "model"
    assert m["metrics"]["trainable_params"] == m["metrics"]["all_params"]
    assert (tmp_path / "run" / "sft" / "model" / "model.safetensors").exists()


def test_qlora_refused_on_cpu(tmp_path, assets, pretrained_model, capsys):
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["sft", recipe, "--set", "sft.method=qlora"], capsys)
    assert code == 2 and "qlora" in err and "CUDA" in err
    assert not (tmp_path / "run").exists()


def test_bad_target_module(tmp_path, assets, pretrained_model, capsys):
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["sft", recipe, "--set", "sft.lora.target_modules=[\"c_attn\"]"], capsys)
    assert code == 2
    assert "sft.lora.target_modules: no module 'c_attn'" in err and "q_proj" in err


def test_prompts_longer_than_seq_len(tmp_path, assets, pretrained_model, capsys):
    """trl drops a row whose prompt fills max_length; all of them dropped is the recipe's error."""
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    code, out, err = run_cli(["sft", recipe, "--set", "sft.seq_len=8", "--set", "sft.packing=false"],
                             capsys)
    assert code == 2, out[-3000:] + err
    assert "error: " in err and "sft.seq_len: every data.sentiment training row's prompt fills 8 tokens" in err
    assert not (tmp_path / "run" / "sft" / "manifest.json").exists()


def test_missing_template_field(tmp_path, assets, pretrained_model, capsys):
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["sft", recipe, "--set", "data.sentiment.template=\"qa\""], capsys)
    assert code == 2 and "no column 'question'" in err and "instruction, input, output" in err


@pytest.mark.slow
def test_sft_resumes_after_kill(tmp_path, assets, pretrained_model, capsys):
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    args = ["sft", recipe, "--set", "sft.max_steps=40", "--set", "sft.save_steps=5",
            "--set", "sft.batch_size=16"]
    ckpts = tmp_path / "run" / ".partial" / "sft" / "checkpoints"
    kill_when(args, lambda: (ckpts / "checkpoint-10" / "trainer_state.json").exists())
    assert not (tmp_path / "run" / "sft").exists()
    code, _, err = run_cli(args, capsys)  # in-process: the state it resumes from is on disk
    assert code == 0, err
    assert "resuming from" in err
    assert manifest(tmp_path / "run" / "sft")["metrics"]["global_step"] == 40


def test_cpu_bf16_with_the_course_switches(tmp_path, assets, pretrained_model, capsys):
    """The course's Xeon recipe: bf16 autocast (AMX), bf16 weights with 1-D params and the LM
    head output in fp32, gradient checkpointing with input-require-grads for the adapter."""
    recipe = sft_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["sft", recipe, "--set", "sft.precision=\"bf16\"",
                            "--set", "sft.load_in_bf16=true", "--set", "sft.fp32_norms_and_head=true",
                            "--set", "sft.gradient_checkpointing=true", "--set", "sft.max_steps=6"],
                           capsys)
    assert code == 0, err
    m = manifest(tmp_path / "run" / "sft")["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
