"""``backend = "openvino"``: optimum-intel exports the model to OpenVINO IR, then NNCF
compresses the weights (``weight``: INT8, or INT4 with a group size and a share of INT4 layers)
or quantizes weights and activations (``static``: INT8, activation ranges calibrated on data,
SmoothQuant first: the static INT8 and SmoothQuant neural-compressor 3.x offers only through
PT2E)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmctl.errors import UserError
from llmctl.quantization.common import decline_openvino_telemetry


class OpenVino:
    def check(self) -> None:
        decline_openvino_telemetry()
        try:
            import optimum.intel  # noqa: F401
        except ImportError:
            raise UserError("quantize.backend: \"openvino\" needs optimum-intel: "
                            "pip install 'llmctl[openvino]'") from None

    def ladder(self, cfg, base: dict[str, Any], model) -> list[dict[str, Any]]:
        """INT4 on a shrinking share of layers (the rest INT8), then INT8 everywhere; static
        INT8 falls back to INT8 weights with fp activations."""
        if cfg.method == "static":
            alpha = cfg.smooth_quant_alpha if cfg.smooth_quant else None  # None: no SmoothQuant
            return [{**base, "smooth_quant_alpha": alpha}, {**base, "method": "weight"}]
        if cfg.bits == 4:
            return [{**base, "ratio": r} for r in (1.0, 0.8, 0.6)] + [{**base, "bits": 8}]
        return [base]

    def quantize(self, model, source_dir: str, settings: dict[str, Any], calibration):
        decline_openvino_telemetry()
        if settings["method"] == "static":
            return _static(source_dir, settings, calibration)
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

        int4 = settings["bits"] == 4
        weights = OVWeightQuantizationConfig(
            bits=settings["bits"], sym=settings["sym"],
            group_size=settings["group_size"] if int4 else None,
            ratio=settings.get("ratio", 1.0) if int4 else 1.0,
            # A layer whose width the group size does not divide gets the largest group that does.
            group_size_fallback="adjust" if int4 else None)
        return OVModelForCausalLM.from_pretrained(source_dir, export=True,
                                                  quantization_config=weights)

    def save(self, qmodel, out_dir: Path) -> None:
        qmodel.save_pretrained(str(out_dir))  # IR: openvino_model.xml / .bin

    def load(self, path: Path, settings: dict[str, Any]):
        decline_openvino_telemetry()
        try:
            from optimum.intel import OVModelForCausalLM
        except ImportError:
            raise UserError(f"{path}: an OpenVINO model needs optimum-intel: "
                            f"pip install 'llmctl[openvino]'") from None
        return OVModelForCausalLM.from_pretrained(str(path))


def _static(source_dir: str, settings: dict[str, Any], calibration):
    """Export fp, then NNCF's post-training quantization in place: SmoothQuant (unless the
    alpha is None), activation ranges from the calibration blocks, INT8 weights and activations."""
    import nncf
    from optimum.intel import OVConfig, OVModelForCausalLM, OVQuantizationConfig, OVQuantizer

    ov_model = OVModelForCausalLM.from_pretrained(source_dir, export=True, load_in_8bit=False)
    data = nncf.Dataset(calibration.blocks, lambda ids: ov_model.prepare_inputs(
        input_ids=ids.unsqueeze(0), attention_mask=torch.ones(1, len(ids), dtype=torch.long)))
    alpha = settings.get("smooth_quant_alpha")
    config = OVQuantizationConfig(bits=8, sym=settings["sym"], num_samples=len(calibration.blocks),
                                  smooth_quant_alpha=-1 if alpha is None else alpha)
    OVQuantizer(ov_model).quantize(calibration_dataset=data,
                                   ov_config=OVConfig(quantization_config=config))
    return ov_model
