"""`llmctl pretrain`: trains (loss falls), writes its manifest, resumes after SIGKILL."""

import math

import pytest

from tests.conftest import kill_when, manifest, run_cli

PRETRAIN_METRICS = ("num_params", "train_loss_first", "train_loss_last", "eval_loss",
                    "eval_perplexity", "tokens_per_second")


def test_pretrain_lowers_loss_and_writes_manifest(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    code, out, err = run_cli(["pretrain", recipe], capsys)
    assert code == 0, err
    stage_dir = tmp_path / "run" / "pretrain"
    m = manifest(stage_dir)
    assert m["status"] == "complete" and m["stage"] == "pretrain"
    metrics = m["metrics"]
    for key in PRETRAIN_METRICS:
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), key
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 1.0
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["global_step"] == 30
    assert "parameters" in err  # the parameter count is printed
    assert (stage_dir / "loss_curve.png").stat().st_size > 1000
    assert (stage_dir / "model" / "model.safetensors").exists()
    assert not list((stage_dir / "model").glob("*.bin"))
    assert not (tmp_path / "run" / ".partial" / "pretrain").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stage_dir / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["num_params"]
    AutoTokenizer.from_pretrained(stage_dir / "model")


def test_pretrain_epochs_become_steps(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    code, _, err = run_cli(["pretrain", recipe, "--set", "pretrain.max_steps=-1",
                            "--set", "pretrain.epochs=0.5", "--set", "data.corpus.limit=200"], capsys)
    assert code == 0, err
    from llmctl.data import Template, TokenBlocks, open_split
    from llmctl.models import load_tokenizer
    from llmctl.recipe import load_recipe

    r = load_recipe(recipe, ["data.corpus.limit=200"])
    split = open_split(r.data["corpus"], ["text"], "train", "data.corpus")
    blocks = TokenBlocks(split, Template.get("text"), load_tokenizer(r.model.tokenizer), 64).count()
    assert manifest(tmp_path / "run" / "pretrain")["metrics"]["global_step"] == math.ceil(0.5 * blocks / 8)


@pytest.mark.slow
def test_kill_and_resume(tiny_recipe, tmp_path, capsys):
    """SIGKILL mid-training leaves nothing finished-looking; the rerun resumes to the same step."""
    args = ["pretrain", tiny_recipe(), "--set", "pretrain.max_steps=60",
            "--set", "pretrain.save_steps=10"]
    run_dir = tmp_path / "run"
    ckpts = run_dir / ".partial" / "pretrain" / "checkpoints"
    kill_when(args, lambda: (ckpts / "checkpoint-20" / "trainer_state.json").exists())
    assert not (run_dir / "pretrain").exists()
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*"))
    assert done and done[-1] < 60

    code, _, err = run_cli(args, capsys)  # in-process: the state it resumes from is on disk
    assert code == 0, err
    assert "resuming from" in err
    m = manifest(run_dir / "pretrain")
    assert m["metrics"]["global_step"] == 60
    # The resumed run's loss at the end matches an uninterrupted run of the same recipe.
    code, _, err = run_cli(args + ["--run-dir", tmp_path / "clean"], capsys)
    assert code == 0, err
    clean_loss = manifest(tmp_path / "clean" / "pretrain")["metrics"]["train_loss_last"]
    assert m["metrics"]["train_loss_last"] == pytest.approx(clean_loss, rel=1e-3)


def test_pretrain_bad_config_key(tiny_recipe, capsys):
    code, _, err = run_cli(["pretrain", tiny_recipe(), "--set", "pretrain.config.n_layers=2"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].endswith(
        "recipe.toml: pretrain.config.n_layers: not a field of OPTConfig")


def test_pretrain_seq_len_beyond_positions(tiny_recipe, capsys):
    code, _, err = run_cli(["pretrain", tiny_recipe(), "--set", "pretrain.seq_len=512"], capsys)
    assert code == 2 and "pretrain.seq_len: 512 exceeds the model's 128 positions" in err
