"""``backend = "inc"``: Intel Neural Compressor's weight-only RTN, GPTQ or AWQ
(``neural_compressor.torch``), saved in INC's Hugging Face layout (safetensors)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from llmctl.quantization.common import QuantizeBackend
from llmctl.schema import QuantizeCommon


class IncQuantize(QuantizeCommon):
    """Intel neural-compressor weight-only quantization (INT4/INT8 groups)."""

    method_hints: ClassVar[dict[str, str]] = dict.fromkeys(
        ("dynamic", "static"), "; neural-compressor 3.x runs dynamic/static INT8 through a PT2E graph "
        "export that cannot drive generate(): use backend = \"torch\", method = \"dynamic\" or "
        "backend = \"openvino\", method = \"static\"")

    backend: Literal["inc"] = Field("inc", description="the quantization backend (the default)")
    method: Literal["rtn", "gptq", "awq"] = Field(
        "rtn", description="round-to-nearest, or GPTQ / AWQ (calibrated)")
    bits: Literal[4, 8] = Field(4, description="weight bits")
    group_size: int = Field(128, ge=-1, description="-1: one group per output channel")
    sym: bool = Field(True, description="symmetric quantization (no zero point)")


class Inc(QuantizeBackend):
    name, table, label = "inc", IncQuantize, "neural-compressor"
    calibrated = ("gptq", "awq")

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

    def describe(self, settings: dict[str, Any]) -> str:
        group = f" group {settings['group_size']}" if settings["bits"] == 4 else ""
        return super().describe(settings) + group


BACKEND = Inc()


def halvings(group_size: int) -> list[int]:
    sizes = [group_size]
    while sizes[-1] > 32 and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes
