"""Scoring a causal LM on a labelled split by comparing label log-likelihoods.

For each row the model sees the template's prompt and every candidate label (the distinct values
of the response field in the split); the prediction is the label with the highest total
log-likelihood, as lm-evaluation-harness scores multiple-choice tasks. Used for the before/after
evidence of `llmctl sft`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from llmctl.data import Template

MAX_LABELS = 20  # above this the response field is free text, not a label


def autocast_for(model):
    """Mixed bf16/fp16 models (the course's bf16 weights with fp32 norms) need autocast to run a
    forward pass outside the Trainer; fp32 models run as they are."""
    low = [p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    if not low:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=low[0])


def candidate_labels(rows: list[dict[str, Any]], template: Template) -> list[str] | None:
    labels = sorted({str(r[template.response_field]) for r in rows})
    return labels if 1 < len(labels) <= MAX_LABELS else None


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """Sum of log p(continuation tokens | context) for each continuation, in one batch."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    seqs, starts = [], []
    for cont in continuations:
        full = tokenizer(context + cont, add_special_tokens=False)["input_ids"]
        # BPE merges across the boundary rarely; find the longest shared prefix to be safe.
        start = 0
        while start < min(len(ctx_ids), len(full)) and ctx_ids[start] == full[start]:
            start += 1
        seqs.append(full)
        starts.append(max(start, 1))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    scores = []
    for i, s in enumerate(seqs):
        targets = torch.tensor(s[starts[i]:])
        positions = torch.arange(starts[i] - 1, len(s) - 1)
        scores.append(float(logprobs[i, positions, targets].sum()))
    return scores


def label_accuracy(model, tokenizer, rows: list[dict[str, Any]], template: Template,
                   labels: list[str]) -> float:
    """Fraction of rows whose true label gets the highest log-likelihood after the prompt."""
    was_training = model.training
    model.eval()
    correct = 0
    with autocast_for(model):
        for row in rows:
            correct += _predict(model, tokenizer, row, template, labels) == str(
                row[template.response_field])
    if was_training:
        model.train()
    return correct / len(rows)


def _predict(model, tokenizer, row: dict[str, Any], template: Template, labels: list[str]) -> str:
    """The label with the highest log-likelihood after the row's prompt."""
    # Template.split moves the space before the label into the label, as tokenized in training.
    context, _ = template.split(row)
    gap = template.prompt(row)[len(context):]
    scores = continuation_logprobs(model, tokenizer, context, [gap + lab for lab in labels])
    return labels[max(range(len(labels)), key=scores.__getitem__)]


@torch.inference_mode()
def reward_scores(model, tokenizer, texts: list[str], max_length: int = 512,
                  batch_size: int = 16) -> list[float]:
    """The scalar a one-label sequence classifier gives each text, with its own tokenizer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    drop_token_types = not accepts_argument(model, "token_type_ids")
    scores: list[float] = []
    with autocast_for(model):
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            if drop_token_types:
                batch.pop("token_type_ids", None)
            scores += model(**batch).logits.float().squeeze(-1).tolist()
    if was_training:
        model.train()
    return scores


def accepts_argument(model, name: str) -> bool:
    """Whether the model's forward() takes ``name`` (encoders and decoders differ)."""
    return name in inspect.signature(model.forward).parameters


def preference_accuracy(model, tokenizer, rows: list[dict[str, Any]], max_length: int
                        ) -> tuple[float, float]:
    """(fraction of pairs whose chosen text outscores the rejected one, mean margin)."""
    prompt = [str(r.get("prompt", "")) for r in rows]
    chosen = reward_scores(model, tokenizer, [p + str(r["chosen"]) for p, r in zip(prompt, rows)],
                           max_length)
    rejected = reward_scores(model, tokenizer,
                             [p + str(r["rejected"]) for p, r in zip(prompt, rows)], max_length)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)
