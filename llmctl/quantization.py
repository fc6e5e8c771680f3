"""Quantization backends: make a causal LM smaller (and on CPU faster), save it, load it back.

Backends, chosen by ``quantize.backend``:

- ``inc``: Intel Neural Compressor's ``neural_compressor.torch`` API, weight-only RTN, GPTQ or
  AWQ with ``bits`` and ``group_size``. Saved in INC's Hugging Face layout (safetensors plus a
  ``quantization_config``) and loaded back with ``neural_compressor.torch.quantization.load``.
- ``torch``: dynamic INT8: int8 weights per output channel, activations quantized on the fly,
  run by PyTorch's fbgemm/oneDNN kernels. This is what INC 2.x's ``approach="dynamic"`` (the
  course's) ran underneath; INC 3.x sends dynamic and static INT8 through a PT2E graph export,
  which cannot drive ``generate()``, so llmctl calls the kernels directly.
- ``openvino``: optimum-intel export to OpenVINO IR, then NNCF. ``weight``: weight compression
  (INT8, or INT4 with a group size and a ratio of layers in INT4). ``static``: full INT8, weights
  and activations, with activation ranges calibrated on data and SmoothQuant first (the static
  INT8 and SmoothQuant that neural-compressor 3.x offers only through PT2E).
- ``bnb``: bitsandbytes 8/4-bit through transformers, CUDA only.

A quantized model directory holds ``quantization.json`` (backend and settings) next to its
weights and tokenizer. :func:`load` reads it to pick the loader, so ``generate`` and ``bench``
load every stage's output the same way. Each backend also proposes a ladder of settings for
the accuracy-driven search, most aggressive first (:func:`trial_settings`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from llmctl.errors import UserError

MARKER = "quantization.json"
INC_METHODS = ("rtn", "gptq", "awq")
CALIBRATED_METHODS = ("gptq", "awq", "static")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def check_supported(backend: str, method: str, bits: int) -> None:
    """Exit 2 before any work for a backend this machine or install cannot run (which methods
    and bits each backend takes is checked when the recipe loads: ``recipe.QuantizeConfig``)."""
    if backend == "bnb":
        if not torch.cuda.is_available():
            raise UserError("quantize.backend: \"bnb\" (bitsandbytes) needs a CUDA GPU; on CPU "
                            "use \"torch\" (dynamic INT8), \"inc\" or \"openvino\"")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("quantize.backend: \"bnb\" needs bitsandbytes: "
                            "pip install 'llmctl[cuda]'") from None
    if backend == "openvino":
        decline_openvino_telemetry()
        try:
            import optimum.intel  # noqa: F401
        except ImportError:
            raise UserError("quantize.backend: \"openvino\" needs optimum-intel: "
                            "pip install 'llmctl[openvino]'") from None


def decline_openvino_telemetry() -> None:
    """Switch off NNCF's and OpenVINO's usage telemetry for this process.

    Without a consent file in the home directory NNCF sends telemetry by default, from a
    process it forks in a background thread; in a test run that fork landed while Deep Lake
    worked in the main thread and the interpreter died with a segfault. llmctl declines for
    its own process, as a "0" in the consent file would, and leaves the user's file alone.
    """
    try:
        from openvino_telemetry import Telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED
    # Telemetry is a singleton; one made before this call keeps its consent otherwise.
    made = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
    if made is not None:
        made.consent = False


# -- the accuracy-driven search ------------------------------------------------------------


def trial_settings(cfg, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Settings to try in order, the recipe's own first, each next one gentler on accuracy.

    torch: fall back more modules to fp32 (lm_head first, then whole decoder layers from both
    ends, as INC's tuning falls back the most sensitive ops). inc: smaller groups, then 8 bits.
    openvino: INT4 on a shrinking share of layers (the rest INT8), then INT8 everywhere; static
    INT8 falls back to INT8 weights with fp activations.
    """
    base = {"backend": cfg.backend, "method": cfg.method, "bits": cfg.bits,
            "group_size": cfg.group_size, "sym": cfg.sym}
    if cfg.backend == "torch":
        steps = [[]] + [[name] for name in _fallback_order(model)]
        ladder, excluded = [], []
        for step in steps:
            excluded = excluded + step
            ladder.append({**base, "fp32_modules": list(excluded)})
    elif cfg.backend == "inc":
        ladder = [{**base, "group_size": g} for g in _halvings(cfg.group_size)]
        if cfg.bits < 8:
            ladder.append({**base, "bits": 8})
    elif cfg.backend == "openvino":
        if cfg.method == "static":
            alpha = cfg.smooth_quant_alpha if cfg.smooth_quant else None  # None: no SmoothQuant
            ladder = [{**base, "smooth_quant_alpha": alpha},
                      {**base, "method": "weight"}]
        elif cfg.bits == 4:
            ladder = [{**base, "ratio": r} for r in (1.0, 0.8, 0.6)] + [{**base, "bits": 8}]
        else:
            ladder = [base]
    else:
        ladder = [base]
    return ladder[: cfg.max_trials]


def _halvings(group_size: int) -> list[int]:
    sizes = [group_size]
    while sizes[-1] > 32 and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def _fallback_order(model: torch.nn.Module) -> list[str]:
    """lm_head, then decoder layers first, last, second, second to last, ..."""
    layers = _decoder_layers(model)
    order = []
    while layers:
        order.append(layers.pop(0))
        if layers:
            order.append(layers.pop())
    head = ["lm_head"] if isinstance(getattr(model, "lm_head", None), torch.nn.Linear) else []
    return head + order


def _decoder_layers(model: torch.nn.Module) -> list[str]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and name.endswith(("layers", ".h")):
            return [f"{name}.{i}" for i in range(len(module))]
    return []


@dataclass
class Calibration:
    """Token blocks (1-D ``input_ids``) of a data source that GPTQ, AWQ and static INT8 see."""

    blocks: list[torch.Tensor]

    def feed(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in self.blocks:
                model(input_ids=ids.unsqueeze(0))

    @property
    def example_inputs(self) -> torch.Tensor:
        return self.blocks[0].unsqueeze(0)


def quantize(model: torch.nn.Module, source_dir: str, settings: dict[str, Any],
             calibration: Calibration | None = None):
    """A quantized copy of ``model`` (an fp model; ``source_dir`` holds it for backends that
    export from disk). ``calibration`` is needed by GPTQ, AWQ and static INT8."""
    backend = settings["backend"]
    if settings["method"] in CALIBRATED_METHODS and calibration is None:
        raise UserError(f"quantize.calibration: {settings['method']} needs calibration data")
    if backend == "torch":
        return _torch_dynamic(copy.deepcopy(model), settings["fp32_modules"])
    if backend == "inc":
        return _inc_weight_only(copy.deepcopy(model), source_dir, settings, calibration)
    if backend == "openvino":
        if settings["method"] == "static":
            return _openvino_static(source_dir, settings, calibration)
        return _openvino_export(source_dir, settings)
    if backend == "bnb":
        return _bnb_load(source_dir, settings)
    raise AssertionError(backend)


def _torch_dynamic(model: torch.nn.Module, fp32_modules: list[str]) -> torch.nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.float().eval()
    names = _int8_linears(model, fp32_modules)
    if "lm_head" in names and getattr(model.config, "tie_word_embeddings", False):
        # The int8 head is its own copy now: re-tying it to the fp32 embedding would fail.
        model.config.tie_word_embeddings = False
    return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names},
                            dtype=torch.qint8, inplace=True)


def _int8_linears(model: torch.nn.Module, fp32_modules: Iterable[str]) -> list[str]:
    """Every nn.Linear not under one of ``fp32_modules``."""
    keep = tuple(fp32_modules)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not any(name == k or name.startswith(k + ".") for k in keep)]


def _inc_weight_only(model, source_dir, settings, calibration: Calibration | None):
    from neural_compressor.torch.quantization import (AWQConfig, GPTQConfig, RTNConfig,
                                                      convert, prepare)

    common = dict(bits=settings["bits"], group_size=settings["group_size"],
                  use_sym=settings["sym"])
    method = settings["method"]
    model = model.float().eval()
    if method == "rtn":
        config = RTNConfig(use_layer_wise=False, **common)
        prepared = prepare(model, config)
    elif method == "gptq":
        # GPTQ reads the model path for its layer bookkeeping even when not layer-wise.
        config = GPTQConfig(model_path=source_dir, **common)
        prepared = prepare(model, config)
    else:
        config = AWQConfig(**common)
        prepared = prepare(model, config, example_inputs=calibration.example_inputs)
    if method != "rtn":
        calibration.feed(prepared)
    return convert(prepared)


def _openvino_export(source_dir: str, settings: dict[str, Any]):
    decline_openvino_telemetry()
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    weights = OVWeightQuantizationConfig(
        bits=settings["bits"], sym=settings["sym"],
        group_size=settings["group_size"] if settings["bits"] == 4 else None,
        ratio=settings.get("ratio", 1.0) if settings["bits"] == 4 else 1.0,
        # A layer whose width the group size does not divide gets the largest group that does.
        group_size_fallback="adjust" if settings["bits"] == 4 else None)
    return OVModelForCausalLM.from_pretrained(source_dir, export=True,
                                              quantization_config=weights)


def _openvino_static(source_dir: str, settings: dict[str, Any], calibration: Calibration):
    """Export fp, then NNCF's post-training quantization in place: SmoothQuant (unless the
    alpha is None), activation ranges from the calibration blocks, INT8 weights and activations."""
    decline_openvino_telemetry()
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


def _bnb_load(source_dir: str, settings: dict[str, Any]):  # pragma: no cover - CUDA only
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bits = settings["bits"]
    config = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4,
                                bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(source_dir, quantization_config=config,
                                                use_safetensors=True, device_map={"": 0})


# -- save and load ---------------------------------------------------------------------------


def save(qmodel, settings: dict[str, Any], out_dir: Path, tokenizer) -> None:
    """Weights in the backend's loadable format, the tokenizer, and ``quantization.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = settings["backend"]
    if backend == "torch":
        qmodel.config.save_pretrained(out_dir)
        save_file(_dynamic_state(qmodel), str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
    elif backend == "inc":
        from neural_compressor.torch.quantization import save as inc_save

        inc_save(qmodel, str(out_dir), format="huggingface")  # safetensors
    else:  # openvino IR, or bitsandbytes through save_pretrained (safetensors)
        qmodel.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / MARKER).write_text(json.dumps(settings, indent=2) + "\n")


def load(path: str | Path):
    """A quantized model saved by :func:`save`, ready for ``generate`` and forward passes."""
    path = Path(path)
    settings = json.loads((path / MARKER).read_text())
    backend = settings["backend"]
    if backend == "torch":
        return _load_torch_dynamic(path, settings)
    if backend == "inc":
        from neural_compressor.torch.quantization import load as inc_load

        return inc_load(str(path), format="huggingface").eval()
    if backend == "openvino":
        decline_openvino_telemetry()
        try:
            from optimum.intel import OVModelForCausalLM
        except ImportError:
            raise UserError(f"{path}: an OpenVINO model needs optimum-intel: "
                            f"pip install 'llmctl[openvino]'") from None
        return OVModelForCausalLM.from_pretrained(str(path))
    if backend == "bnb":  # pragma: no cover - CUDA only
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                    device_map={"": 0})
    raise UserError(f"{path / MARKER}: unknown backend {backend!r}")


def _dynamic_state(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: each int8 Linear as int8 weight + per-channel scale and
    zero point (+ bias), every other parameter and buffer as it is."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    state: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, module in qmodel.named_modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._packed_params._weight_bias()
            state[f"{name}.weight_int8"] = weight.int_repr().contiguous()
            state[f"{name}.weight_scale"] = weight.q_per_channel_scales().float().contiguous()
            # qint8 zero points fit int8 (and are 0 for the symmetric weights used here).
            state[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().to(torch.int8)
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().contiguous()
            quantized.add(name)
    seen: set[int] = set()
    for name, tensor in qmodel.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or name.rsplit(".", 1)[0] in quantized:
            continue
        if tensor.data_ptr() in seen:
            continue  # a tied weight is stored once; loading re-ties it
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    return state


def _load_torch_dynamic(path: Path, settings: dict[str, Any]) -> torch.nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(str(path / "model.safetensors"))
    model = _torch_dynamic(model, settings["fp32_modules"])
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            weight = torch._make_per_channel_quantized_tensor(
                state.pop(f"{name}.weight_int8"), state.pop(f"{name}.weight_scale").double(),
                state.pop(f"{name}.weight_zero_point").long(), 0)
            module.set_weight_bias(weight, state.pop(f"{name}.bias", None))
    # The int8 modules are set; every other tensor is copied into place by name.
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    unexpected = sorted(set(state) - set(tensors))
    missing = sorted(n for n in set(tensors) - set(state) if not _is_tied(model, n))
    if unexpected or missing:
        raise UserError(f"{path}/model.safetensors: does not match its config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            tensors[name].copy_(tensor)
    return model.eval()  # a tied embedding stayed tied: from_config shared the tensor


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return name.startswith("lm_head.") and getattr(model.config, "tie_word_embeddings", False)


def weight_bytes(path: str | Path) -> int:
    """Bytes of weight files in a model directory (safetensors, OpenVINO .bin)."""
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
