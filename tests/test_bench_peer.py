"""scripts/bench_peer.py's batch-1 rounds: the runtimes' order alternates between rounds, and a
ratio is the median of each round's own ratio, so the machine's drift between rounds (+-20% a
minute on the 2-core boxes) cancels instead of landing on one side."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_peer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_order_alternates_between_rounds(bench):
    names = ["openvino int8", "openvino int4", "gguf q8_0", "gguf q4_0"]
    assert bench.round_order(names, 0) == names
    assert bench.round_order(names, 1) == names[::-1]
    assert bench.round_order(names, 2) == names
    assert names == ["openvino int8", "openvino int4", "gguf q8_0", "gguf q4_0"]  # not mutated


def test_a_paired_ratio_cancels_drift_between_rounds(bench):
    # the machine slows 2x in round 2 and 3x in round 3; llmctl is 1.3x faster in each round
    ours = [1.0, 2.0, 3.0]
    theirs = [1.3, 2.6, 3.9]
    ratio = bench.paired_ratio(ours, theirs)
    assert ratio["median"] == pytest.approx(1.3)
    assert ratio["min"] == pytest.approx(1.3) and ratio["max"] == pytest.approx(1.3)
    assert ratio["rounds"] == 3
    # one round in which llama.cpp hit a slow spell moves the range, not the median
    ratio = bench.paired_ratio([1.0, 1.0, 1.0], [1.3, 1.3, 2.6])
    assert ratio["median"] == pytest.approx(1.3) and ratio["max"] == pytest.approx(2.6)
