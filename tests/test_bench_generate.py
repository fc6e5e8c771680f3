"""scripts/bench_generate.py's memory check: the variants it would hold at once are estimated
before anything is built, and a set that does not fit is exit 2 with the estimate (all 15
variants at the OPT-1.3B shape were killed by the out-of-memory killer on a 24 GB machine)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_generate.py"
GB24 = 24 * 10**9


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weights_are_counted_without_building(bench):
    layers, head, total = bench.weight_counts("opt-1.3b")
    assert 1.30e9 < total < 1.33e9  # facebook/opt-1.3b: 1.3B parameters, 5.3 GB in fp32
    assert head == 50272 * 2048 and layers == 24 * (4 * 2048 * 2048 + 2 * 2048 * 8192)


def test_all_variants_at_1_3b_exceed_24_gb_and_the_default_fits(bench):
    assert bench.memory_estimate(list(bench.VARIANTS), "opt-1.3b") > GB24
    assert bench.memory_estimate(bench.DEFAULT_1_3B, "opt-1.3b") < GB24 * 0.85
    fp32 = bench.weight_counts("opt-1.3b")[2] * 4.0
    assert bench.memory_estimate(["fp32 eager"], "opt-1.3b") == fp32
    assert bench.memory_estimate(["fp32 eager", "bf16 eager"], "opt-1.3b") == fp32 * 1.5
    # torch INT8 quantizes a copy of the fp32 model: both are held while it is built
    assert bench.memory_estimate(["fp32 eager", "torch dynamic int8"], "opt-1.3b") == fp32 * 2


def test_a_set_that_does_not_fit_is_exit_2_with_the_estimate(bench, capsys):
    variants = list(bench.VARIANTS)
    need = bench.memory_estimate(variants, "opt-1.3b")
    with pytest.raises(SystemExit) as exit_:
        bench.check_memory(variants, "opt-1.3b", available=need * 0.9)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --variants:") and f"{need / 2**30:.1f} GiB" in err
    bench.check_memory(variants, "opt-1.3b", available=need * 1.1)  # fits: no exit


@pytest.mark.slow
def test_the_script_refuses_before_building(bench, tmp_path):
    """The real script on this machine's memory: all variants at 1.3B refused in seconds."""
    if bench.available_memory() > bench.memory_estimate(list(bench.VARIANTS), "opt-1.3b"):
        pytest.skip("this machine has the memory for every variant: the script would build them")
    result = subprocess.run([sys.executable, str(SCRIPT), "--shape", "opt-1.3b", "--no-quality",
                             "--variants", *bench.VARIANTS], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --variants:")
    assert "built" not in result.stdout and "bandwidth" not in result.stdout
