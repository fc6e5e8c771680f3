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


def _dpo_step(tiny_lm, tmp_path, name):
    """Loss, LoRA gradients and logged metrics of one DPO batch on the tiny model."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from llmctl.models import load_tokenizer

    rows = [{"prompt": "Profit fell as costs climbed. Sentiment:", "chosen": " negative",
             "rejected": " positive"},
            {"prompt": "Shares of the bank rose after strong results. Sentiment:",
             "chosen": " positive", "rejected": " neutral"},
            {"prompt": "The function returns the value of the key. Sentiment:",
             "chosen": " neutral", "rejected": " negative or positive"}]
    args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=3,
                     max_length=64, report_to=[], use_cpu=True, logging_steps=1, beta=0.1)
    torch.manual_seed(0)  # the same LoRA initialisation in both runs
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_lm)), args=args,
                         processing_class=load_tokenizer(str(tiny_lm)),
                         train_dataset=Dataset.from_list(rows),
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"]))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def test_compact_fused_head_on_cpu_changes_no_number(tiny_lm, tmp_path, monkeypatch):
    """trl's fused LM head on CPU, projecting only labelled positions: the same DPO loss,
    LoRA gradients and metrics as trl's own every-position layout."""
    import pytest
    import torch
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    from llmctl.trainers import fused_head

    monkeypatch.setattr(fused_head, "_patched", False)
    monkeypatch.setattr(utils, "_use_triton", chunked_logprob._use_triton)  # trl's own
    assert not utils._use_triton(torch.device("cpu"))
    loss, grads, metrics = _dpo_step(tiny_lm, tmp_path, "every-position")
    fused_head.compact_on_cpu()
    assert utils._use_triton(torch.device("cpu"))
    loss2, grads2, metrics2 = _dpo_step(tiny_lm, tmp_path, "compact")
    torch.testing.assert_close(loss2, loss)
    assert grads2.keys() == grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], msg=name)
    assert metrics2.keys() == metrics.keys()
    for key in metrics:
        assert metrics2[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
