"""``backend = "bnb"``: bitsandbytes 8/4-bit (NF4) through transformers, CUDA only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmctl.errors import UserError
from llmctl.quantization.common import QuantizeBackend
from llmctl.schema import QuantizeCommon


class BnbQuantize(QuantizeCommon):
    """bitsandbytes 8-bit or 4-bit NF4 weights through transformers (CUDA)."""

    backend: Literal["bnb"] = Field(..., description="the quantization backend")
    method: Literal["weight"] = Field("weight", description="weight-only (the only method)")
    bits: Literal[4, 8] = Field(4, description="weight bits: 8-bit, or 4-bit NF4")


class Bnb(QuantizeBackend):
    name, table, label = "bnb", BnbQuantize, "bitsandbytes"

    def check(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UserError("quantize.backend: \"bnb\" (bitsandbytes) needs a CUDA GPU; on CPU "
                            "use \"torch\" (dynamic INT8), \"inc\" or \"openvino\"")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("quantize.backend: \"bnb\" needs bitsandbytes: "
                            "pip install 'llmctl[cuda]'") from None

    def quantize(self, model, source_dir: str, settings: dict[str, Any],
                 calibration):  # pragma: no cover - CUDA only
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bits = settings["bits"]
        config = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4,
                                    bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(source_dir, quantization_config=config,
                                                    use_safetensors=True, device_map={"": 0})

    def save(self, qmodel, out_dir: Path, tokenizer) -> None:  # pragma: no cover - CUDA only
        qmodel.save_pretrained(str(out_dir))  # safetensors

    def load(self, path: Path, settings: dict[str, Any]):  # pragma: no cover - CUDA only
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                    device_map={"": 0})


BACKEND = Bnb()
