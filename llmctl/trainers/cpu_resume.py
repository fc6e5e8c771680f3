"""Resume a multi-process CPU run: the HF Trainer loads the optimizer state with
``map_location=args.device``, which under torchrun on CPU is ``cpu:0`` (transformers 5.5.4),
and torch.load knows only ``cpu``: "don't know how to restore data location of
torch.storage.UntypedStorage (tagged with cpu:0)". Every DDP / ZeRO resume on CPU failed so."""

from __future__ import annotations

import torch

_registered = False


def _cpu_with_index(storage, location: str):
    """torch.load's deserializer for ``cpu:N``: CPU memory has no index; None: not ours."""
    if location.startswith("cpu:") and location[4:].isdigit():
        return storage
    return None


def accept_indexed_cpu() -> None:
    """Teach torch.load the ``cpu:N`` location (idempotent; saving is unchanged)."""
    global _registered
    if not _registered:
        torch.serialization.register_package(11, lambda storage: None, _cpu_with_index)
        _registered = True  # priority 11: right after torch's own cpu (10); unique
