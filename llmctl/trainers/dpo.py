"""trl's DPOTrainer, with the LM head applied only where the loss reads its output."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from trl import DPOTrainer


class CompletionHeadDPOTrainer(DPOTrainer):
    """DPO's loss and logged metrics read the logits at the positions that predict a completion
    token and nowhere else (trl masks every other position out), yet the model applies its LM
    head to every position, in the policy's forward and backward and the reference's forward.
    With short answers (a sentiment label: 3 of about 90 tokens a row) and a 49k vocabulary
    that head is most of the work it does not need. Here the head runs on the completion
    positions only and the rest of the logits are zeros, so the loss, its gradient and every
    metric are the same numbers (tests/test_dpo_head.py) for less of the step."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Logits at position t predict token t + 1: the loss reads t where t + 1 is completion.
        mask = inputs["completion_mask"].bool()
        wanted = torch.zeros_like(mask)
        wanted[:, :-1] = mask[:, 1:]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with head_only_at(head, wanted):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@contextmanager
def head_only_at(head: torch.nn.Module, wanted: torch.Tensor):
    """While inside, ``head`` given batch x length x hidden states computes the rows ``wanted``
    (batch x length, bool) marks and returns zeros elsewhere; other inputs go through as usual."""
    full, own = head.forward, head.__dict__.get("forward")  # own: an instance's patched forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != wanted.shape:
            return full(hidden)
        picked = full(hidden[wanted])
        logits = picked.new_zeros(*wanted.shape, picked.shape[-1])
        logits[wanted] = picked
        return logits

    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward  # the class's forward again
        else:
            head.forward = own
