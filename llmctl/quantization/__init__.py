"""Quantization backends: make a causal LM smaller (and on CPU faster), save it, load it back.

A backend (``quantize.backend``) is one module here, holding its recipe table and a
:class:`~llmctl.quantization.common.QuantizeBackend`; :data:`BACKENDS` lists them, and the
[quantize] table's type, its error messages and the command's help are built from that list:

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
(:data:`QuantizeConfig`). A quantized model directory holds ``quantization.json`` (backend and
settings) next to its weights and tokenizer; :func:`load_model` reads it to pick the backend,
so ``generate``, ``bench`` and ``serve`` load every stage's output the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Discriminator, Tag

from llmctl.errors import UserError
from llmctl.paths import QUANTIZED_MARKER, is_quantized_dir, read_json
from llmctl.quantization import bnb, gguf_export, inc, openvino, torch_dynamic
from llmctl.quantization.common import Calibration, QuantizeBackend, decline_openvino_telemetry
from llmctl.schema import quantize_backend

if TYPE_CHECKING:
    import torch

MARKER = QUANTIZED_MARKER
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")

BACKENDS: dict[str, QuantizeBackend] = {
    b.name: b for b in (inc.BACKEND, torch_dynamic.BACKEND, openvino.BACKEND, bnb.BACKEND,
                        gguf_export.BACKEND)}

# [quantize]: one table type per backend, picked by `backend` (default "inc"), so a field or
# method another backend owns is an error at load time and in --dry-run.
QuantizeConfig = Annotated[
    Union[tuple(Annotated[b.table, Tag(name)] for name, b in BACKENDS.items())],
    Discriminator(quantize_backend, custom_error_type="unknown_backend",
                  custom_error_message=f"backends: {', '.join(BACKENDS)}")]

# the quantize command's help
SUMMARY = f"Quantize a model ({', '.join(b.label for b in BACKENDS.values())})."

__all__ = ["BACKENDS", "MARKER", "Calibration", "QuantizeBackend", "QuantizeConfig", "SUMMARY",
           "backend", "calibrates", "check_runtime", "check_supported", "decline_openvino_telemetry", "describe",
           "is_quantized_dir", "load", "load_model", "native_generate", "quantize", "runtime",
           "save", "tensor_bytes", "trial_settings", "weight_bytes"]


def backend(name: str) -> QuantizeBackend:
    if name not in BACKENDS:
        raise UserError(f"quantize.backend: unknown backend {name!r} "
                        f"(backends: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def calibrates(settings: dict[str, Any]) -> bool:
    """Whether these settings' method needs calibration data (GPTQ, AWQ, static INT8)."""
    return settings["method"] in backend(settings["backend"]).calibrated


def describe(settings: dict[str, Any]) -> str:
    """One trial's settings in a few words: ``openvino weight 4-bit group 128 ratio 0.8``."""
    return backend(settings["backend"]).describe(settings)


def check_supported(backend_name: str, model: str | None = None, key: str = "quantize.model"
                    ) -> None:
    """Exit 2 before any work for a backend this machine or install cannot run, or (given the
    local ``model``) cannot quantize that model's family."""
    chosen = backend(backend_name)
    chosen.check()
    if model is not None:
        chosen.check_model(model, key)


def trial_settings(cfg, model: "torch.nn.Module") -> list[dict[str, Any]]:
    """The accuracy-driven search's settings, the recipe's own first, at most ``max_trials``."""
    return backend(cfg.backend).ladder(cfg, cfg.settings(), model)[: cfg.max_trials]


def quantize(model: "torch.nn.Module", source_dir: str, settings: dict[str, Any],
             calibration: Calibration | None = None):
    """A quantized copy of ``model``. ``calibration`` is needed by GPTQ, AWQ and static INT8."""
    if calibrates(settings) and calibration is None:
        raise UserError(f"quantize.calibration: {settings['method']} needs calibration data")
    return backend(settings["backend"]).quantize(model, source_dir, settings, calibration)


def fp_model(path: str, model_cfg=None):
    """(fp model, tokenizer) to quantize from ``path``; an adapter is merged into its base."""
    from llmctl.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(path, model_cfg).eval()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, load_tokenizer(path, model_cfg)


def source_dir(path: str, model, tokenizer, scratch: Path) -> str:
    """A model directory holding ``model``, for backends that export from disk (OpenVINO,
    GPTQ): ``path`` itself when it is one, else (an adapter, a .gguf file) the model as loaded,
    saved to ``scratch``."""
    from llmctl.models import save_model
    from llmctl.paths import is_adapter_dir

    if is_adapter_dir(path) or not Path(path).is_dir():
        save_model(model, tokenizer, scratch)
        return str(scratch)
    return path


def save(qmodel, settings: dict[str, Any], out_dir: Path, tokenizer) -> None:
    """Weights in the backend's loadable format, the tokenizer, and ``quantization.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    backend(settings["backend"]).save(qmodel, out_dir, tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / MARKER).write_text(json.dumps(settings, indent=2) + "\n")


def load_model(path: str, model_cfg=None):
    """Any model generate, bench and serve are given: a quantize stage's output by its
    backend, anything else (a directory, an adapter, a hub id, a .gguf file) by transformers."""
    from llmctl.models import load_causal_lm, model_dir

    path = model_dir(path)
    return load(path) if is_quantized_dir(path) else load_causal_lm(path, model_cfg)


def load(path: str | Path):
    """A quantized model saved by :func:`save`."""
    path = Path(path)
    settings = read_json(path / MARKER)
    try:
        chosen = backend(settings["backend"])
    except UserError:
        raise UserError(f"{path / MARKER}: unknown backend {settings['backend']!r}") from None
    model = chosen.load(path, settings)
    model.llmctl_backend = chosen.name  # which backend's runtime decodes it (native_generate)
    return model


def runtime(path: str | Path) -> str | None:
    """What runs a model directory when not transformers: its backend's runtime
    ("openvino-genai"), for a quantize stage's output whose runtime is installed."""
    chosen = saved_backend(path)
    return chosen.runtime if chosen and chosen.runtime_ready(Path(path)) else None


def check_runtime(path: str, key: str) -> None:
    """Exit 2, before any work, when a quantize output's runtime is not installed here
    (llama.cpp for a GGUF output: the ``llamacpp`` extra)."""
    chosen = saved_backend(path)
    if chosen is not None:
        chosen.check_runtime(path, key)


def saved_backend(path: str | Path) -> QuantizeBackend | None:
    """The backend that saved a quantize stage's output; None for any other directory (or a
    backend this llmctl does not have: :func:`load` names it)."""
    if not is_quantized_dir(path):
        return None
    return BACKENDS.get(read_json(Path(path) / MARKER).get("backend"))


def native_generate(model, input_ids: "torch.Tensor", config) -> list[list[int]] | None:
    """New token ids of each returned sequence of one prompt, decoded by the runtime of the
    backend that loaded ``model`` (openvino-genai's C++ loop); None for any other model, or a
    setting that runtime lacks: the caller then uses ``model.generate``."""
    chosen = BACKENDS.get(getattr(model, "llmctl_backend", None))
    return chosen.generate(model, input_ids, config) if chosen else None


def weight_bytes(path: str | Path) -> int:
    """Bytes of weight files in a model directory (safetensors, OpenVINO .bin)."""
    return sum(f.stat().st_size for f in Path(path).iterdir()
               if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def tensor_bytes(model: "torch.nn.Module") -> int:
    """Bytes of a model's parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
