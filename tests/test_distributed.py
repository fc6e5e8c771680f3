"""Several processes: DDP on CPU (gloo) against one process, strategy errors, dry-run, tracking."""

import json
from pathlib import Path

import pytest

from tests.conftest import (TINY_OPT, manifest, recipe_head, run_cli, run_llmctl, sentiment_source,
                            tiny_recipe_text)

# No dropout, so one process and two see exactly the same computation.
NO_DROPOUT = TINY_OPT.replace("init_std = 0.05", "init_std = 0.05, dropout = 0.0, attention_dropout = 0.0")
DDP = '\n[distributed]\nstrategy = "ddp"\nnum_processes = 2\n'


def losses(stage_dir: Path) -> dict[int, float]:
    history = json.loads((stage_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def same_losses(one: Path, two: Path, steps: int, rel: float, label: str) -> None:
    """Both stage directories logged a loss at every step 1..steps, equal within ``rel``."""
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    print(f"{label}: max relative loss difference vs 1 process:",
          max(abs(b[s] - a[s]) / a[s] for s in a))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rel), (step, a[step], b[step])


def pretrain_recipe(path: Path, assets, run_dir: Path, batch_size: int, extra: str = "") -> Path:
    text = tiny_recipe_text(assets, run_dir).replace(TINY_OPT, NO_DROPOUT)
    text = text.replace("batch_size = 8\nmax_steps = 30", f"batch_size = {batch_size}\nmax_steps = 8")
    text = text.replace("logging_steps = 5", "logging_steps = 1")
    path.write_text(text + extra)
    return path


@pytest.mark.slow
def test_ddp_pretrain_matches_one_process(tmp_path, assets, capsys):
    """2 processes x batch 4 (gloo) against 1 process x batch 8: the same global batch."""
    one = pretrain_recipe(tmp_path / "one.toml", assets, tmp_path / "one", batch_size=8)
    two = pretrain_recipe(tmp_path / "two.toml", assets, tmp_path / "two", batch_size=4, extra=DDP)
    code, _, err = run_cli(["pretrain", one], capsys)
    assert code == 0, err
    done = run_llmctl(["pretrain", two])  # launches itself under torchrun
    assert done.returncode == 0, done.stderr[-3000:]

    single, ddp = manifest(tmp_path / "one" / "pretrain"), manifest(tmp_path / "two" / "pretrain")
    same_losses(tmp_path / "one" / "pretrain", tmp_path / "two" / "pretrain", 8, 2e-3,
                "ddp pretrain")
    assert ddp["metrics"]["eval_loss"] == pytest.approx(single["metrics"]["eval_loss"], rel=2e-3)
    assert set(single) == set(ddp) and set(single["metrics"]) == set(ddp["metrics"])
    assert (single["metrics"]["world_size"], ddp["metrics"]["world_size"]) == (1, 2)
    assert single["metrics"]["effective_batch_size"] == ddp["metrics"]["effective_batch_size"] == 8
    assert not (tmp_path / "two" / ".partial" / "pretrain").exists()  # rank 0 published it


def sft_recipe(tmp_path: Path, assets, model, name: str, batch_size: int, extra: str = "",
               max_steps: int = 6, save_steps: int = 100) -> Path:
    """LoRA SFT of the tiny pretrained model on 96 labelled headlines, no dropout."""
    path = tmp_path / f"{name}.toml"
    head = recipe_head(tmp_path / name, name, sentiment=sentiment_source(assets, limit=96))
    path.write_text(head + f"""
[sft]
model = "{model}"
data = "sentiment"
method = "lora"
lora = {{ r = 8, alpha = 16, dropout = 0.0 }}
seq_len = 96
packing = false
completion_only_loss = true
batch_size = {batch_size}
max_steps = {max_steps}
lr = 2e-3
logging_steps = 1
save_steps = {save_steps}
eval_max_batches = 2
eval_task = false
""" + extra)
    return path


@pytest.mark.slow
def test_ddp_sft_matches_one_process(tmp_path, assets, pretrained_model, capsys):
    def recipe(name: str, batch_size: int, extra: str = "") -> Path:
        return sft_recipe(tmp_path, assets, pretrained_model, name, batch_size, extra)

    code, _, err = run_cli(["sft", recipe("one", 8)], capsys)
    assert code == 0, err
    done = run_llmctl(["sft", recipe("two", 4, DDP)])
    assert done.returncode == 0, done.stderr[-3000:]
    # Rows differ in length: each process averages its own tokens, so allow a little more.
    same_losses(tmp_path / "one" / "sft", tmp_path / "two" / "sft", 6, 2e-2, "ddp sft")
    single, ddp = manifest(tmp_path / "one" / "sft"), manifest(tmp_path / "two" / "sft")
    assert set(single["metrics"]) == set(ddp["metrics"])
    assert (tmp_path / "two" / "sft" / "adapter" / "adapter_model.safetensors").exists()


def test_fsdp_on_cpu_is_exit_2(tiny_recipe, capsys):
    """accelerate 1.16 drops the FSDP plugin on CPU (the Trainer would train DDP as "fsdp")."""
    recipe = tiny_recipe('\n[distributed]\nstrategy = "fsdp"\nnum_processes = 2\n')
    code, _, err = run_cli(["pretrain", recipe], capsys)
    assert code == 2 and err.startswith("error: distributed.strategy") and "needs CUDA" in err
    assert len(err.strip().splitlines()) == 1


def test_deepspeed_without_the_package_is_exit_2(tiny_recipe, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    recipe = tiny_recipe('\n[distributed]\nstrategy = "deepspeed"\nnum_processes = 2\n')
    code, _, err = run_cli(["pretrain", recipe], capsys)
    assert code == 2 and err.startswith("error: distributed.strategy")
    assert "pip install 'llmctl[deepspeed]'" in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_launch_command_and_strategy(tiny_recipe, capsys):
    recipe = tiny_recipe(DDP)
    code, out, _ = run_cli(["pretrain", recipe, "--dry-run", "--set", "pretrain.lr=1e-3"], capsys)
    assert code == 0
    plan = json.loads(out)["distributed"]
    assert plan["strategy"] == "ddp" and plan["num_processes"] == 2
    assert "torch.distributed.run" in plan["launch"] and "--nproc_per_node=2" in plan["launch"]
    assert "--set pretrain.lr=1e-3" in plan["launch"]
    assert plan["trainer_arguments"]["ddp_backend"] == "gloo"


def test_num_processes_without_strategy_is_exit_2(tiny_recipe, capsys):
    code, _, err = run_cli(["pretrain", tiny_recipe("\n[distributed]\nnum_processes = 2\n")], capsys)
    assert code == 2 and "distributed" in err and "strategy" in err


def test_wandb_offline_run_lands_in_stage_dir_without_secrets(tiny_recipe, tmp_path, capsys,
                                                              monkeypatch):
    pytest.importorskip("wandb")
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # llmctl points it at the stage
    monkeypatch.setenv("WANDB_NAME", "restored-after-the-test")
    code, _, err = run_cli(["pretrain", tiny_recipe(), "--set", "pretrain.report_to=wandb",
                            "--set", "pretrain.max_steps=6"], capsys)
    assert code == 0, err
    stage = tmp_path / "run" / "pretrain"
    runs = list(stage.glob("wandb/offline-run-*"))
    assert runs, sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))[:20]
    assert manifest(stage)["tracking"]["run_name"] == "tiny-pretrain"
    for path in stage.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
