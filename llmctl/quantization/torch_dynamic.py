"""``backend = "torch"``: PyTorch dynamic INT8 (int8 weights per output channel, activations
quantized on the fly), saved as plain int8 tensors and scales in safetensors."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

from pydantic import Field

from llmctl.errors import UserError
from llmctl.quantization.common import QuantizeBackend
from llmctl.schema import QuantizeCommon

if TYPE_CHECKING:
    import torch


class TorchQuantize(QuantizeCommon):
    """PyTorch dynamic INT8: int8 weights per output channel, activations quantized on the fly."""

    backend: Literal["torch"] = Field(..., description="the quantization backend")
    method: Literal["dynamic"] = Field("dynamic", description="dynamic INT8 (the only method)")
    bits: Literal[8] = Field(8, description="weight bits (INT8 only)")


class TorchDynamic(QuantizeBackend):
    name, table, label = "torch", TorchQuantize, "PyTorch dynamic INT8"

    def check(self) -> None:
        pass  # PyTorch's own kernels: every CPU and install runs them

    def ladder(self, cfg, base: dict[str, Any], model: torch.nn.Module) -> list[dict[str, Any]]:
        """Fall back more modules to fp32: lm_head first, then whole decoder layers from both
        ends, as INC's tuning falls back the most sensitive ops."""
        ladder, excluded = [], []
        for step in [[]] + [[name] for name in fallback_order(model)]:
            excluded = excluded + step
            ladder.append({**base, "fp32_modules": list(excluded)})
        return ladder

    def quantize(self, model, source_dir: str, settings: dict[str, Any], calibration):
        return dynamic_int8(copy.deepcopy(model), settings["fp32_modules"])

    def save(self, qmodel, out_dir: Path, tokenizer) -> None:
        from safetensors.torch import save_file

        qmodel.config.save_pretrained(out_dir)
        save_file(dynamic_state(qmodel), str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})

    def load(self, path: Path, settings: dict[str, Any]) -> torch.nn.Module:
        import torch
        from safetensors.torch import load_file
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        config = AutoConfig.from_pretrained(path)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # no_init_weights skips the tying too: without this a tied fp32 lm_head (any trial that
        # keeps the head in fp32) stays uninitialised memory and the logits are garbage.
        model.tie_weights()
        state = load_file(str(path / "model.safetensors"))
        model = dynamic_int8(model, settings["fp32_modules"])
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
        # Non-persistent buffers (rotary inv_freq) are rebuilt from the config, never saved.
        transient = {f"{prefix}.{b}" if prefix else b
                     for prefix, module in model.named_modules(remove_duplicate=False)
                     for b in module._non_persistent_buffers_set}
        missing = sorted(n for n in set(tensors) - set(state) - transient
                         if not _is_tied(model, n))
        if unexpected or missing:
            raise UserError(f"{path}/model.safetensors: does not match its config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, tensor in state.items():
                tensors[name].copy_(tensor)
        return model.eval()



BACKEND = TorchDynamic()

def dynamic_int8(model: torch.nn.Module, fp32_modules: list[str]) -> torch.nn.Module:
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.float().eval()
    names = int8_linears(model, fp32_modules)
    if "lm_head" in names and getattr(model.config, "tie_word_embeddings", False):
        # The int8 head is its own copy now: re-tying it to the fp32 embedding would fail.
        model.config.tie_word_embeddings = False
    # torch 2.10+ calls torch.ao.quantization deprecated in favour of torchao, whose CPU int8
    # path measured far slower at the OPT-1.3B shape (docs/benchmarks.md, 2026-12-04: torchao
    # INT8 weight-only, compiled, 0.46x fp32 against this path's 2.57x): this stays while torch
    # ships it, and says so once here instead of on every quantization.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated",
                                DeprecationWarning)
        return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names},
                                dtype=torch.qint8, inplace=True)


def int8_linears(model: torch.nn.Module, fp32_modules: Iterable[str]) -> list[str]:
    """Every nn.Linear not under one of ``fp32_modules``."""
    import torch

    keep = tuple(fp32_modules)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not any(name == k or name.startswith(k + ".") for k in keep)]


def fallback_order(model: torch.nn.Module) -> list[str]:
    """lm_head, then decoder layers first, last, second, second to last, ..."""
    import torch

    layers = decoder_layers(model)
    order = []
    while layers:
        order.append(layers.pop(0))
        if layers:
            order.append(layers.pop())
    head = ["lm_head"] if isinstance(getattr(model, "lm_head", None), torch.nn.Linear) else []
    return head + order


def decoder_layers(model: torch.nn.Module) -> list[str]:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and name.endswith(("layers", ".h")):
            return [f"{name}.{i}" for i in range(len(module))]
    return []


def dynamic_state(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: each int8 Linear as int8 weight + per-channel scale and
    zero point (+ bias), every other parameter and buffer as it is."""
    import torch
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


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return name.startswith("lm_head.") and getattr(model.config, "tie_word_embeddings", False)
