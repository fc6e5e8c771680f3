"""llmctl's DPO trainer applies the LM head only where trl's DPO loss reads it: the same loss,
gradients and logged metrics as trl's own DPOTrainer, from a head that skipped the rest."""

import pytest
import torch


def _trainer(trainer_cls, tiny_lm, tmp_path, name):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from llmctl.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_lm))
    rows = [{"prompt": "Profit fell as costs climbed. Sentiment:", "chosen": " negative",
             "rejected": " positive"},
            {"prompt": "Shares of the bank rose after strong results. Sentiment:",
             "chosen": " positive", "rejected": " neutral"},
            {"prompt": "The function returns the value of the key. Sentiment:",
             "chosen": " neutral", "rejected": " negative"},
            {"prompt": "The quick brown fox jumps. Sentiment:", "chosen": " neutral",
             "rejected": " positive or negative"}]
    args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4,
                     max_length=64, report_to=[], use_cpu=True, logging_steps=1, beta=0.1)
    torch.manual_seed(0)  # the same LoRA initialisation in both trainers
    return trainer_cls(model=AutoModelForCausalLM.from_pretrained(str(tiny_lm)), args=args,
                       processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                       peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                              target_modules=["q_proj", "v_proj"]))


def _step(trainer):
    """Loss, LoRA gradients and logged metrics of one training batch, head outputs seen."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model.train()
    head = model.get_output_embeddings()
    outputs = []
    hook = head.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    torch.manual_seed(1)  # the same dropout masks
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, outputs, batch, head


def test_same_loss_gradients_and_metrics_as_trl(tiny_lm, tmp_path):
    from trl import DPOTrainer

    from llmctl.trainers.dpo import CompletionHeadDPOTrainer

    loss, grads, metrics, _, _, _ = _step(_trainer(DPOTrainer, tiny_lm, tmp_path, "trl"))
    ours = _trainer(CompletionHeadDPOTrainer, tiny_lm, tmp_path, "llmctl")
    loss2, grads2, metrics2, outputs, batch, head = _step(ours)

    torch.testing.assert_close(loss2, loss)
    assert grads2.keys() == grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], msg=name)
    assert metrics2.keys() == metrics.keys()
    for key in metrics:
        assert metrics2[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key

    # The head ran on the completion-predicting positions only (policy and reference), and
    # was restored afterwards.
    wanted = torch.zeros_like(batch["completion_mask"], dtype=torch.bool)
    wanted[:, :-1] = batch["completion_mask"][:, 1:].bool()
    assert len(outputs) == 2 and 0 < wanted.sum() < wanted.numel() / 3
    for logits in outputs:
        assert logits[~wanted].abs().sum() == 0 and (logits[wanted].abs().sum(-1) > 0).all()
    assert "forward" not in head.__dict__


def test_rpo_adds_the_chosen_nll_to_the_loss(tmp_path):
    """dpo.rpo_alpha: trl's sft loss (the chosen answers' NLL) joins the recipe's, so weighted."""
    from trl import DPOConfig

    from llmctl.schema import DpoConfig
    from llmctl.stages.dpo import dpo_loss

    assert dpo_loss(DpoConfig(data="p")) == {"loss_type": ["sigmoid"]}
    rpo = dpo_loss(DpoConfig(data="p", loss_type="ipo", rpo_alpha=0.5))
    assert rpo == {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5]}
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **rpo)
    assert args.loss_type == ["ipo", "sft"] and args.loss_weights == [1.0, 0.5]
