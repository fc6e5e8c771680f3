"""Quantization backends: make a causal LM smaller (and on CPU faster), save it, load it back.

One module per backend (``quantize.backend``), each a :class:`Backend`:

- ``inc`` (:mod:`.inc`): Intel Neural Compressor's ``neural_compressor.torch`` API, weight-only
  RTN, GPTQ or AWQ with ``bits`` and ``group_size``, saved in INC's Hugging Face layout.
- ``torch`` (:mod:`.torch_dynamic`): dynamic INT8, int8 weights per output channel and
  activations quantized on the fly by PyTorch's fbgemm/oneDNN kernels: what INC 2.x's
  ``approach="dynamic"`` (the course's) ran underneath; INC 3.x sends dynamic and static INT8
  through a PT2E graph export, which cannot drive ``generate()``.
- ``openvino`` (:mod:`.openvino`): optimum-intel export to OpenVINO IR, then NNCF: ``weight``
  compression (INT8, or INT4 with a group size and a share of INT4 layers) or ``static`` INT8
  (weights and activations, calibrated, SmoothQuant first).
- ``bnb`` (:mod:`.bnb`): bitsandbytes 8/4-bit through transformers, CUDA only.
- ``gguf`` (:mod:`.gguf_export`): one GGUF file for llama.cpp and Ollama (f16, bf16, q8_0,
  q5_1, q5_0, q4_1, q4_0), each trial scored after reading the file back through llmctl's
  GGUF import.

Which methods and bits each backend takes is checked when the recipe loads
(``schema.QuantizeConfig``). A quantized model directory holds ``quantization.json`` (backend
and settings) next to its weights and tokenizer; :func:`load` reads it to pick the backend, so
``generate`` and ``bench`` load every stage's output the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from llmctl.errors import UserError
from llmctl.quantization.common import Calibration, decline_openvino_telemetry

MARKER = "quantization.json"
CALIBRATED_METHODS = ("gptq", "awq", "static")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")

__all__ = ["MARKER", "CALIBRATED_METHODS", "Backend", "Calibration", "check_supported",
           "decline_openvino_telemetry", "is_quantized_dir", "load", "quantize", "save",
           "tensor_bytes", "trial_settings", "weight_bytes"]


class Backend(Protocol):
    def check(self) -> None:
        """Exit 2 when this machine or install cannot run the backend."""

    def ladder(self, cfg, base: dict[str, Any], model: torch.nn.Module) -> list[dict[str, Any]]:
        """Settings to try, ``base`` (the recipe's) first, each next one gentler on accuracy."""

    def quantize(self, model: torch.nn.Module, source_dir: str, settings: dict[str, Any],
                 calibration: Calibration | None):
        """A quantized copy of ``model`` (``source_dir`` holds it, for exporting backends)."""

    def save(self, qmodel, out_dir: Path, tokenizer) -> None:
        """The weights, in a format :meth:`load` reads (safetensors or OpenVINO IR), and any
        form of the tokenizer the backend's own runtime needs (the transformers one is saved
        for every backend)."""

    def load(self, path: Path, settings: dict[str, Any]):
        """The model :meth:`save` wrote, ready for ``generate`` and forward passes."""


def backend(name: str) -> Backend:
    from llmctl.quantization import bnb, gguf_export, inc, openvino, torch_dynamic

    backends = {"torch": torch_dynamic.TorchDynamic(), "inc": inc.Inc(),
                "openvino": openvino.OpenVino(), "bnb": bnb.Bnb(), "gguf": gguf_export.Gguf()}
    if name not in backends:
        raise UserError(f"quantize.backend: unknown backend {name!r} "
                        f"(backends: {', '.join(backends)})")
    return backends[name]


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def check_supported(backend_name: str, model: str | None = None, key: str = "quantize.model"
                    ) -> None:
    """Exit 2 before any work for a backend this machine or install cannot run, or (given the
    local ``model``) cannot quantize that model's family."""
    chosen = backend(backend_name)
    chosen.check()
    if model is not None and hasattr(chosen, "check_model"):
        chosen.check_model(model, key)


def trial_settings(cfg, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The accuracy-driven search's settings, the recipe's own first, at most ``max_trials``."""
    return backend(cfg.backend).ladder(cfg, cfg.settings(), model)[: cfg.max_trials]


def quantize(model: torch.nn.Module, source_dir: str, settings: dict[str, Any],
             calibration: Calibration | None = None):
    """A quantized copy of ``model``. ``calibration`` is needed by GPTQ, AWQ and static INT8."""
    if settings["method"] in CALIBRATED_METHODS and calibration is None:
        raise UserError(f"quantize.calibration: {settings['method']} needs calibration data")
    return backend(settings["backend"]).quantize(model, source_dir, settings, calibration)


def save(qmodel, settings: dict[str, Any], out_dir: Path, tokenizer) -> None:
    """Weights in the backend's loadable format, the tokenizer, and ``quantization.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    backend(settings["backend"]).save(qmodel, out_dir, tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / MARKER).write_text(json.dumps(settings, indent=2) + "\n")


def load(path: str | Path):
    """A quantized model saved by :func:`save`."""
    path = Path(path)
    settings = json.loads((path / MARKER).read_text())
    try:
        chosen = backend(settings["backend"])
    except UserError:
        raise UserError(f"{path / MARKER}: unknown backend {settings['backend']!r}") from None
    return chosen.load(path, settings)


def weight_bytes(path: str | Path) -> int:
    """Bytes of weight files in a model directory (safetensors, OpenVINO .bin, GGUF)."""
    return sum(f.stat().st_size for f in Path(path).iterdir()
               if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
