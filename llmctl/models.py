"""Loading and building models and tokenizers, the one place every stage goes through.

Safe by default: weights load from safetensors only (pickled ``pytorch_model.bin`` can run code
when loaded: ``model.allow_pickle = true`` admits it), and ``trust_remote_code`` stays off unless
the recipe's ``[model]`` table turns it on. Hub ids and local directories load the same way; a
local directory is checked first (exists, has a config, whole safetensors files), so a bad one
is an error naming the file rather than a library traceback. An adapter loads only on the
base it was trained on (``base_fingerprint.json``).
"""

from __future__ import annotations

import functools
import json
import struct
import sys
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
from llmctl.fingerprint import model_fingerprint
from llmctl.gguf import is_gguf, read_metadata
from llmctl.paths import demo_hint, looks_local
from llmctl.quantization import is_quantized_dir, load as load_quantized
from llmctl.quantization.llamacpp import is_gguf_output, require as require_llamacpp
from llmctl.rundir import BASE_FINGERPRINT
from llmctl.schema import LoraConfig, ModelConfig

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


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX, as on Xeon Sapphire
    Rapids). Without it torch emulates bf16 and a bf16 matmul runs ~40x slower than fp32
    (measured on an AVX2-only EPYC). Unknown (no /proc/cpuinfo) counts as yes."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def _warn_slow_bf16() -> None:  # once per process, whichever stage asks first
    print("warning: precision = \"bf16\" on a CPU without AVX512-BF16 or AMX: torch emulates bf16 "
          "here and training runs many times slower than with precision = \"fp32\"", file=sys.stderr)


def resolve_precision(precision: str) -> str:
    """``auto`` picks bf16 on CUDA cards that have it, fp16 on older cards, fp32 on CPU."""
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise UserError("precision = \"fp16\" needs CUDA; on CPU use \"bf16\" (AMX) or \"fp32\"")
        if precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
            _warn_slow_bf16()  # the recipe's choice stands: results match, only speed differs
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else DTYPES[name]


def model_dir(path: str, key: str = "model") -> str:
    """Where to load a model from: a ``.gguf`` file becomes its converted, cached Hugging Face
    directory (``llmctl.gguf``); anything else is returned as it is."""
    if is_gguf(path):
        from llmctl.gguf import converted

        return converted(path, key)
    return path


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base an adapter names; a relative name is relative to the adapter directory (llmctl
    writes bases inside a run directory so), else to the working directory, else a hub id."""
    config = _read_json(Path(path) / "adapter_config.json")
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}/adapter_config.json: names no base_model_name_or_path")
    beside = Path(path) / base
    if not Path(base).is_absolute() and beside.exists():
        return str(beside.resolve())
    return base


def check_adapter_base(adapter: str | Path, base: str, key: str, allow_other: bool = False) -> None:
    """Exit 2 when ``base`` is not the model the adapter was trained on (by config and weights
    digest). LoRA deltas applied to another model load without complaint and produce nonsense."""
    recorded = _read_json(Path(adapter) / BASE_FINGERPRINT).get("fingerprint") \
        if (Path(adapter) / BASE_FINGERPRINT).is_file() else None
    if not recorded or allow_other or not Path(base).is_dir():
        return
    found = model_fingerprint(base)
    if found != recorded:
        what = "weights" if found and found["config_sha256"] == recorded["config_sha256"] \
            else "config"
        raise UserError(f"{key}: {base} is not the base adapter {adapter} was trained on (its "
                        f"{what} differ from the recorded fingerprint in {BASE_FINGERPRINT})"
                        + ("; set merge.allow_other_base = true to merge anyway"
                           if key.startswith("merge") else ""))


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: not a JSON object")
    return found


def check_model_dir(path: str, model_cfg: ModelConfig | None = None, key: str = "model",
                    causal_lm: bool = False) -> None:
    """Exit 2 with the file's name for what would otherwise fail deep inside from_pretrained
    (or, for pickles, load code): a missing directory, no config, pickle-only or truncated
    weights; with ``causal_lm``, a sequence classifier (a reward model) where a causal LM is
    needed. Hub ids pass: the loader reports those."""
    model_cfg = model_cfg or ModelConfig()
    root = Path(path)
    if not root.exists():
        if looks_local(path):
            raise UserError(f"{key}: {path} does not exist{demo_hint(path)}")
        return
    if not root.is_dir():
        raise UserError(f"{key}: {path} is not a model directory")
    if not (root / "config.json").is_file():
        raise UserError(f"{key}: {path} is not a model directory (no config.json)")
    config = _read_json(root / "config.json")  # unreadable JSON: named here, not deep in a loader
    if causal_lm:
        architectures = config.get("architectures") or []
        if any(a.endswith(("ForSequenceClassification", "ForTokenClassification"))
               for a in architectures):
            raise UserError(f"{key}: {path} is a {architectures[0]} (a reward or classifier "
                            f"model), not a causal language model")
    weights = sorted(root.glob("*.safetensors"))
    pickles = sorted(p for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not weights and pickles and not model_cfg.allow_pickle:
        raise UserError(f"{key}: {path} has only pickled weights ({pickles[0].name}), which can "
                        f"run code when loaded; convert them to safetensors or set "
                        f"model.allow_pickle = true")
    for file in weights:
        check_safetensors(file)


def check_loadable(path: str, model_cfg: ModelConfig | None, key: str,
                   causal_lm: bool = True) -> None:
    """Everything :func:`load_causal_lm` (or :func:`load_classifier`) would refuse about a local
    model, checked without loading it: for an adapter, its files and its base's; for a GGUF
    file, that it reads as one."""
    if is_gguf(path):
        read_metadata(path, key)
        return
    if is_quantized_dir(path) or not Path(path).is_dir():
        if is_gguf_output(path):
            require_llamacpp(path, key)
        if looks_local(path) and not Path(path).exists():
            raise UserError(f"{key}: {path} does not exist{demo_hint(path)}")
        return
    if is_adapter_dir(path):
        for file in Path(path).glob("*.safetensors"):
            check_safetensors(file)
        base = adapter_base(path)
        key = f"{path}/adapter_config.json: base_model_name_or_path"
        check_model_dir(base, model_cfg, key, causal_lm)
        check_adapter_base(path, base, key)
        return
    check_model_dir(path, model_cfg, key, causal_lm)


def check_safetensors(file: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes it
    describes: a truncated or overwritten file fails this before a loader sees it."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, 100 << 20):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"{file}: not a valid safetensors file ({err})") from None
    if 8 + header_len + end != size:
        raise UserError(f"{file}: truncated or corrupt safetensors file ({size:,} bytes, its "
                        f"header describes {8 + header_len + end:,})")


def _load_error(what: str, path: str, err: Exception) -> UserError:
    detail = " ".join(str(err).split())[:240]
    if not Path(path).exists() and ("huggingface.co" in detail or "offline" in detail.lower()):
        return UserError(f"{what} {path}: not a local path, and the Hugging Face Hub cannot be "
                         f"reached for it (offline)")
    return UserError(f"{what} {path}: cannot load ({detail})")


def load_tokenizer(path: str, model_cfg: ModelConfig | None = None,
                   padding_side: str = "right") -> PreTrainedTokenizerBase:
    model_cfg = model_cfg or ModelConfig()
    path = model_dir(path, "tokenizer")
    # An adapter directory may hold no tokenizer: fall back to its base model's.
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists():
        path = adapter_base(path)
    if looks_local(path) and not Path(path).exists():
        raise UserError(f"tokenizer {path}: does not exist{demo_hint(path)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - tokenizers raise many types for a broken directory
        raise _load_error("tokenizer", path, err) from None
    if isinstance(tokenizer, bool) or not hasattr(tokenizer, "encode"):
        raise UserError(f"tokenizer {path}: no tokenizer files (tokenizer.json, vocab, ...)")
    if tokenizer.pad_token is None:
        # The course's GPT-2 setup: pad with eos (labels of pad positions are masked anyway).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path: str, model_cfg: ModelConfig | None = None, dtype: str | None = None,
                   **kwargs: Any) -> PreTrainedModel:
    """A causal LM from a directory or hub id; an adapter directory is loaded on its base, a
    quantized one (``llmctl quantize`` output) by its backend."""
    path = model_dir(path)
    if is_quantized_dir(path):
        return load_quantized(path)
    common = _load_kwargs(model_cfg, dtype, **kwargs)
    if is_adapter_dir(path):
        from peft import PeftModel

        check_loadable(path, model_cfg, "model")  # its files, and its base: there, the right one
        base = _from_pretrained(adapter_base(path), common, model_cfg=model_cfg)
        try:
            return PeftModel.from_pretrained(base, path)
        except (OSError, ValueError, RuntimeError) as err:
            raise _load_error("adapter", path, err) from None
    return _from_pretrained(path, common, model_cfg=model_cfg)


def _load_kwargs(model_cfg: ModelConfig | None, dtype: str | None, **extra: Any) -> dict[str, Any]:
    """from_pretrained arguments every load shares: safetensors only, remote code as the recipe says."""
    model_cfg = model_cfg or ModelConfig()
    return dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                dtype=torch_dtype(dtype or model_cfg.dtype),
                use_safetensors=None if model_cfg.allow_pickle else True, **extra)


def _from_pretrained(path: str, kwargs: dict[str, Any], auto_cls: type = AutoModelForCausalLM,
                     model_cfg: ModelConfig | None = None) -> PreTrainedModel:
    check_model_dir(path, model_cfg, "model", causal_lm=auto_cls is AutoModelForCausalLM)
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
    config_cls = check_config_overrides(architecture, overrides, key)
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        special.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return config_cls(**{**special, **overrides})


def check_config_overrides(architecture: str, overrides: dict[str, Any], key: str) -> type:
    """Every key of a recipe's ``config = {...}`` must be a field of the architecture's config
    class (a typo would otherwise be silently ignored by transformers)."""
    config_cls = ARCHITECTURES[architecture]
    valid = set(config_cls().to_dict()) | set(config_cls.attribute_map)
    for name in overrides:
        if name not in valid:
            raise UserError(f"{key}.{name}: not a field of {config_cls.__name__}")
    return config_cls


def load_classifier(path: str, model_cfg: ModelConfig | None = None,
                    dtype: str | None = None) -> PreTrainedModel:
    """A sequence classifier with one output (a reward or value model) from a directory or hub
    id; a causal LM's weights get a fresh score head, the InstructGPT way."""
    return _from_pretrained(model_dir(path), _load_kwargs(model_cfg, dtype, num_labels=1),
                            AutoModelForSequenceClassification, model_cfg)


def max_positions(model) -> int | None:
    """How many token positions a model has (None when its config does not say)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


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

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = model.config.model_type
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}

    def linear() -> str:  # for the error messages only
        return ", ".join(sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                 if type(module).__name__ in ("Linear", "Conv1D")}))

    targets = cfg.target_modules or DEFAULT_TARGETS.get(model_type)
    if not targets and model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        # peft has no default for this family (qwen3_5_text, gemma4_text, ministral3, smollm3
        # in peft 0.21): the query/value projections when the model has them, as above.
        if {"q_proj", "v_proj"} <= leaf_names:
            targets = ["q_proj", "v_proj"]
        else:
            raise UserError(f"{key}.target_modules: no default for {model_type} models; name "
                            f"the modules to adapt (linear layers: {linear()})")
    if targets:
        for target in targets:
            if target not in leaf_names:
                raise UserError(f"{key}.target_modules: no module '{target}' in this "
                                f"{model_type} model (linear layers: {linear()})")
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias,
                          target_modules=targets, task_type=task_type)
