"""llmctl.training: what every Trainer-based stage shares."""

import os
import types

from llmctl.recipe import validate
from llmctl.schema import TrainConfig


def test_precision_does_not_leak_from_one_stage_to_the_next(tmp_path, monkeypatch):
    """TrainingArguments stores its precision in os.environ and reads it back as the next
    one's default: a bf16 stage made every later fp32 stage of the same process (and the
    processes it starts: the demo under pytest ran 10x slower on a CPU without bf16) train in
    bf16. Each stage's own `precision` must decide."""
    from llmctl.training import training_args

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    recipe = validate({"run": {"name": "t"}})
    stage = types.SimpleNamespace(stage="sft", work_dir=tmp_path, checkpoint_dir=tmp_path / "c",
                                  tracking={})
    bf16 = training_args(TrainConfig(data="d", precision="bf16"), stage, recipe)
    assert bf16.bf16 and os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    fp32 = training_args(TrainConfig(data="d", precision="fp32"), stage, recipe)
    assert not fp32.bf16 and os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
