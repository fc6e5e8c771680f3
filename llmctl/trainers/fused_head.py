"""trl's fused LM head, on CPU too, only where a label is.

trl (1.13+) computes SFT's and DPO's per-token log-probabilities with a fused LM head that
projects only the positions whose next-token label is not -100, but only on Triton devices
(CUDA, XPU): elsewhere it scores every position, so that Neuron's compiled tile shapes stay
fixed. A CPU compiles nothing, and llmctl's label tasks train on a few answer tokens per
90-token chat prompt, so there the head over every position of a 49k vocabulary is most of
the work thrown away. This makes trl take its own compact path on CPU: the same loss, the
same gradients and the same logged metrics (tests/test_training.py).
"""

from __future__ import annotations

import torch

_patched = False


def compact_on_cpu() -> None:
    """Let trl's fused head project only labelled positions on CPU (idempotent)."""
    global _patched
    if _patched:
        return
    from trl.trainer import utils

    triton_device = utils._use_triton  # decides the layout only; the kernels check for themselves

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or triton_device(device)

    utils._use_triton = compact
    _patched = True
