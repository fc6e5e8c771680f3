"""``backend = "inc"``: Intel Neural Compressor's weight-only RTN, GPTQ or AWQ
(``neural_compressor.torch``), saved in INC's Hugging Face layout (safetensors)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


class Inc:
    def check(self) -> None:
        pass  # a core dependency

    def ladder(self, cfg, base: dict[str, Any], model) -> list[dict[str, Any]]:
        """Smaller groups, then 8 bits."""
        ladder = [{**base, "group_size": g} for g in halvings(cfg.group_size)]
        if cfg.bits < 8:
            ladder.append({**base, "bits": 8})
        return ladder

    def quantize(self, model, source_dir: str, settings: dict[str, Any], calibration):
        from neural_compressor.torch.quantization import (AWQConfig, GPTQConfig, RTNConfig,
                                                          convert, prepare)

        common = dict(bits=settings["bits"], group_size=settings["group_size"],
                      use_sym=settings["sym"])
        method = settings["method"]
        model = copy.deepcopy(model).float().eval()
        if method == "rtn":
            prepared = prepare(model, RTNConfig(use_layer_wise=False, **common))
        elif method == "gptq":
            # GPTQ reads the model path for its layer bookkeeping even when not layer-wise.
            prepared = prepare(model, GPTQConfig(model_path=source_dir, **common))
        else:
            prepared = prepare(model, AWQConfig(**common),
                               example_inputs=calibration.example_inputs)
        if method != "rtn":
            calibration.feed(prepared)
        return convert(prepared)

    def save(self, qmodel, out_dir: Path, tokenizer) -> None:
        from neural_compressor.torch.quantization import save as inc_save

        inc_save(qmodel, str(out_dir), format="huggingface")  # safetensors

    def load(self, path: Path, settings: dict[str, Any]):
        from neural_compressor.torch.quantization import load as inc_load

        return inc_load(str(path), format="huggingface").eval()


def halvings(group_size: int) -> list[int]:
    sizes = [group_size]
    while sizes[-1] > 32 and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes
