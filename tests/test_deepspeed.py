"""DeepSpeed ZeRO-2 with DeepSpeed's CPU accelerator (gloo): two processes against one, where
deepspeed is installed (pip install 'llmctl[deepspeed]'; CI does not install it)."""

import importlib.util

import pytest

from tests.conftest import run_cli, run_llmctl
from tests.test_distributed import pretrain_recipe, same_losses

ZERO2 = '\n[distributed]\nstrategy = "deepspeed"\nzero_stage = 2\nnum_processes = 2\n'


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / next(p.name for p in folder.glob("*.safetensors"))))


def max_weight_difference(a: dict, b: dict) -> float:
    shared = set(a) & set(b)  # a tied lm_head may be saved by one and not the other
    assert len(shared) >= len(a) - 1
    return max((a[k].float() - b[k].float()).abs().max().item() for k in shared)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="needs deepspeed (pip install 'llmctl[deepspeed]')")
def test_deepspeed_zero2_pretrain_matches_one_process(tmp_path, assets, capsys):
    one = pretrain_recipe(tmp_path / "one.toml", assets, tmp_path / "one", batch_size=8)
    two = pretrain_recipe(tmp_path / "two.toml", assets, tmp_path / "two", batch_size=4,
                          extra=ZERO2)
    code, _, err = run_cli(["pretrain", one], capsys)
    assert code == 0, err
    done = run_llmctl(["pretrain", two, "--debug"])
    assert done.returncode == 0, done.stderr[-3000:]
    same_losses(tmp_path / "one" / "pretrain", tmp_path / "two" / "pretrain", 8, 1e-5,
                "zero-2 pretrain")
    diff = max_weight_difference(weights(tmp_path / "one" / "pretrain" / "model"),
                                 weights(tmp_path / "two" / "pretrain" / "model"))
    assert diff < 1e-3
