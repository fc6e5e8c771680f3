"""Loading and building models and tokenizers, the one place every stage goes through.

Safe by default: weights load from safetensors only, and ``trust_remote_code`` stays off unless
the recipe's ``[model]`` table turns it on. Hub ids and local directories load the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llmctl.errors import UserError
from llmctl.quantization import is_quantized_dir, load as load_quantized
from llmctl.recipe import LoraConfig, ModelConfig
from llmctl.rundir import looks_local

# Where LoRA goes when the recipe does not say: the attention query/value projections, as in
# the LoRA paper and the course (OPT: q_proj, v_proj -> 3,145,728 trainable of 1.3B at r=16).
DEFAULT_TARGETS = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
}
ARCHITECTURES = {"gpt2": GPT2Config, "opt": OPTConfig, "llama": LlamaConfig,
                 "bert": BertConfig, "deberta-v2": DebertaV2Config}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str) -> str:
    """``auto`` picks bf16 on CUDA cards that have it, fp16 on older cards, fp32 on CPU."""
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise UserError("precision = \"fp16\" needs CUDA; on CPU use \"bf16\" (AMX) or \"fp32\"")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else DTYPES[name]


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}: adapter_config.json names no base_model_name_or_path")
    return base


def _load_error(what: str, path: str, err: Exception) -> UserError:
    detail = " ".join(str(err).split())[:240]
    return UserError(f"{what} {path}: cannot load ({detail})")


def load_tokenizer(path: str, model_cfg: ModelConfig | None = None,
                   padding_side: str = "right") -> PreTrainedTokenizerBase:
    model_cfg = model_cfg or ModelConfig()
    # An adapter directory may hold no tokenizer: fall back to its base model's.
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists():
        path = adapter_base(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer", path, err) from None
    if tokenizer.pad_token is None:
        # The course's GPT-2 setup: pad with eos (labels of pad positions are masked anyway).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path: str, model_cfg: ModelConfig | None = None, dtype: str | None = None,
                   **kwargs: Any) -> PreTrainedModel:
    """A causal LM from a directory or hub id; an adapter directory is loaded on its base, a
    quantized one (``llmctl quantize`` output) by its backend."""
    if is_quantized_dir(path):
        return load_quantized(path)
    common = _load_kwargs(model_cfg, dtype, **kwargs)
    if is_adapter_dir(path):
        from peft import PeftModel

        base_path = adapter_base(path)
        if looks_local(base_path) and not Path(base_path).exists():
            raise UserError(f"{path}/adapter_config.json: base_model_name_or_path {base_path} "
                            f"does not exist")
        base = _from_pretrained(base_path, common)
        try:
            return PeftModel.from_pretrained(base, path)
        except (OSError, ValueError, RuntimeError) as err:
            raise _load_error("adapter", path, err) from None
    return _from_pretrained(path, common)


def _load_kwargs(model_cfg: ModelConfig | None, dtype: str | None, **extra: Any) -> dict[str, Any]:
    """from_pretrained arguments every load shares: safetensors only, remote code as the recipe says."""
    model_cfg = model_cfg or ModelConfig()
    return dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                dtype=torch_dtype(dtype or model_cfg.dtype), use_safetensors=True, **extra)


def _from_pretrained(path: str, kwargs: dict[str, Any],
                     auto_cls: type = AutoModelForCausalLM) -> PreTrainedModel:
    if Path(path).exists():
        path = str(Path(path).resolve())  # adapters record this as their base: make it absolute
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error("model", path, err) from None


def build_causal_lm(architecture: str, overrides: dict[str, Any],
                    tokenizer: PreTrainedTokenizerBase, seq_len: int,
                    key: str = "pretrain.config") -> PreTrainedModel:
    """A freshly initialised model of the given architecture, sized by ``overrides``."""
    config = _config(architecture, overrides, tokenizer, key)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings")
    if seq_len > positions:
        field = "n_positions" if architecture == "gpt2" else "max_position_embeddings"
        raise UserError(f"{key.rsplit('.', 1)[0]}.seq_len: {seq_len} exceeds the model's "
                        f"{positions} positions (raise {key}.{field})")
    return AutoModelForCausalLM.from_config(config)


def build_classifier(architecture: str, overrides: dict[str, Any],
                     tokenizer: PreTrainedTokenizerBase, key: str) -> PreTrainedModel:
    """A fresh sequence classifier with one output: a reward model built from a config."""
    config = _config(architecture, overrides, tokenizer, key)
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config)


def _config(architecture: str, overrides: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
            key: str):
    config_cls = ARCHITECTURES[architecture]
    valid = set(config_cls().to_dict()) | set(config_cls.attribute_map)
    for name in overrides:
        if name not in valid:
            raise UserError(f"{key}.{name}: not a field of {config_cls.__name__}")
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        special.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return config_cls(**{**special, **overrides})


def load_classifier(path: str, model_cfg: ModelConfig | None = None,
                    dtype: str | None = None) -> PreTrainedModel:
    """A sequence classifier with one output (a reward or value model) from a directory or hub
    id; a causal LM's weights get a fresh score head, the InstructGPT way."""
    return _from_pretrained(path, _load_kwargs(model_cfg, dtype, num_labels=1),
                            AutoModelForSequenceClassification)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue  # tied embeddings are one tensor
        seen.add(id(p))
        total += p.numel()
    return total


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Safetensors weights + config + tokenizer: what transformers, peft, lm-eval and optimum load.

    (Trainer.save_model would add a pickled training_args.bin, which we keep out of outputs.)
    """
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def lora_config(cfg: LoraConfig, model, key: str, task_type: str = "CAUSAL_LM"):
    """A peft LoraConfig from a recipe's lora table, its target modules checked against the model."""
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.target_modules or DEFAULT_TARGETS.get(model.config.model_type)
    if targets:
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        for target in targets:
            if target not in leaf_names:
                linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                 if type(module).__name__ in ("Linear", "Conv1D")})
                raise UserError(f"{key}.target_modules: no module '{target}' in this "
                                f"{model.config.model_type} model (linear layers: "
                                f"{', '.join(linear)})")
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias,
                          target_modules=targets, task_type=task_type)
