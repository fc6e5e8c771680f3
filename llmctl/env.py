"""Process-wide settings applied before heavy imports: keep library chatter out of the terminal."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Advisory warnings and optional-kernel notices are noise for users; --debug keeps them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    # torchao (imported by peft) reports optional CUDA kernels it cannot load on CPU machines.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
