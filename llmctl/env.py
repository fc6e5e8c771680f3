"""Process-wide settings applied before heavy imports: keep library chatter out of the terminal."""

from __future__ import annotations

import logging
import os
import warnings


_quiet = False


def quiet_libraries() -> None:
    """Advisory warnings and optional-kernel notices are noise for users; --debug keeps them."""
    global _quiet
    _quiet = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # llmctl shows its own progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers 5's load/save bars
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' stray bars (GGUF conversion, lm-eval)
    # torchao (imported by peft) reports optional CUDA kernels it cannot load on CPU machines.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # neural-compressor (imported by peft) announces the accelerator it detected; its logger
    # takes its level from LOGLEVEL when first used, overriding any level set before.
    os.environ.setdefault("LOGLEVEL", "ERROR")
    # OpenVINO's PyTorch frontend logs "Failed to build model wrapper." as an error on every
    # Hugging Face export, then traces the model unwrapped, as intended: not an error for users.
    logging.getLogger("openvino.frontend.pytorch.utils").setLevel(logging.CRITICAL)
    # torch.jit's TracerWarning, on every OpenVINO export of a Hugging Face decoder.
    warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
    warnings.filterwarnings("ignore", message="torch.tensor results are registered as constants")
    # Libraries' deprecation notices are theirs to fix; one that llmctl's own call sets off
    # (attributed to an llmctl module) stays visible, and is an error in the tests.
    not_llmctl = r"(?!llmctl(\.|$))"
    warnings.filterwarnings("ignore", category=FutureWarning, module=not_llmctl)
    warnings.filterwarnings("ignore", category=UserWarning, module=not_llmctl)


def libraries_quieted() -> bool:
    """Whether quiet_libraries ran (the CLI without --debug)."""
    return _quiet


def quiet_nncf() -> None:
    """NNCF prints bit-width tables at INFO through a stdout handler it sets up on import (and
    it needs its own logger class: creating the "nncf" logger before that import breaks it),
    so it is quieted once imported, unless --debug."""
    if _quiet:
        import nncf

        nncf.set_log_level(logging.WARNING)
